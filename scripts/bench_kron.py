"""
KronLinear against nn.Linear on GPT-2 shapes: forward and forward+backward time.

  python scripts/bench_kron.py                  # 8 x 1024 tokens, CPU (and CUDA when present)
  python scripts/bench_kron.py --reps 3 --tokens 2048 --device cpu

Every KronLinear timing is interleaved with a dense one on the same input, and the table shows the
median of the per-pair ratio dense_time / kron_time (above 1: faster than dense) with its min-max
spread, for each implementation: the factored orders of kron.kron_matmul ('a', 'b', 'a_bmm',
'b_bmm', 'einsum'), 'dense' (materialize W, then one matmul) and 'auto' (what the layer picks by
measurement, shown in parentheses).
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kron  # noqa: E402
import autotune  # noqa: E402
from configurator import device_type, run_main  # noqa: E402
from autotune import sync  # noqa: E402
from model import KronLinear  # noqa: E402

# (name, out, in, m1, n1, r): nn.Linear orientation (out, in); GPT-2's Conv1D stores the transpose
SHAPES = [
    ("c_fc Krony-PT 81M", 3072, 768, 768, 768, 1),      # Conv1D 768x768 (x) 1x4
    ("c_fc Krony-PT 96M", 3072, 768, 3072, 384, 1),     # Conv1D 384x3072 (x) 2x1
    ("c_fc Krony-PT 80M-2", 3072, 768, 1024, 256, 2),   # 1024x256 (x) 3x3, r=2
    ("c_fc TQCompressor", 3072, 768, 768, 384, 4),      # Conv1D 384x768 (x) 2x4, r=4
    ("c_fc balanced", 3072, 768, 64, 32, 1),            # 64x32 (x) 48x24
    ("c_proj balanced", 768, 3072, 32, 64, 1),
    ("c_attn 576x768 (x) 4x1", 2304, 768, 576, 768, 1),
    ("c_attn balanced", 2304, 768, 48, 32, 1),
    ("attn.c_proj 384x384 (x) 2x2", 768, 768, 384, 384, 1),
    ("attn.c_proj balanced", 768, 768, 32, 32, 1),
]


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def step(layer, x, backward):
    if backward:
        layer(x).sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def ratios(dense, kl, x, backward, reps, device):
    step(dense, x, backward)      # warm up both
    step(kl, x, backward)
    out = []
    for i in range(reps):
        td = timed(lambda: step(dense, x, backward), device)
        tk = timed(lambda: step(kl, x, backward), device)
        out.append((td / tk, td))
        if td / tk < 1 / 3:       # hopeless: one pair says enough
            break
    r = [o[0] for o in out]
    return statistics.median(r), min(r), max(r), statistics.median(o[1] for o in out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8 * 1024, help="tokens per batch (default 8 x 1024)")
    p.add_argument("--reps", type=int, default=5, help="interleaved pairs per measurement (default 5)")
    p.add_argument("--device", type=device_type, default=None,
                   help="cpu, cuda or cuda:N (default: both the CPU and, when present, the GPU, each a table)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--only", default=None, help="run the shapes whose name contains this text")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.reps < 1:
        p.error("--tokens and --reps must be positive")
    return run_main("bench_kron.py", run, args)


def run(args):
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.tokens} tokens, "
          f"{args.reps} interleaved pairs, {args.dtype}; ratio = dense time / KronLinear time (median [min, max])")
    impls = autotune.IMPLS[1:] + ("auto",)
    for dev in devices:
        device = torch.device(dev)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        results = []
        for label, out_f, in_f, m1, n1, r in SHAPES:
            if args.only and args.only not in label:
                continue
            m2, n2 = out_f // m1, in_f // n1
            dense = nn.Linear(in_f, out_f, device=device, dtype=dtype)
            kl = KronLinear(in_f, out_f, m1, n1, r, device=device, dtype=dtype)
            x = torch.randn(args.tokens, in_f, device=device, dtype=dtype)
            cells, dense_ms = {}, {}
            for backward in (False, True):
                for impl in impls:
                    kl.impl = impl
                    med, lo, hi, td = ratios(dense, kl, x, backward, args.reps, device)
                    if impl == "auto":
                        key = [k for k in autotune.IMPL_CACHE if k[:6] == (m1, n1, m2, n2, r, device.type) and k[-1] is backward]
                        cells[(backward, impl)] = f"**{med:.2f}x** ({autotune.IMPL_CACHE[key[0]] if key else '?'})"
                    else:
                        cells[(backward, impl)] = f"{med:.2f}x [{lo:.2f}, {hi:.2f}]"
                    dense_ms[backward] = td * 1e3
                    dense.zero_grad(set_to_none=True)
                    kl.zero_grad(set_to_none=True)
            macs = min(kron.kron_macs(m1, n1, m2, n2, r))
            results.append(([label, f"{m1}x{n1} (x) {m2}x{n2}, r={r}", f"{out_f * in_f / macs:.1f}x"], cells, dense_ms))
            print(f"  measured {label}", file=sys.stderr, flush=True)
        for backward in (False, True):
            print(f"\n## {name}, {'forward + backward' if backward else 'forward'}\n")
            print("| matrix | A (x) B, r | MAC saving | dense ms | " + " | ".join(impls) + " |")
            print("|---" * (4 + len(impls)) + "|")
            for head, cells, dense_ms in results:
                print("| " + " | ".join(head + [f"{dense_ms[backward]:.0f}"] + [cells[(backward, i)] for i in impls]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
