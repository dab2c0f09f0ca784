"""
The whiten init's ridge: held-out excess loss over the teacher (nats per token, no training) of
whitened fits at several damping values delta (the solves use C + delta * mean(diag C) * I):
  blocks  every block matrix at A (m/2 x n/2) (x) B 2x2, r = 1, per calibration size
  wte     the tied embedding alone at 4x: Kronecker A (V x n/4) (x) B 1x4, r = 1, and the low-rank
          plan of the same size (C: the head's input, the final hidden state)
These choose compress.WHITEN_DAMP (blocks) and compress.WHITEN_DAMP_WTE (embedding): docs/INIT.md.

  python scripts/whiten_damp.py --teacher ../shared/teacher/owt-6x256-bpe8k --dataset data/owt_bpe8k
  python scripts/whiten_damp.py --teacher ../shared/teacher/owt-mini-gpt2 --dataset data/owt_teacher
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atomic  # noqa: E402
import compress  # noqa: E402
import scoring  # noqa: E402
import tokenizer  # noqa: E402
from data import load_tokens  # noqa: E402
from configurator import run_main  # noqa: E402
from model import GPT  # noqa: E402


def plans(teacher):
    """{"blocks": plan, "wte kron": plan, "wte lowrank": plan} (plan: name -> (m1, n1, r))."""
    blocks = {}
    for name in teacher.matrix_names():
        if name != "wte":
            m, n = teacher.get_matrix(name).weight.shape
            blocks[name] = (m // 2, n // 2, 1)
    V, n = teacher.transformer.wte.weight.shape
    return {"blocks": blocks, "wte kron": {"wte": (V, n // 4, 1)},
            "wte lowrank": {"wte": (V, 1, n * V // (4 * (V + n)))}}


def excess(teacher, plan, covs, damp, tokens, token_bytes, base):
    """The held-out excess loss over `base` (the teacher's) of the teacher with `plan`'s matrices
    whitened at ridge `damp`."""
    s = copy.deepcopy(teacher)
    for name, (m1, n1, r) in plan.items():
        s.factor(name, m1, n1, r, init="whiten", cov=covs[name], damp=damp)
    return scoring.held_out(s, tokens, token_bytes)[0] - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", required=True, help="prepared dataset folder: train.bin calibrates, val.bin scores")
    p.add_argument("--damps", default="0,0.001,0.01,0.1", help="ridges for the block matrices")
    p.add_argument("--wte_damps", default="0.01,0.1,1,10", help="ridges for the embedding")
    p.add_argument("--calib_tokens", default="8192,32768", help="calibration sizes for the block matrices")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = p.parse_args(argv)
    try:
        damps = [float(d) for d in args.damps.split(",")]
        wte_damps = [float(d) for d in args.wte_damps.split(",")]
        sizes = [int(n) for n in args.calib_tokens.split(",")]
    except ValueError as e:
        p.error(f"--damps, --wte_damps and --calib_tokens are comma-separated numbers ({e})")
    return run_main("whiten_damp.py", run, args, damps, wte_damps, sizes)


def run(args, damps, wte_damps, sizes):
    teacher, _ = GPT.from_pretrained(args.teacher)
    tok = tokenizer.for_model(args.teacher, teacher.config.vocab_size)
    train_tokens = load_tokens(args.dataset, "train")
    tokens = scoring.owt_tokens(os.path.join(args.dataset, "val.bin"), tok, teacher.config.vocab_size)
    token_bytes = tok.token_bytes(teacher.config.vocab_size)
    base = scoring.held_out(teacher, tokens, token_bytes)[0]
    print(f"teacher held-out loss {base:.4f}; excess in nats per token, no training", flush=True)
    rows = []
    for n_tokens in sizes:
        covs = compress.calibrate(teacher, train_tokens, teacher.matrix_names(), n_tokens=n_tokens, progress=False)
        for what, plan in plans(teacher).items():
            if what != "blocks" and n_tokens != sizes[0]:
                continue
            for damp in damps if what == "blocks" else wte_damps:
                rows.append(dict(plan=what, calib_tokens=n_tokens, damp=damp,
                                 excess=excess(teacher, plan, covs, damp, tokens, token_bytes, base)))
                print(f"{what:<12} {n_tokens:>7,} tokens  damp {damp:<6g} excess {rows[-1]['excess']:.4f}", flush=True)
    if args.json:
        atomic.write_json(args.json, dict(teacher=args.teacher, loss=base, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
