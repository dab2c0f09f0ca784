"""
Which structure fits a real layer best at a given size, before any training: per block matrix of a
teacher, at each compression ratio, the output error sqrt(tr(E C E^T) / tr(W C W^T)) (C the
matrix's input second moment on calibration text from the training split) of whitened low rank
(SVD-LLM), the best whitened Kronecker sum (every factor dimension >= 2), and the whitened hybrid
low rank + Kronecker sum, as compress.best_fit builds them; the winner per matrix. docs/INIT.md
holds the results.

  python scripts/structure_fit.py --teacher ../shared/teacher/owt-6x256-bpe8k --dataset data/owt_bpe8k
  python scripts/structure_fit.py --teacher ../shared/teacher/owt-6x256-llama-bpe8k --dataset data/owt_bpe8k \\
      --layers 2 --ratios 4 8
"""

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import compress  # noqa: E402
from configurator import REFERENCE_TEACHER, positive_int, run_main  # noqa: E402
from data import load_tokens  # noqa: E402
from model import GPT  # noqa: E402


def rel(W, fit, cov):
    return math.sqrt(compress.fit_error(W, fit, cov) / float(((W @ cov.to(W)) * W).sum()))


def measure(W, max_params, cov):
    """{family: (relative output error, description)} of the best fit of each family within max_params."""
    Wd = W.detach().double()
    m, n = Wd.shape
    out = {}
    low = compress.fit_hybrid(Wd, max_params // (m + n), (1, 1, 0), cov)
    out["lowrank"] = (rel(Wd, low, cov), low.shapes)
    kr = [compress.fit_hybrid(Wd, 0, s, cov) for s in compress.kron_shapes(Wd, max_params, 3)]
    if kr:
        best = min(kr, key=lambda f: compress.fit_error(Wd, f, cov))
        out["kron"] = (rel(Wd, best, cov), best.shapes)
    win = compress.best_fit(Wd, max_params, cov)
    out["best_fit"] = (rel(Wd, win, cov), f"{win.family}: {win.shapes}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=REFERENCE_TEACHER)
    p.add_argument("--dataset", default="data/owt_bpe8k", help="train.bin in the teacher's tokenizer")
    p.add_argument("--layers", nargs="+", type=int, default=[2])
    p.add_argument("--ratios", nargs="+", type=positive_int, default=[2, 4, 8], help="compression ratios")
    p.add_argument("--calib_tokens", type=positive_int, default=compress.CALIB_TOKENS)
    return run_main("structure_fit.py", run, p.parse_args(argv))


def run(args):
    teacher, _ = GPT.from_pretrained(args.teacher)
    teacher.requires_grad_(False)
    names = [nm for nm in teacher.matrix_names() if nm != "wte" and nm != "lm_head"
             and int(nm.split(".")[1]) in args.layers]
    covs = compress.calibrate(teacher, load_tokens(args.dataset, "train"), names, n_tokens=args.calib_tokens,
                              progress=False)
    print("| matrix | shape | ratio | whitened low rank | best whitened Kronecker sum | best_fit (its choice) |")
    print("|---|---|---|---|---|---|")
    wins = {}
    for nm in names:
        W = teacher.get_matrix(nm).weight
        for ratio in args.ratios:
            t0 = time.time()
            res = measure(W, W.numel() // ratio, covs[nm])
            fam = res["best_fit"][1].split(":")[0]
            wins[fam] = wins.get(fam, 0) + 1
            cell = lambda k: f"{res[k][0]:.4f} ({res[k][1]})" if k in res else "-"   # noqa: E731
            print(f"| {nm} | {W.shape[0]}x{W.shape[1]} | {ratio}x | {cell('lowrank')} | {cell('kron')} | "
                  f"{cell('best_fit')} | ({time.time() - t0:.0f} s)", flush=True)
    print("best_fit's choices: " + ", ".join(f"{k} {v}" for k, v in sorted(wins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
