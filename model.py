"""
The model: KronLinear, a drop-in for nn.Linear whose weight is a sum of Kronecker products.
The GPT module that uses it arrives with the compressed-GPT issue; the math lives in kron.py.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import kron

IMPLS = ("auto",) + kron.ORDERS + ("dense",)   # measured choice, factored orders (kron.kron_matmul), materialize


def _forward_impl(x, A, B, bias, impl):
    if impl == "dense":
        return F.linear(x, kron.kron_dense(A, B), bias)
    y = kron.kron_matmul(x, A, B, order=impl)
    return y if bias is None else y + bias


# The fastest implementation per (shape, terms, device, dtype, tokens, training) is measured once
# and cached here. Wall-clock speed of the factored product does not follow its multiply-add count
# (the reshapes between the two GEMMs are memory-bound, and a tiny factor makes the GEMMs thin), so
# the choice is made by timing, with materialize-then-matmul as the fallback that is never slower
# than dense by more than the cost of building W.
_IMPL_CACHE = {}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_impl(x, A, B, bias, train, reps=3, margin=0.05):
    """Time each implementation on x (forward, plus backward when train) and return the fastest.
    After a warm-up, `reps` rounds time the candidates in turn (round-robin, so that drift in the
    machine's speed hits all of them alike) and keep each one's best; a candidate 3x slower than the
    best after the first round is dropped; a factored form must beat materialize-then-matmul by
    `margin` to be chosen."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.numel() // x.shape[-1]
    key = (m1, n1, m2, n2, r, x.device.type, x.dtype, 1 << max(N - 1, 0).bit_length(), bool(train))
    if key in _IMPL_CACHE:
        return _IMPL_CACHE[key]
    xs = x.detach()

    def run(impl):
        Ai = A.detach().requires_grad_(train)
        Bi = B.detach().requires_grad_(train)
        _sync(x.device)
        t0 = time.perf_counter()
        with torch.enable_grad() if train else torch.no_grad():
            y = _forward_impl(xs, Ai, Bi, None, impl)
            if train:
                y.backward(torch.ones_like(y))
        _sync(x.device)
        return time.perf_counter() - t0

    candidates = ("dense",) + kron.ORDERS
    for impl in candidates:
        run(impl)                                  # warm-up
    times = {impl: float("inf") for impl in candidates}
    for i in range(reps):
        for impl in candidates:
            if i and times[impl] > 3 * min(times.values()):
                continue
            times[impl] = min(times[impl], run(impl))
    best = min(times, key=times.get)
    if best != "dense" and times[best] > (1 - margin) * times["dense"]:
        best = "dense"
    _IMPL_CACHE[key] = best
    return best


class KronLinear(nn.Module):
    """y = x W^T + b with W = P_rows^T (sum_k A_k (x) B_k) P_cols^T, i.e. W[rows][:, cols] = sum A_k (x) B_k.

    A: (r, m1, n1), B: (r, m2, n2), out_features = m1*m2, in_features = n1*n2 (nn.Linear orientation;
    GPT-2's Conv1D stores W^T, see from_conv1d). rows/cols are optional permutations stored as index
    buffers: the forward gathers x[..., cols] and scatters the output by rows, one gather each.
    A permutation can be folded into a neighbour instead: the output order of an MLP's c_fc is free
    (GELU is elementwise), so giving c_proj's cols the same permutation as c_fc's rows cancels both
    gathers; the model does that fold, this layer just carries the index buffers.
    impl: 'auto' (measured per shape, device and batch), 'b', 'a' (factored orders) or 'dense'.
    """

    def __init__(self, in_features, out_features, m1, n1, r=1, bias=True, rows=None, cols=None,
                 impl="auto", device=None, dtype=None):
        super().__init__()
        m2, n2 = kron.split_shape(out_features, in_features, m1, n1)
        kron._check_pos_int("r", r)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.in_features, self.out_features = in_features, out_features
        self.m1, self.n1, self.m2, self.n2, self.r = m1, n1, m2, n2, r
        self.impl = impl
        kw = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(r, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(r, m2, n2, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("rows", None)
        self.register_buffer("row_inv", None)
        self.register_buffer("cols", None)
        self.set_permutations(rows, cols)
        self.reset_parameters()

    def reset_parameters(self, std=0.02):
        """Random factors whose product has entries of std `std` (GPT-2's init): each factor entry
        has std (std^2 / r)^(1/4), since a product entry is a sum of r products of two entries."""
        s = (std ** 2 / self.r) ** 0.25
        with torch.no_grad():
            self.A.normal_(0.0, s)
            self.B.normal_(0.0, s)
            if self.bias is not None:
                self.bias.zero_()

    def set_permutations(self, rows=None, cols=None):
        for name, p, size in (("rows", rows, self.out_features), ("cols", cols, self.in_features)):
            if p is None:
                continue
            p = torch.as_tensor(p)
            if p.dim() != 1 or p.numel() != size or p.dtype not in (torch.int64, torch.int32) or \
                    not torch.equal(torch.sort(p).values.cpu(), torch.arange(size)):
                raise ValueError(f"{name} must be a permutation of range({size}), got shape {tuple(p.shape)} "
                                 f"dtype {p.dtype}")
        dev = self.A.device
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev)
        self.row_inv = None if rows is None else torch.argsort(self.rows)
        self.cols = None if cols is None else torch.as_tensor(cols, dtype=torch.long, device=dev)

    def dense_weight(self):
        """The equivalent dense (out_features, in_features) weight."""
        W = kron.kron_dense(self.A, self.B)
        if self.cols is not None:
            W = W[:, torch.argsort(self.cols)]
        if self.row_inv is not None:
            W = W[self.row_inv]
        return W

    def forward(self, x):
        if self.cols is not None:
            x = x[..., self.cols]
        impl = self.impl
        if impl == "auto":
            impl = choose_impl(x, self.A, self.B, self.bias, torch.is_grad_enabled() and self.A.requires_grad)
        bias = self.bias if self.row_inv is None else None
        y = _forward_impl(x, self.A, self.B, bias, impl)
        if self.row_inv is not None:
            y = y[..., self.row_inv]
            if self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self):
        perm = ", permuted" if self.rows is not None or self.cols is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, A=({self.r}, {self.m1}, {self.n1}), "
                f"B=({self.r}, {self.m2}, {self.n2}), bias={self.bias is not None}, impl={self.impl}{perm}")

    # ---- constructors from a dense weight

    @classmethod
    def from_dense(cls, weight, bias, m1, n1, r=1, method="vl", impl="auto", **kw):
        """Factor a dense (out, in) weight: method 'vl' (Van Loan, optimal Frobenius fit), 'prune'
        (Krony-PT's sub-matrix init; kw: select, fill), 'perm' (permutation search; kw go to
        kron.permuted_kronecker) or 'random' (GPT-2-scale random factors, the weight is ignored)."""
        kron._check_matrix(weight, "weight")
        out_f, in_f = weight.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
        methods = ("vl", "prune", "perm", "random")
        if method not in methods:
            raise ValueError(f"method must be one of {methods}, got {method!r}")
        layer = cls(in_f, out_f, m1, n1, r, bias=bias is not None, impl=impl,
                    device=weight.device, dtype=weight.dtype)
        W = weight.detach()
        rows = cols = None
        if method == "vl":
            A, B = kron.nearest_kronecker(W, m1, n1, r)
        elif method == "prune":
            A, B = kron.prune_kronecker(W, m1, n1, r, **kw)
        elif method == "perm":
            A, B, rows, cols = kron.permuted_kronecker(W, m1, n1, r, **kw)
        else:
            A, B = layer.A.detach(), layer.B.detach()
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        layer.set_permutations(rows, cols)
        return layer

    @classmethod
    def from_linear(cls, linear, m1, n1, r=1, method="vl", **kw):
        return cls.from_dense(linear.weight, linear.bias, m1, n1, r, method, **kw)

    @classmethod
    def from_conv1d(cls, conv, m1, n1, r=1, method="vl", **kw):
        """From GPT-2's Conv1D (weight stored as (in, out), y = x W + b). m1, n1 are given in the
        nn.Linear orientation of the result: a Conv1D factor of shape (a, b) is (b, a) here."""
        return cls.from_dense(conv.weight.t(), conv.bias, m1, n1, r, method, **kw)
