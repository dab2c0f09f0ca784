"""The distillation terms (distill.py) and the factored embedding lookup (kron.kron_rows): value and
gradient equal to the plain formulas in float64, whatever the chunk, and memory bounded: what
autograd keeps for backward is measured with saved-tensor hooks."""
import math

import pytest
import torch
import torch.nn.functional as F

import distill
import kron


def saved_bytes(fn):
    """Run fn() and return (its result, the bytes of every tensor autograd saved for backward)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes)


def plain_kd_ce(s, t, y, T):
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    kd = (lt.exp() * (lt - ls)).sum(-1).mean() * T * T
    ce = F.cross_entropy(s, y, ignore_index=-1)
    return kd, ce


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_logit_losses_equal_the_plain_formula(T, chunk):
    torch.manual_seed(0)
    s = torch.randn(3, 5, 37, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 37, dtype=torch.float64) * 3
    y = torch.randint(0, 37, (3, 5))
    y[0, 1] = -1                                               # ignored position
    w_kd, w_ce = 0.7, 1.3
    kd, ce = distill.logit_losses(s, t, y, T, chunk)
    g = torch.autograd.grad(w_kd * kd + w_ce * ce, s)[0]
    kd0, ce0 = plain_kd_ce(s.view(-1, 37), t.view(-1, 37), y.view(-1), T)
    g0 = torch.autograd.grad(w_kd * kd0 + w_ce * ce0, s, retain_graph=True)[0]
    assert kd.item() == pytest.approx(kd0.item(), rel=1e-12) and ce.item() == pytest.approx(ce0.item(), rel=1e-12)
    assert torch.allclose(g, g0, rtol=1e-10, atol=1e-14)
    # each term alone: the other input is None and its value 0
    kd1, ce1 = distill.logit_losses(s, t, None, T, chunk)
    assert kd1.item() == pytest.approx(kd0.item(), rel=1e-12) and ce1.item() == 0.0
    assert torch.allclose(torch.autograd.grad(kd1, s)[0], torch.autograd.grad(kd0, s, retain_graph=True)[0], rtol=1e-10, atol=1e-14)
    _, ce2 = distill.logit_losses(s, None, y, T, chunk)
    assert torch.allclose(torch.autograd.grad(ce2, s)[0], torch.autograd.grad(ce0, s)[0], rtol=1e-10, atol=1e-14)


def test_logit_losses_keep_only_the_logits_for_backward():
    """A plain KL keeps two float32 log-softmaxes of the whole batch (the issue's 4.9 GB at 12 x 1024
    x 50257); here only the inputs are saved, whatever the chunk size."""
    N, V = 64, 1000
    s = torch.randn(N, V, requires_grad=True)
    t, y = torch.randn(N, V), torch.randint(0, V, (N,))
    inputs = s.numel() * 4 + t.numel() * 4 + y.numel() * 8
    (kd, ce), nbytes = saved_bytes(lambda: distill.logit_losses(s, t, y, 2.0, chunk=8))
    assert nbytes <= inputs + 64                                   # + the count of scored positions
    _, plain = saved_bytes(lambda: plain_kd_ce(s, t, y, 2.0))
    assert plain >= inputs + 2 * N * V * 4 - y.numel() * 8      # the plain formula keeps two more (N, V)
    (kd + ce).backward()
    assert torch.isfinite(s.grad).all()


def plain_attn_kl(qs, ks, qt, kt):
    d = qs.shape[-1]
    T = qs.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ps = F.softmax((qs @ ks.transpose(-2, -1) / math.sqrt(d)).masked_fill(~mask, float("-inf")), -1)
    pt = F.softmax((qt @ kt.transpose(-2, -1) / math.sqrt(d)).masked_fill(~mask, float("-inf")), -1)
    return (pt * (torch.log(pt.clamp_min(1e-300)) - torch.log(ps.clamp_min(1e-300)))).sum(-1).mean()


@pytest.mark.parametrize("max_elems", [1, 40, 10 ** 6])
def test_attn_kl_equals_the_plain_formula(max_elems):
    torch.manual_seed(1)
    B, H, T, d = 2, 3, 9, 4
    qs, ks = (torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    qt, kt = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(2))
    got = distill.attn_kl(qs, ks, qt, kt, max_elems=max_elems)
    want = plain_attn_kl(qs, ks, qt, kt)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g = torch.autograd.grad(got, (qs, ks))
    g0 = torch.autograd.grad(want, (qs, ks))
    for a, b in zip(g, g0):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-14)


def test_attn_kl_keeps_no_maps():
    """Plainly, every layer keeps about three float32 T x T maps per head (29 GB at GPT-2 small, batch
    12); here only the queries and keys are saved."""
    B, H, T, d = 2, 4, 64, 8
    qs, ks = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(2))
    qt, kt = (torch.randn(B, H, T, d) for _ in range(2))
    _, nbytes = saved_bytes(lambda: distill.attn_kl(qs, ks, qt, kt, max_elems=B * H * T * 8))
    assert nbytes <= 4 * B * H * T * d * 4
    _, plain = saved_bytes(lambda: plain_attn_kl(qs, ks, qt, kt))
    assert plain > 2 * B * H * T * T * 4


def test_hidden_mse_refuses_unpaired_depths():
    a = [torch.zeros(1, 2, 3)] * 3
    assert distill.hidden_mse(a, a).item() == 0.0
    with pytest.raises(ValueError, match="one to one"):
        distill.hidden_mse(a, a[:2])


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_kron_rows_equal_the_dense_rows(chunk):
    torch.manual_seed(2)
    r, m1, n1, m2, n2 = 5, 4, 3, 6, 2
    A = torch.randn(r, m1, n1, dtype=torch.float64, requires_grad=True)
    B = torch.randn(r, m2, n2, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, m1 * m2, (3, 7))
    idx[0, 0] = idx[0, 1]                                          # repeated rows accumulate gradient
    out = kron.kron_rows(A, B, idx, chunk=chunk)
    want = kron.kron_dense(A, B)[idx]
    assert out.shape == (3, 7, n1 * n2) and torch.allclose(out, want, rtol=1e-12, atol=1e-14)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), (A, B))
    g0 = torch.autograd.grad((want * w).sum(), (A, B))
    for a, b in zip(g, g0):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_kron_rows_keep_no_product_for_backward():
    """The lookup used to build an (r, batch, T, n1, n2) product and keep it: gigabytes at GPT-2's
    embedding with the r the solver picks. Only the factors and the indices are saved now."""
    r, m1, n1, m2, n2 = 16, 50, 8, 20, 4
    A = torch.randn(r, m1, n1, requires_grad=True)
    B = torch.randn(r, m2, n2, requires_grad=True)
    idx = torch.randint(0, m1 * m2, (4, 256))
    _, nbytes = saved_bytes(lambda: kron.kron_rows(A, B, idx))
    assert nbytes <= A.numel() * 4 + B.numel() * 4 + idx.numel() * 8


def test_kron_rows_under_bf16_autocast():
    """The factored embedding's backward adds bfloat16 row gradients (autocast) into float32 factors."""
    A = torch.randn(3, 10, 4, requires_grad=True)
    B = torch.randn(3, 5, 2, requires_grad=True)
    idx = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kron.kron_rows(A, B, idx)
        (out.float() * torch.linspace(0, 1, 8)).sum().backward()
    assert A.grad.dtype == torch.float32 and torch.isfinite(A.grad).all() and B.grad.abs().sum() > 0
