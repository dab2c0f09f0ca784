"""KronLinear: forward and backward equal the dense layer's, in every implementation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autotune
import kron
from model import KronLinear


def dense_reference(layer, x):
    return F.linear(x, layer.dense_weight(), layer.bias)


@pytest.mark.parametrize("impl", autotune.IMPLS)
@pytest.mark.parametrize("permuted", [False, True])
def test_forward_backward_equal_dense(impl, permuted):
    torch.manual_seed(0)
    layer = KronLinear(24, 30, m1=5, n1=4, r=3, impl=impl).double()
    with torch.no_grad():
        layer.bias.normal_()
    if permuted:
        layer.set_permutations(torch.randperm(30), torch.randperm(24))
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    # reference: F.linear with the weight built independently of the layer (torch.kron of each term,
    # placed by the permutations: W[rows[i], cols[j]] = K[i, j]), its grads mapped back by autograd
    K = sum(torch.kron(layer.A[k], layer.B[k]) for k in range(3))
    if permuted:
        W = torch.empty_like(K).index_put((layer.rows[:, None], layer.cols[None, :]), K)
    else:
        W = K
    ref = F.linear(x, W, layer.bias)
    assert (y - ref).abs().max() < 1e-12
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.A, layer.B, layer.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, layer.A, layer.B, layer.bias), g)
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-10


def test_dense_weight_of_permuted_layer_is_the_permuted_fit():
    W = torch.randn(32, 16, dtype=torch.float64)
    layer = KronLinear.from_dense(W, None, 8, 4, r=2, method="perm", kicks=0)
    K = kron.kron_dense(layer.A, layer.B)
    rows = torch.arange(32) if layer.rows is None else layer.rows      # identities are left out
    cols = torch.arange(16) if layer.cols is None else layer.cols
    assert torch.allclose(layer.dense_weight()[rows][:, cols], K, atol=1e-12)


def test_identity_permutations_are_dropped():
    W = torch.kron(torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
    layer = KronLinear.from_dense(W, None, 8, 4, r=1, method="perm", kicks=0)
    assert layer.rows is None and layer.cols is None         # exact already: nothing to gather
    assert torch.allclose(layer.dense_weight(), W, atol=1e-10)


@pytest.mark.parametrize("method", ["vl", "prune", "perm", "random"])
def test_constructors_from_dense(method):
    torch.manual_seed(1)
    lin = nn.Linear(16, 24).double()
    m1, n1 = (12, 8) if method == "prune" else (6, 4)     # prune: r = m2*n2 = 4 is exact
    layer = KronLinear.from_linear(lin, m1, n1, r=4, method=method)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), dense_reference(layer, x), atol=1e-12)
    err = (layer.dense_weight() - lin.weight).norm() / lin.weight.norm()
    if method == "vl":
        assert err.item() == pytest.approx(kron.kron_tail_energy(lin.weight, 6, 4, 4) ** 0.5 / lin.weight.norm().item(), rel=1e-6)
    elif method == "prune":
        assert err < 1e-12
    elif method == "perm":
        vl = kron.relative_error(lin.weight, *kron.nearest_kronecker(lin.weight, 6, 4, 4))
        assert err <= vl + 1e-12
    else:
        assert err > 0.5       # random factors ignore the weight ...
        assert layer.dense_weight().std().item() == pytest.approx(0.02, rel=0.35)   # ... at GPT-2's scale
    assert torch.equal(layer.bias, lin.bias)


def test_from_conv1d_orientation():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(2)
    conv = Conv1D(12, 8).double()          # nf=12 outputs, nx=8 inputs, weight (8, 12)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    layer = KronLinear.from_conv1d(conv, 4, 2, r=8, method="vl")   # r = kron rank: exact
    x = torch.randn(3, 8, dtype=torch.float64)
    assert (layer(x) - conv(x)).abs().max() < 1e-10


def test_auto_impl_is_measured_and_cached():
    autotune.IMPL_CACHE.clear()
    layer = KronLinear(64, 64, 8, 8, r=1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
    keys = list(autotune.IMPL_CACHE)
    assert len(keys) == 1 and autotune.IMPL_CACHE[keys[0]] in autotune.IMPLS[1:]
    assert keys[0][-1] is False               # measured for inference
    layer(x).sum().backward()
    assert len(autotune.IMPL_CACHE) == 2         # and separately for training


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=24, out_features=30, m1=7, n1=4), r"\(7, 4\) does not divide .*\(30, 24\)"),
    (dict(in_features=24, out_features=30, m1=5, n1=4, r=0), r"r must be a positive integer, got 0"),
    (dict(in_features=24, out_features=30, m1=5, n1=4, impl="fast"), r"impl must be one of"),
])
def test_bad_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KronLinear(**kwargs)


def test_bad_permutation_and_method():
    layer = KronLinear(8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"rows must be a permutation of range\(8\)"):
        layer.set_permutations(torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match=r"method must be one of"):
        KronLinear.from_dense(torch.randn(8, 8), None, 2, 2, method="svd")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        KronLinear.from_dense(torch.randn(8, 8), torch.randn(4), 2, 2)


def test_auto_never_times_orders_costlier_than_dense(monkeypatch):
    """A (128 x 1) (x) (1 x 128) term is an outer product: B first costs 256 multiply-adds a token,
    A first 32,768, twice dense's 16,384. auto must not even try the A-first layouts."""
    timed = []
    real = autotune.forward_impl
    monkeypatch.setattr(autotune, "forward_impl", lambda x, A, B, bias, impl: timed.append(impl) or real(x, A, B, bias, impl))
    autotune.IMPL_CACHE.clear()
    layer = KronLinear(128, 128, m1=128, n1=1, r=1)
    layer(torch.randn(64, 128))
    b_first, a_first = kron.kron_macs(128, 1, 1, 128, 1)
    assert b_first < 128 * 128 < a_first
    assert {"dense", "b"} <= set(timed) and not {"a", "a_bmm"} & set(timed)
