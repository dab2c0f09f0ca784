"""
Kronecker-product math, in one place: factor shapes, Van Loan's nearest
Kronecker product, pruning, the data-aware (input-whitened) fit, permutation
search, and the factored product.

Conventions (used everywhere in this repo):
  A weight W has shape (out, in) = (m, n), as in nn.Linear.
  W = sum_k A_k (x) B_k, A_k of shape (m1, n1), B_k of shape (m2, n2),
  m = m1*m2, n = n1*n2, so W[i1*m2 + i2, j1*n2 + j2] = sum_k A_k[i1, j1] B_k[i2, j2].
  A stack of r terms is a tensor A of shape (r, m1, n1) and B of shape (r, m2, n2).

References:
  C. F. Van Loan and N. Pitsianis, "Approximation with Kronecker products" (1993).
  Krony-PT, arXiv 2412.12351 (pruning init, factor shapes of GPT-2 MLPs).
  TQCompressor, arXiv 2401.16367 (W ~ P (sum A_k (x) B_k) Q with permutations P, Q).
  SVD-LLM, arXiv 2403.07378 (truncation-aware whitening of W by the inputs' second moment).
"""

import itertools
import math
import random
from dataclasses import dataclass, asdict

import torch

# -----------------------------------------------------------------------------
# argument checks: every public function validates, and names what is wrong


def check_pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_matrix(W, name="W"):
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix (out, in), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {W.dtype}")


def split_shape(m, n, m1, n1):
    """(m2, n2) for a (m, n) matrix whose first factor is (m1, n1); ValueError if they do not divide."""
    for name, v in (("m", m), ("n", n), ("m1", m1), ("n1", n1)):
        check_pos_int(name, v)
    if m % m1 or n % n1:
        raise ValueError(f"first factor ({m1}, {n1}) does not divide the matrix shape ({m}, {n}): "
                         f"{m} % {m1} = {m % m1}, {n} % {n1} = {n % n1}")
    return m // m1, n // n1


