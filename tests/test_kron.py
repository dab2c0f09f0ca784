"""The math in kron.py: exactness where the math says so, and clear errors."""

import time

import pytest
import torch

import kron


def planted(r, m1, n1, m2, n2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, m1, n1, generator=g, dtype=dtype)
    B = torch.randn(r, m2, n2, generator=g, dtype=dtype)
    return A, B, kron.kron_dense(A, B)


def test_kron_dense_matches_torch_kron():
    A, B, W = planted(3, 4, 5, 6, 2)
    ref = sum(torch.kron(A[k], B[k]) for k in range(3))
    assert torch.allclose(W, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("r,m1,n1,m2,n2", [(1, 8, 6, 12, 8), (3, 8, 6, 12, 8), (2, 1, 7, 5, 1), (4, 16, 4, 3, 9)])
def test_nearest_kronecker_recovers_planted_sum(r, m1, n1, m2, n2):
    _, _, W = planted(r, m1, n1, m2, n2, seed=r)
    A, B = kron.nearest_kronecker(W, m1, n1, r)
    assert A.shape == (r, m1, n1) and B.shape == (r, m2, n2)
    assert (kron.kron_dense(A, B) - W).abs().max() < 1e-10 * W.abs().max()


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("r", [1, 2, 5])
def test_error_equals_singular_value_tail(kind, r):
    g = torch.Generator().manual_seed(r)
    if kind == "random":
        W = torch.randn(96, 48, generator=g, dtype=torch.float64)
    else:   # a planted 3-term sum plus a rank-2 perturbation plus noise
        _, _, W = planted(3, 8, 6, 12, 8, seed=r)
        W = W + torch.randn(96, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 48, generator=g, dtype=torch.float64) \
            + 0.01 * torch.randn(96, 48, generator=g, dtype=torch.float64)
    A, B = kron.nearest_kronecker(W, 8, 6, r)
    err2 = float(((W - kron.kron_dense(A, B)) ** 2).sum())
    S = torch.linalg.svdvals(kron.rearrange(W, 8, 6))
    tail = float((S[r:] ** 2).sum())
    assert err2 == pytest.approx(tail, rel=1e-9)
    assert kron.kron_tail_energy(W, 8, 6, r) == pytest.approx(tail, rel=1e-12)
    # and no r-term fit does better than the optimum: a perturbed fit is worse
    A2 = A + 1e-3 * torch.randn(A.shape, generator=g, dtype=A.dtype)
    assert float(((W - kron.kron_dense(A2, B)) ** 2).sum()) > err2


def test_balanced_scaling_and_dtype():
    W = torch.randn(48, 20, dtype=torch.float32)
    A, B = kron.nearest_kronecker(W, 6, 4, 2)
    assert A.dtype == torch.float32 and B.dtype == torch.float32
    for k in range(2):   # sqrt(sigma) split: ||A_k|| = ||B_k||
        assert A[k].norm().item() == pytest.approx(B[k].norm().item(), rel=1e-5)


def test_r_above_kronecker_rank_is_exact():
    W = torch.randn(12, 10, dtype=torch.float64)
    ceiling = min(6 * 5, 2 * 2)    # m1*n1 = 30, m2*n2 = 4
    A, B = kron.nearest_kronecker(W, 6, 5, ceiling + 3)
    assert A.shape[0] == ceiling + 3
    assert (kron.kron_dense(A, B) - W).abs().max() < 1e-12
    assert torch.all(A[ceiling:] == 0) and torch.all(B[ceiling:].flatten(1).norm(dim=1) > 0)


def test_prune_with_all_positions_is_exact():
    W = torch.randn(24, 18, dtype=torch.float64)
    A, B = kron.prune_kronecker(W, 6, 3, 4 * 6)
    assert torch.equal(kron.kron_dense(A, B), W)


def test_prune_first_is_kronypt_strided_submatrix():
    W = torch.randn(3072 // 8, 768 // 8)       # c_fc-like, A (m1, n1), B (2, 1)
    A, B = kron.prune_kronecker(W, 192, 96, 1, select="first")
    assert torch.equal(A[0], W[0::2, :])
    assert torch.equal(B[0], torch.tensor([[1.0], [0.0]]))
    _, B = kron.prune_kronecker(W, 192, 96, 1, select="first", fill=0.1)
    assert torch.allclose(B[0], torch.tensor([[1.0], [0.1]]))


def test_prune_energy_selection_is_optimal_in_family():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    W[1::4, 2::3] *= 10           # position (1, 2) of every 4x3 block holds the energy
    A, B = kron.prune_kronecker(W, 4, 4, 1)
    assert B[0, 1, 2] == 1 and B[0].sum() == 1
    blocks = W.reshape(4, 4, 4, 3)
    errs = [float(((W - kron.kron_dense(blocks[:, p, :, q][None], torch.eye(12, dtype=W.dtype)[p * 3 + q].reshape(1, 4, 3))) ** 2).sum())
            for p in range(4) for q in range(3)]
    chosen = float(((W - kron.kron_dense(A, B)) ** 2).sum())
    assert chosen == pytest.approx(min(errs))


@pytest.mark.parametrize("order", [None, *kron.ORDERS])
@pytest.mark.parametrize("r,m1,n1,m2,n2,lead", [(1, 4, 3, 5, 2, (7,)), (3, 6, 8, 2, 4, (2, 5)),
                                                 (2, 1, 6, 9, 1, (3, 1, 4)), (4, 16, 4, 3, 9, ()),
                                                 (1, 64, 32, 48, 24, (2,))])
def test_kron_matmul_equals_dense(order, r, m1, n1, m2, n2, lead):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        A, B, W = planted(r, m1, n1, m2, n2, seed=m1, dtype=dtype)
        x = torch.randn(*lead, n1 * n2, dtype=dtype)
        y = kron.kron_matmul(x, A, B, order)
        ref = x @ W.t()
        assert y.shape == (*lead, m1 * m2)
        assert ((y - ref).abs().max() / ref.abs().max().clamp_min(1)) < tol


def test_kron_matmul_chunks_equal_one_piece():
    A, B, W = planted(2, 6, 4, 5, 3, seed=4)
    x = torch.randn(3, 333, 12, dtype=torch.float64)
    for order in kron.ORDERS:
        whole = kron.kron_matmul(x, A, B, order, chunk=10_000)
        assert torch.allclose(kron.kron_matmul(x, A, B, order, chunk=64), whole, atol=1e-12)
        assert torch.allclose(whole, x @ W.t(), atol=1e-10)
    with pytest.raises(ValueError, match=r"chunk must be a positive integer or None, got 0"):
        kron.kron_matmul(x, A, B, chunk=0)


def test_kron_matmul_two_dim_factors_and_grad():
    A = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 20, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: kron.kron_matmul(x, a, b), (A, B))


def test_factor_shapes_contents():
    rows = kron.factor_shapes(3072, 768)
    # 3072 = 2^10 * 3 has 22 divisors, 768 = 2^8 * 3 has 18
    assert len(rows) == 22 * 18
    krony = [s for s in rows if (s.m1, s.n1, s.m2, s.n2) == (768, 768, 4, 1)]
    assert len(krony) == 1 and krony[0].params == 589_828
    s = krony[0]
    assert s.kron_rank == 4 and s.term_rank == 768 * 1
    mb, ma = kron.kron_macs(768, 768, 4, 1)
    assert s.macs == min(mb, ma) and s.dense_macs == 3072 * 768
    tq = [s for s in kron.factor_shapes(3072, 768, r=4) if (s.m1, s.n1) == (768, 384)][0]
    assert tq.params == 4 * (768 * 384 + 8)
    assert all(s.params == s.r * (s.m1 * s.n1 + s.m2 * s.n2) for s in rows)
    assert [s.params for s in rows] == sorted(s.params for s in rows)


@pytest.mark.parametrize("m1,n1,m2,n2,r", [(3, 4, 5, 2, 2), (8, 1, 1, 16, 3), (6, 6, 4, 4, 1)])
def test_kron_macs_counts_what_the_product_computes(m1, n1, m2, n2, r):
    """kron_macs against the multiply-adds torch's FLOP counter sees in the B-first and A-first
    products themselves (a matmul of (p, q) by (q, s) counts 2pqs FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    N = 7
    x, A, B = torch.randn(N, n1 * n2), torch.randn(r, m1, n1), torch.randn(r, m2, n2)
    counted = []
    for order in ("b", "a"):
        with FlopCounterMode(display=False) as fc:
            kron.kron_matmul(x, A, B, order=order)
        counted.append(fc.get_total_flops() // (2 * N))
    assert kron.kron_macs(m1, n1, m2, n2, r) == tuple(counted)


def permute_planted(K, P, Q):
    W = torch.empty_like(K)
    W[P[:, None], Q[None, :]] = K      # W[P][:, Q] = K
    return W


@pytest.mark.parametrize("m1,n1,m2,n2,r", [(48, 24, 4, 2, 1), (64, 32, 4, 2, 4), (32, 32, 2, 2, 2)])
def test_permutation_search_recovers_planted_block_permutation(m1, n1, m2, n2, r):
    """A planted permutation that reorders the blocks and the rows and columns inside every block
    (the permutations TQCompressor's structure leaves identifiable) is recovered exactly."""
    _, _, K = planted(r, m1, n1, m2, n2, seed=7)
    g = torch.Generator().manual_seed(3)
    P = torch.cat([torch.randperm(m2, generator=g) + m2 * b for b in torch.randperm(m1, generator=g)])
    Q = torch.cat([torch.randperm(n2, generator=g) + n2 * b for b in torch.randperm(n1, generator=g)])
    W = permute_planted(K, P, Q)
    assert kron.relative_error(W, *kron.nearest_kronecker(W, m1, n1, r)) > 0.3
    log = []
    A, B, rows, cols = kron.permuted_kronecker(W, m1, n1, r, log=lambda it, e, tag: log.append(e))
    assert kron.relative_error(W, A, B, rows, cols) < 1e-8
    assert len(log) >= 2 and log[-1] <= log[0]


def test_permutation_search_recovers_planted_exact_product_r1():
    """A fully random planted permutation of an exact one-term product with a small B factor."""
    m1, n1, m2, n2 = 128, 64, 2, 2
    _, _, K = planted(1, m1, n1, m2, n2, seed=11)
    g = torch.Generator().manual_seed(5)
    W = permute_planted(K, torch.randperm(m1 * m2, generator=g), torch.randperm(n1 * n2, generator=g))
    A, B, rows, cols = kron.permuted_kronecker(W, m1, n1, 1)
    vl = kron.relative_error(W, *kron.nearest_kronecker(W, m1, n1, 1))
    assert vl > 0.5
    assert kron.relative_error(W, A, B, rows, cols) < 1e-8


@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_search_never_worse_than_van_loan(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(96, 64, generator=g)
    A, B, rows, cols = kron.permuted_kronecker(W, 24, 16, 2, kicks=1)
    assert sorted(rows.tolist()) == list(range(96)) and sorted(cols.tolist()) == list(range(64))
    perm = kron.relative_error(W, A, B, rows, cols)
    vl = kron.relative_error(W, *kron.nearest_kronecker(W, 24, 16, 2))
    assert perm <= vl + 1e-12


def test_permutation_search_on_teacher_mlp(teacher_state):
    W = teacher_state["transformer.h.1.mlp.c_fc.weight"].t().contiguous()   # Conv1D (in, out) -> (out, in)
    m, n = W.shape
    m1, n1, r = m // 4, n // 2, 4          # TQCompressor's B of 4 x 2 in this orientation
    A, B, rows, cols = kron.permuted_kronecker(W, m1, n1, r, kicks=1)
    vl = kron.relative_error(W, *kron.nearest_kronecker(W, m1, n1, r))
    perm = kron.relative_error(W, A, B, rows, cols)
    assert perm < vl, (perm, vl)


# ---- every bad argument has its clear error

@pytest.mark.parametrize("call,match", [
    (lambda: kron.nearest_kronecker(torch.randn(10, 6), 3, 2, 1), r"\(3, 2\) does not divide .*\(10, 6\)"),
    (lambda: kron.nearest_kronecker(torch.randn(10, 6), 5, 4, 1), r"does not divide"),
    (lambda: kron.nearest_kronecker(torch.randn(10, 6), 5, 2, 0), r"r must be a positive integer, got 0"),
    (lambda: kron.nearest_kronecker(torch.randn(10, 6), 0, 2, 1), r"m1 must be a positive integer, got 0"),
    (lambda: kron.nearest_kronecker(torch.randn(2, 10, 6), 5, 2, 1), r"2-D matrix .*\(2, 10, 6\)"),
    (lambda: kron.nearest_kronecker(torch.ones(4, 4, dtype=torch.long), 2, 2, 1), r"floating point"),
    (lambda: kron.prune_kronecker(torch.randn(10, 6), 5, 2, 7), r"r must be at most 6, got r=7"),
    (lambda: kron.prune_kronecker(torch.randn(10, 6), 5, 2, 1, select="best"), r"select must be"),
    (lambda: kron.permuted_kronecker(torch.randn(10, 6), 5, 2, -1), r"r must be a positive integer, got -1"),
    (lambda: kron.permuted_kronecker(torch.randn(10, 6), 5, 2, 1, kicks=-2), r"kicks must be"),
    (lambda: kron.kron_matmul(torch.randn(3, 7), torch.randn(1, 2, 2), torch.randn(1, 2, 2)), r"last dimension 7.*in = n1\*n2 = 2\*2 = 4"),
    (lambda: kron.kron_matmul(torch.randn(3, 4), torch.randn(2, 2, 2), torch.randn(3, 2, 2)), r"same number of terms, got 2 and 3"),
    (lambda: kron.kron_matmul(torch.randn(3, 4), torch.randn(1, 1, 2, 2), torch.randn(1, 2, 2)), r"A must have shape"),
    (lambda: kron.kron_matmul(torch.randn(3, 4), torch.randn(1, 2, 2), torch.randn(1, 2, 2), order="c"), r"order must be"),
    (lambda: kron.kron_dense(torch.randn(0, 2, 2), torch.randn(0, 2, 2)), r"at least one term"),
    (lambda: kron.factor_shapes(0, 768), r"m must be a positive integer, got 0"),
    (lambda: kron.factor_shapes(768, 768, r=1.5), r"r must be a positive integer, got 1.5"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kron_spectra_are_exact_and_nest():
    """Every shape's top squared singular values from nested Grams equal svdvals of its rearrangement;
    a child Gram derived from a parent equals the one formed from W."""
    torch.manual_seed(3)
    W = torch.randn(48, 36, dtype=torch.float64)
    shapes = [(s.m1, s.n1, min(4, s.kron_rank)) for s in kron.factor_shapes(48, 36)]
    got = kron.kron_spectra(W, shapes)
    assert len(got) == len(shapes)
    for m1, n1, k in shapes:
        want = torch.linalg.svdvals(kron.rearrange(W, m1, n1))[:k] ** 2
        assert torch.allclose(got[(m1, n1)], want, rtol=1e-10, atol=1e-12), (m1, n1)
    for side, parent, child, shape_of in (("b", (8, 6), (4, 3), lambda p: (48 // p[0], 36 // p[1])),
                                          ("a", (12, 6), (6, 3), lambda p: p)):
        P = kron.rearranged_gram(W, *shape_of(parent), side)
        direct = kron.rearranged_gram(W, *shape_of(child), side)
        assert torch.allclose(kron.gram_from_parent(P, parent, child, side), direct, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not divide"):
        kron.gram_from_parent(P, (12, 6), (5, 3), "a")
    with pytest.raises(ValueError, match="exceeds dmax"):
        kron.kron_spectra(W, [(6, 6, 2)], dmax=10)


# ---- the data-aware fit: tr((W - W_hat) C (W - W_hat)^T)


def second_moment(n, seed=0, rows=None, dtype=torch.float64):
    """E[x x^T] of anisotropic, correlated inputs (as a layer's real inputs are)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows or 4 * n, n, generator=g, dtype=dtype) @ torch.randn(n, n, generator=g, dtype=dtype)
    X = X * torch.linspace(0.1, 3.0, n, dtype=dtype)
    return X.t() @ X / X.shape[0]


def test_whitened_kronecker_with_identity_is_van_loan():
    W = torch.randn(24, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B = kron.whitened_kronecker(W, 6, 9, 2, torch.eye(36, dtype=torch.float64))
    A0, B0 = kron.nearest_kronecker(W, 6, 9, 2)
    assert torch.allclose(kron.kron_dense(A, B), kron.kron_dense(A0, B0), atol=1e-10)
    assert kron.weighted_error(W, A, B, torch.eye(36, dtype=torch.float64)) == pytest.approx(
        kron.kron_tail_energy(W, 6, 9, 2), rel=1e-10)


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_whitened_kronecker_reaches_closed_form_for_kronecker_cov(dtype, rel):
    """C = C1 (x) C2: the optimum is Van Loan on W (L1 (x) L2), un-whitened; its error is the tail of
    W L's Kronecker spectrum."""
    W = torch.randn(24, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    C = torch.kron(second_moment(9, 1), second_moment(4, 2))
    optimum = kron.kron_tail_energy(W @ torch.linalg.cholesky(C), 6, 9, 2)
    A, B = kron.whitened_kronecker(W.to(dtype), 6, 9, 2, C.to(dtype))
    assert A.dtype == dtype and A.shape == (2, 6, 9) and B.shape == (2, 4, 4)
    assert kron.weighted_error(W, A.double(), B.double(), C) == pytest.approx(optimum, rel=rel)
    # the iteration alone, started from Van Loan, converges to the same optimum
    A, B = kron.whitened_kronecker(W, 6, 9, 2, C, start="vl", iters=500, tol=1e-13)
    assert kron.weighted_error(W, A, B, C) == pytest.approx(optimum, rel=1e-6)


def test_whitened_lowrank_is_svd_llm():
    """n1 = 1: A_k (x) B_k = a_k b_k^T, and the fit is SVD-LLM's truncation of the SVD of W L."""
    W = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    C = second_moment(30, 4)
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    svd_llm = (U[:, :5] * S[:5]) @ torch.linalg.solve_triangular(L, Vh[:5], upper=False, left=False)
    A, B = kron.whitened_kronecker(W, 20, 1, 5, C)
    assert torch.allclose(kron.kron_dense(A, B), svd_llm, atol=1e-9)


def test_whitened_kronecker_descends_and_beats_van_loan_and_pruning():
    W = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    C = second_moment(64, 6)
    errs = []
    A, B = kron.whitened_kronecker(W, 8, 16, 2, C, iters=50, tol=0, log=lambda it, e: errs.append((it, e)))
    assert [it for it, _ in errs] == list(range(51))
    values = [e for _, e in errs]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    final = kron.weighted_error(W, A, B, C)
    assert final == pytest.approx(min(values), rel=1e-9)
    vl = kron.weighted_error(W, *kron.nearest_kronecker(W, 8, 16, 2), C)
    pruned = kron.weighted_error(W, *kron.prune_kronecker(W, 8, 16, 2), C)
    assert final < 0.95 * vl and final < pruned
    # the Frobenius error is worse than Van Loan's: a different objective, not a better fit of W
    assert kron.relative_error(W, A, B) > kron.relative_error(W, *kron.nearest_kronecker(W, 8, 16, 2))


def test_whitened_kronecker_conjugate_gradient_steps_match_the_exact_solves(monkeypatch):
    """Above EXACT_SOLVE unknowns each ALS half-step runs conjugate gradients instead of a dense
    solve: the objective still never rises, and it ends where the exact solves end."""
    W = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    C = second_moment(64, 10)
    exact = kron.weighted_error(W, *kron.whitened_kronecker(W, 8, 16, 3, C, iters=40, tol=0), C)
    monkeypatch.setattr(kron, "EXACT_SOLVE", 4)            # r*n1 = 48, r*n2 = 24: both sides by CG
    errs = []
    A, B = kron.whitened_kronecker(W, 8, 16, 3, C, iters=40, tol=0, log=lambda it, e: errs.append(e))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:]))
    assert kron.weighted_error(W, A, B, C) == pytest.approx(exact, rel=1e-3)
    assert errs[-1] < 0.9 * errs[0]


def test_whitened_kronecker_singular_cov_and_damping():
    """Fewer samples than inputs: C is singular. Undamped, the minimum-norm solves still give finite
    factors no worse than Van Loan; heavy damping turns the fit into Van Loan's."""
    W = torch.randn(24, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    C = second_moment(36, 8, rows=10)
    assert torch.linalg.matrix_rank(C) == 10
    vl = kron.nearest_kronecker(W, 6, 9, 2)
    for damp in (0.0, 0.01):
        A, B = kron.whitened_kronecker(W, 6, 9, 2, C, damp=damp)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert kron.weighted_error(W, A, B, C) <= kron.weighted_error(W, *vl, C) * (1 + 1e-12)
    A, B = kron.whitened_kronecker(W, 6, 9, 2, C, damp=1e9)
    assert torch.allclose(kron.kron_dense(A, B), kron.kron_dense(*vl), atol=1e-6)


def test_whitened_kronecker_refuses_bad_input():
    W = torch.randn(24, 36)
    with pytest.raises(ValueError, match=r"cov must be a floating-point \(36, 36\)"):
        kron.whitened_kronecker(W, 6, 9, 1, torch.eye(24))
    with pytest.raises(ValueError, match="non-finite"):
        kron.whitened_kronecker(W, 6, 9, 1, torch.full((36, 36), float("nan")))
    with pytest.raises(ValueError, match="damp"):
        kron.whitened_kronecker(W, 6, 9, 1, torch.eye(36), damp=-1)
    with pytest.raises(ValueError, match="does not divide"):
        kron.whitened_kronecker(W, 5, 9, 1, torch.eye(36))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_whitened_kronecker_on_cuda_matches_cpu():
    W = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    C = second_moment(64, 10)
    A, B = kron.whitened_kronecker(W, 8, 16, 2, C)
    Ag, Bg = kron.whitened_kronecker(W.cuda(), 8, 16, 2, C.cuda())
    assert Ag.is_cuda
    assert torch.allclose(kron.kron_dense(Ag, Bg).cpu(), kron.kron_dense(A, B), atol=1e-8)


def test_divisors_by_trial_division_to_the_root():
    for v in range(1, 400):
        assert kron.divisors(v) == [d for d in range(1, v + 1) if v % d == 0]
    p = 1000000000039                                   # a prime: a linear scan would not end
    t0 = time.time()
    rows = kron.factor_shapes(p, p, 1)
    assert time.time() - t0 < 10 and sorted((s.m1, s.n1) for s in rows) == [(1, 1), (1, p), (p, 1), (p, p)]
    with pytest.raises(ValueError, match="beyond any weight matrix"):
        kron.factor_shapes(2 ** 41, 768)
