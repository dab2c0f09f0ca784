"""
The factored layers' implementation, chosen by timing: the fastest way to compute x W^T with
W = sum_k A_k (x) B_k for one shape, device, dtype, token count and mode, measured once and cached
(IMPL_CACHE), and the cache kept in a file per machine so that fresh runs compute alike.
"""

import json
import os
import time

import torch
import torch.nn.functional as F

import kron
from atomic import write_json

IMPLS = ("auto",) + kron.ORDERS + ("dense",)   # measured choice, factored orders (kron.kron_matmul), materialize


def forward_impl(x, A, B, bias, impl):
    # A already carries the per-term scales (KronLinear.scaled_A)
    if impl == "dense":
        return F.linear(x, kron.kron_dense(A, B), bias)
    y = kron.kron_matmul(x, A, B, order=impl)
    return y if bias is None else y + bias


# The fastest implementation per (shape, terms, device, dtype, tokens, training) is measured once
# and cached here. Wall-clock speed of the factored product does not follow its multiply-add count
# (the reshapes between the two GEMMs are memory-bound, and a tiny factor makes the GEMMs thin), so
# the choice is made by timing, with materialize-then-matmul as the fallback that is never slower
# than dense by more than the cost of building W.
IMPL_CACHE = {}


def sync(device):
    """Wait for the device's queued work (timings on a GPU measure nothing without it)."""
    device = torch.device(device)
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
    if key in IMPL_CACHE:
        return IMPL_CACHE[key]
    xs = x.detach()

    def run(impl):
        Ai = A.detach().requires_grad_(train)
        Bi = B.detach().requires_grad_(train)
        sync(x.device)
        t0 = time.perf_counter()
        with torch.enable_grad() if train else torch.no_grad():
            y = forward_impl(xs, Ai, Bi, None, impl)
            if train:
                y.backward(torch.ones_like(y))
        sync(x.device)
        return time.perf_counter() - t0

    # A factored order with more multiply-adds than dense never wins; leave it out untimed (some of
    # them are pathological: a 1-row B makes the B-first order a huge batch of tiny products).
    b_first, a_first = kron.kron_macs(m1, n1, m2, n2, r)
    # torch.einsum contracts left to right (A with x first: the A-first cost and intermediate) unless
    # opt_einsum is there to choose the cheaper path
    opt = torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled
    macs = {"a": a_first, "a_bmm": a_first, "b": b_first, "b_bmm": b_first,
            "einsum": min(a_first, b_first) if opt else a_first}
    candidates = ("dense",) + tuple(o for o in kron.ORDERS if macs[o] < m1 * m2 * n1 * n2)
    warm = {}
    for impl in candidates:                        # warm-up; 10x slower than the best so far: out
        warm[impl] = run(impl)
    candidates = tuple(i for i in candidates if i == "dense" or warm[i] <= 10 * min(warm.values()))
    times = {impl: float("inf") for impl in candidates}
    for i in range(reps):
        for impl in candidates:
            if i and times[impl] > 3 * min(times.values()):
                continue
            times[impl] = min(times[impl], run(impl))
    best = min(times, key=times.get)
    if best != "dense" and times[best] > (1 - margin) * times["dense"]:
        best = "dense"
    IMPL_CACHE[key] = best
    return best


def cache_rows():
    """IMPL_CACHE as JSON-able rows (saved with a training checkpoint so that a resumed run computes
    with the same implementations, hence bit-identically)."""
    return [[*[str(x) for x in k], v] for k, v in IMPL_CACHE.items()]


def load_cache_rows(rows):
    for row in rows:
        *k, v = row
        if v not in IMPLS[1:]:
            continue                    # not a concrete choice, or a name this version does not have: time it again
        m1, n1, m2, n2, r, dev, dtype, n, train = k
        key = (int(m1), int(n1), int(m2), int(n2), int(r), dev, getattr(torch, dtype.split(".")[-1]),
               int(n), train == "True")
        IMPL_CACHE[key] = v


def load_file(path):
    """Load the choices earlier runs on this machine made, kept in `path` (same torch version): with
    them a fresh run computes exactly as those did; timing again could choose differently, and the
    candidates differ in the last bits (dense against b_bmm: 2.7e-5 on one forward). Returns a note
    for the log when the file cannot be read, else None."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        if saved["torch"] == torch.__version__:
            load_cache_rows(saved["rows"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{path} is not a readable implementation cache ({e}); timing again, then replacing it"
    return None


def save_file(path):
    """Keep IMPL_CACHE in `path`. Returns a note for the log when it cannot be written, else None."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(path, dict(torch=torch.__version__, rows=cache_rows()))
    except OSError as e:
        return (f"the implementation choices could not be kept in {path} ({e}); a later fresh run times them "
                f"again and may differ in the last bits")
    return None