def _check_factors(A, B):
    """Accept (r, m1, n1)/(r, m2, n2) stacks, or single (m1, n1)/(m2, n2) terms; return 3-D views."""
    for name, T in (("A", A), ("B", B)):
        if not isinstance(T, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
        if T.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (r, rows, cols) or (rows, cols), got {tuple(T.shape)}")
    A = A.unsqueeze(0) if A.dim() == 2 else A
    B = B.unsqueeze(0) if B.dim() == 2 else B
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must hold the same number of terms, got {A.shape[0]} and {B.shape[0]}")
    if A.shape[0] < 1:
        raise ValueError("A and B must hold at least one term (r >= 1)")
    return A, B


# -----------------------------------------------------------------------------
# factor shapes


@dataclass(frozen=True)
class FactorShape:
    m1: int
    n1: int
    m2: int
    n2: int
    r: int
    params: int          # r * (m1*n1 + m2*n2), no bias
    dense_params: int    # m * n
    compression: float   # dense_params / params
    term_rank: int       # rank ceiling of one term: rank(A (x) B) = rank(A) rank(B)
    kron_rank: int       # Kronecker-rank ceiling: min(m1*n1, m2*n2) terms give an exact fit
    macs: int            # multiply-adds per token of the factored product, cheaper order
    dense_macs: int      # m * n
    order: str           # 'b' (contract B first) or 'a' (A first)

    def asdict(self):
        return asdict(self)


def kron_macs(m1, n1, m2, n2, r=1):
    """Multiply-adds per token of x @ (sum A_k (x) B_k)^T in each order: (B first, A first).

    With X the input reshaped to (n1, n2), each term is A_k X B_k^T:
      B first: X B^T costs n1*n2*m2, then A (.) costs m1*n1*m2;
      A first: A X costs m1*n1*n2, then (.) B^T costs m1*n2*m2.
    """
    return r * (n1 * n2 * m2 + m1 * n1 * m2), r * (m1 * n1 * n2 + m1 * n2 * m2)


MAX_DIM = 2 ** 40       # no weight matrix has a side near this; trial division to its root is a second


def divisors(v):
    """The divisors of v in increasing order, by trial division up to sqrt(v)."""
    if v > MAX_DIM:
        raise ValueError(f"a matrix side of {v} is beyond any weight matrix (at most {MAX_DIM})")
    small = [d for d in range(1, math.isqrt(v) + 1) if v % d == 0]
    return small + [v // d for d in reversed(small) if d * d != v]


def factor_shapes(m, n, r=1):
    """Every factorization (m1, n1, m2, n2) of an (m, n) matrix with r terms, as FactorShape rows,
    sorted by parameters (fewest first)."""
    check_pos_int("m", m)
    check_pos_int("n", n)
    check_pos_int("r", r)
    dm, dn = divisors(m), divisors(n)
    if len(dm) * len(dn) > 10 ** 6:
        raise ValueError(f"a {m} x {n} matrix has {len(dm) * len(dn):,} factorizations; list fewer (smaller sides)")
    rows = []
    for m1 in dm:
        for n1 in dn:
            m2, n2 = m // m1, n // n1
            params = r * (m1 * n1 + m2 * n2)
            mb, ma = kron_macs(m1, n1, m2, n2, r)
            rows.append(FactorShape(
                m1=m1, n1=n1, m2=m2, n2=n2, r=r, params=params, dense_params=m * n,
                compression=m * n / params, term_rank=min(m1, n1) * min(m2, n2),
                kron_rank=min(m1 * n1, m2 * n2), macs=min(mb, ma), dense_macs=m * n,
                order="b" if mb <= ma else "a"))
    rows.sort(key=lambda s: (s.params, s.m1, s.n1))
    return rows


# -----------------------------------------------------------------------------
# Van Loan's rearrangement: ||W - sum A_k (x) B_k||_F = ||R - sum vec(A_k) vec(B_k)^T||_F


def rearrange(W, m1, n1):
    """Van Loan's R: one row per (m2, n2) block of W, R[i1*n1 + j1] = vec(block (i1, j1))."""
    check_matrix(W)
    m2, n2 = split_shape(W.shape[0], W.shape[1], m1, n1)
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_dense(A, B):
    """The dense matrix sum_k A_k (x) B_k, shape (m1*m2, n1*n2)."""
    A, B = _check_factors(A, B)
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    # one GEMM with inner dimension r gives R, then undo the rearrangement
    R = A.reshape(r, m1 * n1).transpose(0, 1) @ B.reshape(r, m2 * n2)
    return R.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


ORDERS = ("a", "b", "a_bmm", "b_bmm", "einsum")


def kron_matmul(x, A, B, order=None, chunk=None):
    """x @ (sum_k A_k (x) B_k)^T for x of shape (..., n1*n2), without building the dense matrix.

    With X the input reshaped to (n1, n2), each term is A_k X B_k^T, and the r terms are folded into
    one contraction. The implementations compute the same thing with different memory layouts:
      'b'      B first as one GEMM over all tokens, a transpose, then A as one GEMM:
               T = X[(t, j1), j2] @ Bcat[j2, (k, i2)],  Y = T[(t, i2), (k, j1)] @ Acat[(k, j1), i1];
      'a'      the same with A first (the output needs no transpose);
      'b_bmm'  B first as a GEMM, then A as a broadcast batched matmul over tokens (no transpose
               when r = 1; fast for balanced shapes, slow when a factor is tiny);
      'a_bmm'  A first as a broadcast batched matmul, then B as a GEMM;
      'einsum' torch.einsum's own plan.
    order=None picks 'a' or 'b' by multiply-adds (kron_macs); model.KronLinear picks by measurement.
    chunk: tokens per piece. On the CPU the default keeps intermediates plus output near 4M elements
    (16 MB in float32) so that they stay in cache: at 8 x 1024 tokens this is 2-2.5x faster than
    one piece for balanced shapes. On other devices the default is one piece.
    """
    A, B = _check_factors(A, B)
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in)")
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"x has last dimension {x.shape[-1]}, but the factors need in = n1*n2 = {n1}*{n2} = {n1 * n2}")
    if order is None:
        mb, ma = kron_macs(m1, n1, m2, n2, r)
        order = "b" if mb <= ma else "a"
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} or None, got {order!r}")
    lead = x.shape[:-1]
    N = x.numel() // (n1 * n2)
    if chunk is None:
        per_token = m1 * m2 + r * max(n1 * m2, m1 * n2)
        chunk = max(64, (1 << 22) // per_token) if x.device.type == "cpu" else N
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
    x = x.reshape(N, n1 * n2)
    if N > chunk:
        Y = torch.cat([_kron_matmul(x[i:i + chunk], A, B, order) for i in range(0, N, chunk)])
    else:
        Y = _kron_matmul(x, A, B, order)
    return Y.reshape(*lead, m1 * m2)


def _kron_matmul(x, A, B, order):
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    N = x.shape[0]
    x = x.reshape(N, n1, n2)
    if order == "b":
        T = x.reshape(N * n1, n2) @ B.reshape(r * m2, n2).t()                     # (t j1, k i2)
        T = T.reshape(N, n1, r, m2).permute(0, 3, 2, 1).reshape(N * m2, r * n1)    # (t i2, k j1)
        Y = (T @ A.transpose(1, 2).reshape(r * n1, m1)).reshape(N, m2, m1).transpose(1, 2)
    elif order == "a":
        X = x.transpose(1, 2).reshape(N * n2, n1)                                  # (t j2, j1)
        T = X @ A.reshape(r * m1, n1).t()                                          # (t j2, k i1)
        T = T.reshape(N, n2, r, m1).permute(0, 3, 2, 1).reshape(N * m1, r * n2)    # (t i1, k j2)
        Y = T @ B.transpose(1, 2).reshape(r * n2, m2)                              # (t i1, i2)
    elif order == "b_bmm":
        T = (x.reshape(N * n1, n2) @ B.reshape(r * m2, n2).t()).reshape(N, n1, r, m2)
        if r > 1:
            T = T.permute(0, 2, 1, 3)                                              # (t, k, j1, i2)
        Y = torch.matmul(A.transpose(0, 1).reshape(m1, r * n1), T.reshape(N, r * n1, m2))
    elif order == "a_bmm":
        T = torch.matmul(A.reshape(r * m1, n1), x)                                 # (t, k i1, j2)
        if r > 1:
            T = T.reshape(N, r, m1, n2).permute(0, 2, 1, 3)                        # (t, i1, k, j2)
        Y = T.reshape(N * m1, r * n2) @ B.transpose(1, 2).reshape(r * n2, m2)
    else:
        Y = torch.einsum("kij,tjq,kpq->tip", A, x, B)
    return Y.reshape(N, m1 * m2)


class _KronRows(torch.autograd.Function):
    """Rows idx of sum_k A_k (x) B_k, (N, n1*n2). Row i = i1*m2 + i2 is sum_k A_k[i1] (x) B_k[i2]:
    per token a contraction over k of an (n1, r) by (r, n2) product. Tokens go in chunks so that
    the gathered factor rows (r * chunk * (n1 + n2)) stay bounded; only idx is saved for backward
    and the rows are gathered again there."""

    @staticmethod
    def forward(ctx, A, B, idx, chunk):
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        out = A.new_empty(idx.shape[0], n1 * n2)
        for s in range(0, idx.shape[0], chunk):
            i = idx[s:s + chunk]
            a = A[:, i // m2].permute(1, 2, 0)                   # (c, n1, r)
            b = B[:, i % m2].transpose(0, 1)                     # (c, r, n2)
            out[s:s + chunk] = torch.bmm(a, b).reshape(len(i), n1 * n2)
        ctx.save_for_backward(A, B, idx)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        A, B, idx = ctx.saved_tensors
        r, m1, n1 = A.shape
        _, m2, n2 = B.shape
        gA, gB = torch.zeros_like(A), torch.zeros_like(B)
        for s in range(0, idx.shape[0], ctx.chunk):
            i = idx[s:s + ctx.chunk]
            i1, i2 = i // m2, i % m2
            gc = g[s:s + ctx.chunk].to(A.dtype).reshape(len(i), n1, n2)
            # out_t = a_t b_t with a_t = A[:, i1]^T (n1, r), b_t = B[:, i2] (r, n2)
            ga = torch.bmm(gc, B[:, i2].transpose(0, 1).transpose(1, 2))        # (c, n1, r)
            gb = torch.bmm(A[:, i1].permute(1, 0, 2), gc)                        # (c, r, n2)
            gA.index_add_(1, i1, ga.permute(2, 0, 1).to(gA.dtype))      # (autocast may have made them bf16)
            gB.index_add_(1, i2, gb.transpose(0, 1).to(gB.dtype))
        return gA, gB, None, None


def kron_rows(A, B, idx, chunk=None):
    """Rows `idx` (an int tensor of any shape) of the dense matrix sum_k A_k (x) B_k, shape
    (*idx.shape, n1*n2), without building the matrix: the lookup of a factored embedding. Memory
    is bounded: `chunk` tokens at a time (default: about 4M elements of gathered factor rows), and
    backward keeps nothing but idx."""
    A, B = _check_factors(A, B)
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError("idx must be an integer tensor of row indices")
    flat = idx.reshape(-1).long()
    if chunk is None:
        chunk = max(1, (1 << 22) // (r * (n1 + n2) + n1 * n2))
    out = _KronRows.apply(A, B, flat, int(chunk))
    return out.reshape(*idx.shape, n1 * n2)


# -----------------------------------------------------------------------------
# nearest Kronecker product (Van Loan and Pitsianis)


def kron_svd(W, m1, n1):
    """Full thin SVD of the rearranged W, in float64: (U, S, Vh) with R = U diag(S) Vh.
    S holds the Kronecker spectrum: the r-term error^2 is sum(S[r:]**2)."""
    R = rearrange(W.detach(), m1, n1).to(torch.float64)
    return torch.linalg.svd(R, full_matrices=False)


def kron_tail_energy(W, m1, n1, r):
    """Squared Frobenius error of the best r-term fit: the sum of the dropped sigma^2."""
    check_pos_int("r", r)
    S = torch.linalg.svdvals(rearrange(W.detach(), m1, n1).to(torch.float64))
    return float((S[r:] ** 2).sum())


# -----------------------------------------------------------------------------
# Kronecker spectra of many shapes of one matrix (the budget solver's tail energies)
#
# The budget solver needs, for every factor shape (m1, n1) of W and r up to some k, the top-k
# squared singular values of the rearrangement R(m1, n1): the r-term tail is ||W||^2 minus the
# first r of them. A GPT-2 matrix has hundreds of shapes, and forming each R's Gram matrix from W
# costs 2*m*n*d flops (d: the smaller side of R). But the Grams nest. Take the B side,
# G_B(m2, n2) = R^T R, of size (m2*n2)^2:
#     G_B(m2, n2)[(i2, j2), (i2', j2')] = sum over the blocks of W[blk + (i2, j2)] W[blk + (i2', j2')].
# If m2 divides M2 and n2 divides N2, every (M2, N2) block is an (M2/m2) x (N2/n2) grid of (m2, n2)
# blocks, so G_B(m2, n2) is the sum of the diagonal sub-blocks of G_B(M2, N2): a reshape and a sum,
# no pass over W. The A side, R R^T, nests the same way (a finer A grid). So a few "parent" Grams,
# one GEMM over W each, give every shape's Gram exactly, and each Gram's eigenvalues are computed
# exactly (LAPACK). Random starts and Krylov methods were tried and rejected: on the flat spectra of
# random matrices they need nearly the full dimension to get tails right to 1e-6.


def rearranged_gram(W, m1, n1, side):
    """Gram matrix of Van Loan's rearrangement in float64: side 'a' gives R R^T ((m1*n1)^2, one
    entry per pair of blocks), side 'b' gives R^T R ((m2*n2)^2, one per pair of in-block positions)."""
    R = rearrange(W.detach(), m1, n1).to(torch.float64)
    return R @ R.t() if side == "a" else R.t() @ R


def gram_from_parent(P, parent, child, side):
    """The Gram of a coarser shape from a finer one (see above), exactly. Side 'b': parent and
    child are B shapes (M2, N2), (m2, n2) with m2 | M2, n2 | N2. Side 'a': A shapes (M1, N1),
    (m1, n1) with m1 | M1, n1 | N1."""
    (M, N), (p, q) = parent, child
    if M % p or N % q:
        raise ValueError(f"{side}-side shape {child} does not divide {parent}")
    a, b = M // p, N // q
    if side == "b":      # B index (u*m2 + i2, v*n2 + j2): sum over the u = u', v = v' sub-blocks
        G = torch.einsum("uivjukvl->ijkl", P.reshape(a, p, b, q, a, p, b, q))
    else:                # A index (i1*a + u, j1*b + v)
        G = torch.einsum("iujvkulv->ijkl", P.reshape(p, a, q, b, p, a, q, b))
    return G.reshape(p * q, p * q)


def top_eigenvalues(G, k):
    """The k largest eigenvalues of a symmetric positive semi-definite G, descending, float64, on
    G's device. On the CPU through scipy's LAPACK syevd driver, which is faster there than torch's
    eigvalsh."""
    if G.device.type != "cpu":
        return torch.linalg.eigvalsh(G).flip(0)[:k].clamp_min(0).cpu()
    from scipy.linalg import eigh
    w = eigh(G.numpy(), eigvals_only=True, driver="evd")
    return torch.as_tensor(w[::-1][:k].copy()).clamp_min(0)


def kron_spectra(W, shapes, dmax=2048, progress=None):
    """For each (m1, n1, k) in shapes: the k largest squared singular values of rearrange(W, m1, n1),
    float64, descending, on the CPU. Returns {(m1, n1): values}. The work runs on W's device.
    Shapes are taken largest Gram first; each Gram comes from the smallest earlier one it nests in,
    or from W (one GEMM) when none does. A shape whose smaller side exceeds dmax is refused
    (ValueError): its Gram alone costs 2*m*n*d flops and d^3 to diagonalize. progress(1) is called
    after every shape."""
    check_matrix(W)
    Wd = W.detach().to(torch.float64)
    m, n = Wd.shape
    jobs = []
    for m1, n1, k in shapes:
        m2, n2 = split_shape(m, n, m1, n1)
        side = "a" if m1 * n1 <= m2 * n2 else "b"
        key = (m1, n1) if side == "a" else (m2, n2)
        if key[0] * key[1] > dmax:
            raise ValueError(f"shape ({m1}, {n1}) of a {m}x{n} matrix: its rearrangement's smaller side "
                             f"{key[0] * key[1]} exceeds dmax = {dmax}")
        jobs.append((side, key, (m1, n1), k))
    jobs.sort(key=lambda j: -j[1][0] * j[1][1])
    parents, out = {"a": {}, "b": {}}, {}
    for side, key, shape, k in jobs:
        fits = [p for p in parents[side] if p[0] % key[0] == 0 and p[1] % key[1] == 0]
        if fits:
            p = min(fits, key=lambda c: c[0] * c[1])
            G = gram_from_parent(parents[side][p], p, key, side)
        else:
            G = rearranged_gram(Wd, *key, "a") if side == "a" else rearranged_gram(Wd, m // key[0], n // key[1], "b")
            parents[side][key] = G
        out[shape] = top_eigenvalues(G, k)
        if progress:
            progress(1)
    return out


def _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2):
    """Balanced split sqrt(sigma) into A and B; terms beyond the Kronecker rank get A_k = 0 and a
    unit B_k (the fit stays exact, and A_k still receives gradient when trained)."""
    k = S.shape[0]
    use = min(r, k)
    s = S[:use].sqrt()
    U, Vh = U[:, :use].clone(), Vh[:use].clone()
    # deterministic signs: the largest-magnitude entry of each vec(B_k) is positive
    idx = Vh.abs().argmax(dim=1)
    sign = torch.sign(Vh[torch.arange(use), idx])
    sign[sign == 0] = 1
    U, Vh = U * sign, Vh * sign[:, None]
    A = (U * s).t().reshape(use, m1, n1)
    B = (Vh * s[:, None]).reshape(use, m2, n2)
    if r > use:
        extra = r - use
        A = torch.cat([A, A.new_zeros(extra, m1, n1)])
        unit = Vh[torch.arange(extra) % use] if use else Vh.new_ones(extra, m2 * n2) / math.sqrt(m2 * n2)
        B = torch.cat([B, unit.reshape(extra, m2, n2)])
    return A, B


def nearest_kronecker(W, m1, n1, r=1):
    """The Frobenius-optimal r-term approximation W ~ sum_k A_k (x) B_k.

    Exact full SVD of Van Loan's rearranged matrix in float64 (no randomized SVD), split as
    A_k = sqrt(s_k) u_k, B_k = sqrt(s_k) v_k. The squared error equals sum(s[r:]**2); with r at or
    above the Kronecker-rank ceiling min(m1*n1, m2*n2) the fit is exact.
    Returns (A, B) of shapes (r, m1, n1), (r, m2, n2) in W's dtype and device.
    """
    check_matrix(W)
    check_pos_int("r", r)
    m2, n2 = split_shape(W.shape[0], W.shape[1], m1, n1)
    U, S, Vh = kron_svd(W, m1, n1)
    A, B = _factors_from_svd(U, S, Vh, r, m1, n1, m2, n2)
    return A.to(W.dtype), B.to(W.dtype)


# -----------------------------------------------------------------------------
# pruning init (Krony-PT), generalized


def prune_kronecker(W, m1, n1, r=1, select="energy", fill=0.0):
    """Pruning init: term k keeps one (row offset p, column offset q) of every (m2, n2) block,
      A_k[i1, j1] = W[i1*m2 + p, j1*n2 + q],  B_k = one-hot at (p, q),
    so A_k is a strided sub-matrix of W and sum over all m2*n2 positions is W exactly.

    Which positions for r < m2*n2:
      select='energy' (default): the r positions whose sub-matrices hold the most energy
        ||A_pq||^2. The error of the pruned sum is exactly the energy of the dropped positions
        (the one-hot terms are orthogonal), so this choice is Frobenius-optimal within the family.
      select='first': positions in row-major order starting at (0, 0), as Krony-PT does
        (A = W[0::m2, 0::n2]: for GPT-2's c_fc the MLP reads only the even residual coordinates).
    fill: the other entries of each B_k (Krony-PT's paper uses B = [1, 0.1]: fill=0.1); 0 keeps the
      exact sub-matrix semantics. With fill != 0 the r = m2*n2 fit is no longer exact.
    """
    check_matrix(W)
    check_pos_int("r", r)
    m2, n2 = split_shape(W.shape[0], W.shape[1], m1, n1)
    if r > m2 * n2:
        raise ValueError(f"prune_kronecker keeps one of the m2*n2 = {m2 * n2} block positions per term, "
                         f"so r must be at most {m2 * n2}, got r={r}")
    if select not in ("energy", "first"):
        raise ValueError(f"select must be 'energy' or 'first', got {select!r}")
    if not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number, got {fill!r}")
    blocks = W.reshape(m1, m2, n1, n2)                          # [i1, p, j1, q]
    if select == "energy":
        energy = blocks.to(torch.float64).pow(2).sum(dim=(0, 2)).reshape(-1)
        pos = torch.argsort(energy, descending=True, stable=True)[:r].tolist()
    else:
        pos = list(range(r))
    A = torch.stack([blocks[:, p // n2, :, p % n2] for p in pos])
    B = W.new_full((r, m2 * n2), float(fill))
    B[torch.arange(r), torch.tensor(pos)] = 1.0
    return A.contiguous(), B.reshape(r, m2, n2)


# -----------------------------------------------------------------------------
# data-aware fit: the nearest Kronecker sum in the metric of the layer's inputs
#
# A layer computes y = W x. With C = E[x x^T] the second moment of its inputs, the expected squared
# error of the outputs is E||(W - W_hat) x||^2 = tr((W - W_hat) C (W - W_hat)^T): the Frobenius error
# weighted by C. SVD-LLM (Wang et al. 2024, arXiv 2403.07378) minimizes it for rank-r factors in
# closed form: with C = L L^T, truncate the SVD of W L, then multiply by L^-1 on the right. For a sum
# of Kronecker products the closed form exists only when C itself is a Kronecker product
# C1 (x) C2 = (L1 (x) L2)(L1 (x) L2)^T, since (A (x) B)(L1 (x) L2) = (A L1) (x) (B L2): Van Loan on
# W (L1 (x) L2), then A_k L1^-1 and B_k L2^-1. The low-rank family (n1 = 1 or n2 = 1) is always such a
# case. For a general C the objective is quadratic in A for fixed B and in B for fixed A, so
# alternating least squares descends monotonically; it starts from the better (in the weighted
# objective) of Van Loan's fit and the closed form for the nearest Kronecker product C1 (x) C2 of C.
#
# Index conventions of the blocks: W4[i, p, j, q] = W[i*m2 + p, j*n2 + q] (i, j index A; p, q index
# B), C4[j, q, l, s] = C[j*n2 + q, l*n2 + s], A[k, i, j], B[k, p, q].


def _check_cov(cov, n):
    if not isinstance(cov, torch.Tensor) or tuple(cov.shape) != (n, n) or not cov.is_floating_point():
        got = tuple(cov.shape) if isinstance(cov, torch.Tensor) else type(cov).__name__
        raise ValueError(f"cov must be a floating-point ({n}, {n}) matrix (the inputs' second moment), got {got}")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("cov has non-finite entries")


def weighted_error(W, A, B, cov):
    """tr((W - sum_k A_k (x) B_k) C (W - sum_k A_k (x) B_k)^T) in float64: the expected squared error of
    the layer's outputs for inputs of second moment C (C = I: the squared Frobenius error)."""
    check_matrix(W)
    A, B = _check_factors(A, B)
    _check_cov(cov, W.shape[1])
    return _objective(W.detach().double(), cov.detach().double().to(W.device), A.double(), B.double())


def _objective(Wd, C, A, B):
    """tr(E C E^T) with E = W - W_hat formed densely: O(m n^2) time and O(m n) memory whatever r."""
    E = Wd - kron_dense(A, B)
    return float(((E @ C) * E).sum())


def _psd_solve(H, rhs):
    """H X = rhs for a symmetric positive semi-definite H: Cholesky, or, when H is singular (terms that
    are linearly dependent, or a singular C without damping), the minimum-norm least-squares solution."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    w, V = torch.linalg.eigh(H)
    keep = w > w.max().clamp_min(0) * H.shape[0] * torch.finfo(H.dtype).eps
    return V[:, keep] @ ((V[:, keep].t() @ rhs) / w[keep, None])


def _gram_c(A, C4):
    """H[k, q, K, s] = sum_{i, j, l} A[k, i, j] A[K, i, l] C4[j, q, l, s], contracted in the order
    whose intermediate is smaller (A A^T over i first: r^2 n1^2 numbers; or A with C4 first:
    r m1 n1 n2^2), so that neither a wide A (B 2 x 512's partner) nor a tall one builds gigabytes."""
    r, m1, n1 = A.shape
    n2 = C4.shape[1]
    if r * r * n1 * n1 <= r * m1 * n1 * n2 * n2:
        return torch.einsum("kjKl,jqls->kqKs", torch.einsum("kij,Kil->kjKl", A, A), C4)
    return torch.einsum("Kil,kiqls->kqKs", A, torch.einsum("kij,jqls->kiqls", A, C4))


def _solve_a(WC4, C4, B):
    """The A minimizing the weighted error for fixed B: one (r*n1)-sized system, m1 right-hand sides
    (the Hessian is the same for every block row i)."""
    r, n1, m1 = B.shape[0], C4.shape[0], WC4.shape[0]
    H = _gram_c(B, C4.permute(1, 0, 3, 2)).reshape(r * n1, r * n1)
    rhs = torch.einsum("kpq,ipjq->kji", B, WC4).reshape(r * n1, m1)
    return _psd_solve(H, rhs).reshape(r, n1, m1).transpose(1, 2)


def _b_system(WC4, C4, A):
    """The normal equations H vec(B) = rhs of the B-step for fixed A: H (r*n2, r*n2), rhs (r*n2, m2).
    The weighted error of any B is then tr(W C W^T) - 2 <vec(B), rhs> + <vec(B), H vec(B)>."""
    r, n2, m2 = A.shape[0], C4.shape[1], WC4.shape[1]
    H = _gram_c(A, C4).reshape(r * n2, r * n2)
    rhs = torch.einsum("kij,ipjq->kqp", A, WC4).reshape(r * n2, m2)
    return H, rhs


EXACT_SOLVE = 1024     # ALS systems up to this size are solved exactly; above, by conjugate gradients


def _als_step(WC4, C4, A, B, side, cg_iters=25):
    """One ALS half-step: the factor `side` ("a" or "b") minimizing the weighted error with the other
    fixed. Exact (_solve_a, _b_system) when its system has at most EXACT_SOLVE unknowns per row;
    above, cg_iters conjugate-gradient steps on the same normal equations, warm-started from the
    current factor: CG's iterates descend the quadratic monotonically, so ALS stays monotone, and
    its matrix-vector product (form W_hat, times C, contract) costs O(r m n + m n^2) where the exact
    system costs O((r n2)^3) (r 57 on B 2 x 128: 102 s exact per matrix, docs/INIT.md)."""
    r, (n1, n2) = A.shape[0], (C4.shape[0], C4.shape[1])
    if side == "a" and r * n1 <= EXACT_SOLVE:
        return _solve_a(WC4, C4, B)
    if side == "b" and r * n2 <= EXACT_SOLVE:
        H, rhs = _b_system(WC4, C4, A)
        return _psd_solve(H, rhs).reshape(r, n2, -1).transpose(1, 2)

    def hess(X):                           # the normal equations' operator on the free factor
        Ah, Bh = (X, B) if side == "a" else (A, X)
        WC = torch.einsum("ipjq,jqls->ipls", torch.einsum("kij,kpq->ipjq", Ah, Bh), C4)
        return torch.einsum("kps,ipls->kil", B, WC) if side == "a" else torch.einsum("kil,ipls->kps", A, WC)
    rhs = torch.einsum("kps,ipls->kil", B, WC4) if side == "a" else torch.einsum("kil,ipls->kps", A, WC4)
    x = (A if side == "a" else B).clone()
    res = rhs - hess(x)
    p, rs = res.clone(), float((res * res).sum())
    stop = 1e-20 * max(float((rhs * rhs).sum()), 1e-300)
    for _ in range(cg_iters):
        if rs <= stop:
            break
        Hp = hess(p)
        alpha = rs / max(float((p * Hp).sum()), 1e-300)
        x, res = x + alpha * p, res - alpha * Hp
        rs_new = float((res * res).sum())
        p, rs = res + (rs_new / rs) * p, rs_new
    return x


def _top_kron_term(C, n1, n2):
    """The nearest single Kronecker product C1 (x) C2 to C (Van Loan, r = 1), both factors symmetric and
    signed so that C1's trace is positive. Exact eigendecomposition of the smaller Gram up to 512; a
    few subspace iterations above (this is only a starting point for the iteration)."""
    R = rearrange(C, n1, n1)                                   # (n1*n1, n2*n2)
    if min(R.shape) <= 512:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        u, s, v = U[:, 0], S[0], Vh[0]
    else:
        U, S, V = torch.svd_lowrank(R, q=6, niter=8)
        u, s, v = U[:, 0], S[0], V[:, 0]
    C1, C2 = (u * s.sqrt()).reshape(n1, n1), (v * s.sqrt()).reshape(n2, n2)
    sign = 1.0 if float(C1.trace()) >= 0 else -1.0
    return sign * (C1 + C1.t()) / 2, sign * (C2 + C2.t()) / 2


def _kron_whitened_start(W4, C, m1, n1, r):
    """The closed-form fit for the nearest Kronecker product of C (exact when C is one), or None when
    that product is not positive definite."""
    m2, n2 = W4.shape[1], W4.shape[3]
    C1, C2 = _top_kron_term(C, n1, n2)
    L1, info1 = torch.linalg.cholesky_ex(C1)
    L2, info2 = torch.linalg.cholesky_ex(C2)
    if int(info1) or int(info2):
        return None
    WL = torch.einsum("ipjq,jl,qs->ipls", W4, L1, L2).reshape(m1 * m2, n1 * n2)
    A, B = nearest_kronecker(WL, m1, n1, r)
    # A_k L1 = A'_k  =>  A_k = A'_k L1^-1 (a triangular solve from the right); the same for B
    A = torch.linalg.solve_triangular(L1, A, upper=False, left=False)
    B = torch.linalg.solve_triangular(L2, B, upper=False, left=False)
    return A, B


def _balance(A, B):
    """Rescale each term so that ||A_k|| = ||B_k|| (as Van Loan's sqrt(sigma) split does), and sign it
    so that the largest-magnitude entry of B_k is positive."""
    a, b = A.flatten(1).norm(dim=1), B.flatten(1).norm(dim=1)
    s = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
    flat = B.flatten(1)
    sign = torch.sign(flat[torch.arange(flat.shape[0]), flat.abs().argmax(dim=1)])
    sign[sign == 0] = 1
    return A * (s * sign)[:, None, None], B * (sign / s)[:, None, None]


def whitened_kronecker(W, m1, n1, r=1, cov=None, iters=30, tol=1e-4, damp=0.0, start="best", log=None):
    """The r-term W_hat = sum_k A_k (x) B_k minimizing tr((W - W_hat) C (W - W_hat)^T), C = cov: the
    expected output error of the layer x -> W x for inputs of second moment C (see the section above).

    W is (m, n) in nn.Linear orientation, cov (n, n) symmetric positive semi-definite (cov None: the
    identity, Van Loan's fit). Computed in float64 on W's device. Starts from the better of Van Loan and
    the closed form for the nearest Kronecker product of C, then alternates least-squares solves for A
    (size r*n1) and B (size r*n2: exact up to EXACT_SOLVE unknowns, warm-started conjugate gradients
    above, _als_step) until the objective improves by less than `tol`
    (relative) or `iters` rounds. The objective never increases, and the best iterate is returned, so
    the fit is never worse than Van Loan's in the weighted objective; with C = I it is Van Loan's
    optimum, and with C = C1 (x) C2 (the low-rank family always) the closed form is optimal.

    damp: the solves use C + damp * mean(diag C) * I (a ridge towards Van Loan's Frobenius fit, as
    GPTQ damps its Hessian); 0 gives the exact optimum. A singular C without damping is handled by
    minimum-norm solves. The reported and returned objective is always the undamped one.
    start: "best" (above) or "vl" (the iteration from Van Loan's fit alone).
    log(it, err): called with the weighted error after the start (it = 0) and every iteration.
    Returns (A, B) of shapes (r, m1, n1), (r, m2, n2) in W's dtype and device."""
    check_matrix(W)
    check_pos_int("r", r)
    m, n = W.shape
    m2, n2 = split_shape(m, n, m1, n1)
    if cov is None:
        return nearest_kronecker(W, m1, n1, r)
    _check_cov(cov, n)
    if not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    Wd = W.detach().double()
    C = cov.detach().double().to(W.device)
    C = (C + C.t()) / 2
    Cd = C + damp * C.diagonal().mean() * torch.eye(n, dtype=C.dtype, device=C.device) if damp else C
    W4 = Wd.reshape(m1, m2, n1, n2)
    WCd4, Cd4 = (Wd @ Cd).reshape(m1, m2, n1, n2), Cd.reshape(n1, n2, n1, n2)
    if start not in ("best", "vl"):
        raise ValueError(f"start must be 'best' or 'vl', got {start!r}")
    starts = [tuple(t.double() for t in nearest_kronecker(Wd, m1, n1, r))]
    if start == "best":
        starts.append(_kron_whitened_start(W4, Cd, m1, n1, r))
    best = min(((_objective(Wd, C, *s), s) for s in starts if s is not None), key=lambda t: t[0])
    A, B = best[1]
    if log:
        log(0, best[0])
    if start == "best" and min(n1, n2) == 1:     # C = c (x) C2 or C1 (x) c: the closed form is optimal
        iters = 0
    prev = best[0]
    for it in range(1, iters + 1):
        A = _als_step(WCd4, Cd4, A, B, "a")
        B = _als_step(WCd4, Cd4, A, B, "b")
        err = _objective(Wd, C, A, B)
        if log:
            log(it, err)
        if err < best[0]:
            best = (err, (A, B))
        if prev - err <= tol * max(abs(prev), 1e-300):   # with damping, also stops when the true error rises
            break
        prev = err
    A, B = _balance(*best[1])
    return A.to(W.dtype), B.to(W.dtype)


# -----------------------------------------------------------------------------
# permutation search (TQCompressor's W ~ P (sum A (x) B) Q), done as a local search with exact moves


def _fit_error(W, rows, cols, m1, n1, r):
    return kron_tail_energy(W[rows][:, cols], m1, n1, r)


def _fit_parts(Wp, m1, n1, r):
    """Top-r of the rearranged matrix: (U*S, Vh) with R_hat = (U*S) @ Vh."""
    U, S, Vh = kron_svd(Wp, m1, n1)
    return U[:, :r] * S[:r], Vh[:r]


def _lap(cost):
    """Row i of the cost matrix is a slot, column j a candidate; returns perm with perm[i] = j."""
    from scipy.optimize import linear_sum_assignment
    _, col = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(col, dtype=torch.long)


def _move_lap(W, rows, cols, m1, n1, r):
    """Rows reassigned by an exact linear assignment to the rows of the current fit W_hat:
    maximize sum_i <W_hat[i], W[rows'[i], cols]> (the row norms of W are fixed)."""
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    US, Vh = _fit_parts(W[rows][:, cols], m1, n1, r)
    Wh = (US @ Vh).reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)
    return _lap(-(Wh @ W[:, cols].t()))


def _move_member(W, rows, cols, m1, n1, r):
    """Rows reassigned to blocks, whatever their order inside a block: the cost of row w in block
    i1 is minus its energy captured by the span of the fitted rows of that block."""
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    if m1 == 1 or m2 == 1:
        return rows
    US, Vh = _fit_parts(W[rows][:, cols], m1, n1, r)
    Wh = (US @ Vh).reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1, m2, n1 * n2)
    Q, _ = torch.linalg.qr(Wh.transpose(1, 2))                              # (m1, n, m2)
    E = torch.einsum("wn,anp->wap", W[:, cols], Q).pow(2).sum(2)          # (m, m1)
    slot_block = torch.arange(m1, device=E.device).repeat_interleave(m2)
    order = _lap(-E[:, slot_block].t())
    # keep the rows that stay in their block in their current order, to leave within-block moves alone
    new = order.reshape(m1, m2)
    old = rows.reshape(m1, m2)
    for a in range(m1):
        if set(new[a].tolist()) == set(old[a].tolist()):
            new[a] = old[a]
    return new.reshape(-1)


_MAX_WITHIN = 120     # 5!: exhaustive within-block orders up to blocks of five rows


def _move_within(W, rows, cols, m1, n1, r):
    """Every block's rows reordered exhaustively (m2! orders), each order scored with the A
    coefficients refit by least squares onto the current B basis (the captured energy)."""
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    if m2 == 1 or math.factorial(m2) > _MAX_WITHIN:
        return rows
    _, Vh = _fit_parts(W[rows][:, cols], m1, n1, r)
    Bb = Vh.reshape(-1, m2, n2)                                   # orthonormal basis of the B's
    T = W[rows][:, cols].to(torch.float64).reshape(m1, m2, n1, n2)
    perms = list(itertools.permutations(range(m2)))
    score = torch.stack([torch.einsum("apbq,kpq->abk", T[:, list(p)], Bb).pow(2).sum((1, 2))
                         for p in perms], dim=1)                  # (m1, m2!)
    choice = score.argmax(1).cpu()
    P = torch.tensor(perms, dtype=torch.long)[choice]            # (m1, m2)
    return torch.gather(rows.reshape(m1, m2), 1, P).reshape(-1)


def _group_start(W, size):
    """Structure-aware start: rows sharing a block index i1 have |cos| = |cos(B_i2, B_i2')|, large
    when B is small, while unrelated rows correlate at about 1/sqrt(n1). Greedily form groups of
    `size` rows of high mutual |cos|, seeded by the rows of most energy."""
    m = W.shape[0]
    if size == 1 or size == m:
        return torch.arange(m)
    X = W.detach().to(torch.float64)
    X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    S = (X @ X.t()).abs().cpu()          # the greedy loop runs on the CPU whatever W's device
    S.fill_diagonal_(-1.0)
    free = torch.ones(m, dtype=torch.bool)
    order = []
    for seed in torch.argsort(W.detach().to(torch.float64).pow(2).sum(1), descending=True).tolist():
        if not free[seed]:
            continue
        group = [seed]
        free[seed] = False
        acc = S[seed].clone()
        while len(group) < size:
            j = int(acc.masked_fill(~free, -math.inf).argmax())
            group.append(j)
            free[j] = False
            acc += S[j]
        order += group
    return torch.tensor(order, dtype=torch.long)


def _descend(W, rows, cols, m1, n1, r, err, max_iters, log, it0, tag):
    """Apply the exact moves to rows and to columns until none improves; returns the local minimum."""
    Wt = W.t()
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    # with one block (m1 = 1) or blocks of one row (m2 = 1) a row permutation only permutes the rows
    # of B or of A: the error cannot change, so that side is not searched (this is what makes a
    # 50257-row embedding with B of one row tractable)
    search_rows, search_cols = _permutable(m1, m2), _permutable(n1, n2)
    it = it0
    for _ in range(max_iters):
        improved = False
        for name, move in (("lap", _move_lap), ("member", _move_member), ("within", _move_within)):
            if search_rows:
                new_rows = move(W, rows, cols, m1, n1, r)
                e = _fit_error(W, new_rows, cols, m1, n1, r)
                if e < err * (1 - 1e-12):
                    rows, err, improved = new_rows, e, True
            if search_cols:
                new_cols = move(Wt, cols, rows, n1, m1, r)
                e = _fit_error(W, rows, new_cols, m1, n1, r)
                if e < err * (1 - 1e-12):
                    cols, err, improved = new_cols, e, True
        it += 1
        if log:
            log(it, err, tag)
        if not improved or err == 0.0:
            break
    return rows, cols, err, it


def _permutable(m1, m2):
    return m1 > 1 and m2 > 1


def _kick(rows, m1, m2, frac, rng):
    """Perturb: shuffle the order inside a fraction of the blocks and swap rows between random
    pairs of blocks."""
    if not _permutable(m1, m2):
        return rows
    P = rows.reshape(m1, m2).clone()
    k = max(1, int(frac * m1))
    for a in rng.sample(range(m1), k):
        P[a] = P[a][torch.randperm(m2)]
    for _ in range(k):
        a, b = rng.randrange(m1), rng.randrange(m1)
        p, q = rng.randrange(m2), rng.randrange(m2)
        P[a, p], P[b, q] = P[b, q].clone(), P[a, p].clone()
    return P.reshape(-1)


def permuted_kronecker(W, m1, n1, r=1, max_iters=30, kicks=4, kick_frac=0.1, temperature=0.02,
                       seed=0, log=None):
    """W[rows][:, cols] ~ sum_k A_k (x) B_k with row and column permutations found by search.

    Local search with three exact moves, each applied to rows and to columns and kept only if the
    Van Loan error (exact SVD) falls:
      lap     a linear assignment of rows to the rows of the current fit (TQCompressor's step);
      member  a linear assignment of rows to blocks, scored by the energy the block's fitted span
              captures (blind to the order inside the block, so it moves whole memberships);
      within  every block's rows reordered exhaustively with A refit by least squares (m2 <= 5).
    Plain alternation of the first move stalls in a local minimum; the other two and the starts
    are what escape it. Starts: identity and a structure-aware grouping (_group_start); then
    `kicks` rounds of iterated local search (perturb the best, descend, accept by annealing).
    The identity permutation is always a candidate, so the result is never worse than plain
    Van Loan. log(iteration, squared_error, phase) is called after every iteration.
    Returns (A, B, rows, cols).
    """
    check_matrix(W)
    check_pos_int("r", r)
    m2, n2 = split_shape(W.shape[0], W.shape[1], m1, n1)
    check_pos_int("max_iters", max_iters)
    if isinstance(kicks, bool) or not isinstance(kicks, int) or kicks < 0:
        raise ValueError(f"kicks must be a non-negative integer, got {kicks!r}")
    if not (0 < kick_frac <= 1):
        raise ValueError(f"kick_frac must be in (0, 1], got {kick_frac!r}")
    Wd = W.detach().to(torch.float64)
    m, n = Wd.shape
    rng = random.Random(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ident_r, ident_c = torch.arange(m), torch.arange(n)
        best = (_fit_error(Wd, ident_r, ident_c, m1, n1, r), ident_r, ident_c)
        if log:
            log(0, best[0], "identity")
        it = 0
        grouped = (_group_start(Wd, m2) if _permutable(m1, m2) else ident_r,
                   _group_start(Wd.t(), n2) if _permutable(n1, n2) else ident_c)
        starts = [(ident_r, ident_c, "identity"), (*grouped, "grouped")]
        for rows, cols, tag in starts:
            e = _fit_error(Wd, rows, cols, m1, n1, r)
            rows, cols, e, it = _descend(Wd, rows, cols, m1, n1, r, e, max_iters, log, it, tag)
            if e < best[0]:
                best = (e, rows, cols)
        cur = best
        for k in range(kicks):
            if best[0] == 0.0:
                break
            rows = _kick(cur[1], m1, m2, kick_frac, rng)
            cols = _kick(cur[2], n1, n2, kick_frac, rng)
            e = _fit_error(Wd, rows, cols, m1, n1, r)
            rows, cols, e, it = _descend(Wd, rows, cols, m1, n1, r, e, max_iters, log, it, f"kick{k + 1}")
            T = temperature * (1 - k / max(kicks, 1))
            if e < cur[0] or (T > 0 and rng.random() < math.exp(-(e - cur[0]) / (T * cur[0] + 1e-300))):
                cur = (e, rows, cols)
            if e < best[0]:
                best = (e, rows, cols)
    finally:
        torch.random.set_rng_state(torch_state)
    _, rows, cols = best
    A, B = nearest_kronecker(W[rows.to(W.device)][:, cols.to(W.device)], m1, n1, r)
    return A, B, rows.to(W.device), cols.to(W.device)


def relative_error(W, A, B, rows=None, cols=None):
    """||W - approx|| / ||W|| in float64, for the factors of any method above."""
    check_matrix(W)
    Wd, A, B = W.detach().to(torch.float64), A.detach(), B.detach()
    if rows is not None:
        Wd = Wd[rows]
    if cols is not None:
        Wd = Wd[:, cols]
    K = kron_dense(A.to(torch.float64), B.to(torch.float64))
    if K.shape != Wd.shape:
        raise ValueError(f"factors give a {tuple(K.shape)} matrix, W is {tuple(Wd.shape)}")
    return float((Wd - K).norm() / Wd.norm().clamp_min(1e-300))
