"""
Which budget objective picks the plan with the smallest loss: the total Van Loan tail energy
("tail"), the sum of relative tails ("relative"), or the predicted output error ("output": each tail
times tr(C)/n, C the matrix's input second moment on calibration text)? For each budget, solve with
each objective, decompose with each init (Van Loan, and the whitened fit on the same calibration)
and measure the loss on the held-out split, with no training.

  python scripts/budget_objectives.py --teacher ../shared/teacher/owt-6x256-bpe8k --dataset data/owt_bpe8k
  python scripts/budget_objectives.py --teacher ../shared/teacher/owt-mini-gpt2 --dataset data/owt_teacher

The dataset is a prepared folder (data/owt/prepare.py): train.bin calibrates, val.bin scores, by
perplexity_eval.py's kp windows of the teacher's context (token-weighted).
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compress  # noqa: E402
import scoring  # noqa: E402
import tokenizer  # noqa: E402
from data import check_data, load_tokens  # noqa: E402
from configurator import run_main  # noqa: E402
from model import GPT, count_params  # noqa: E402

KIND_SETS = {"blocks": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
         "blocks+wte": ("wte", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", required=True, help="prepared dataset folder: train.bin calibrates, val.bin scores")
    p.add_argument("--fracs", default="0.25,0.5", help="fractions of the block matrices' parameters to remove")
    p.add_argument("--kinds", default="blocks,blocks+wte", help=f"which matrices may be factored: {list(KIND_SETS)}")
    p.add_argument("--inits", default="vl,whiten")
    p.add_argument("--max_r", type=int, default=4)
    p.add_argument("--calib_tokens", type=int, default=compress.CALIB_TOKENS)
    args = p.parse_args(argv)
    return run_main("budget_objectives.py", run, args)


def run(args):
    teacher, _ = GPT.from_pretrained(args.teacher)
    tok = tokenizer.for_model(args.teacher, teacher.config.vocab_size)
    data = load_tokens(args.dataset, "train"), load_tokens(args.dataset, "val")
    check_data(args.dataset, data, teacher.config.vocab_size, args.teacher, print)
    tokens = scoring.owt_tokens(os.path.join(args.dataset, "val.bin"), tok, teacher.config.vocab_size)
    token_bytes = tok.token_bytes(teacher.config.vocab_size)
    covs = compress.calibrate(teacher, data[0], teacher.matrix_names(), n_tokens=args.calib_tokens, progress=False)
    base = count_params(teacher)["hf"]
    print(f"teacher: held-out loss {scoring.held_out(teacher, tokens, token_bytes)[0]:.4f}, {base:,} parameters (HF)")
    blocks = sum(teacher.get_matrix(n).weight.numel() for n in teacher.matrix_names() if n != "wte")
    inits = args.inits.split(",")
    print(f"{'kinds':<12}{'removed':>8}{'objective':>10}{'params':>12}{'factored':>9}"
          + "".join(f"{'loss ' + i:>13}" for i in inits) + f"{'solve s':>9}")
    for label in args.kinds.split(","):
        for frac in (float(f) for f in args.fracs.split(",")):
            target = base - int(frac * blocks)
            for objective in compress.OBJECTIVES:
                t0 = time.time()
                plan = compress.solve_budget(teacher, target, kinds=KIND_SETS[label], max_r=args.max_r,
                                             objective=objective, progress=False, log=lambda *a: None, covs=covs)
                solve_s = time.time() - t0
                losses = []
                for init in inits:
                    m = copy.deepcopy(teacher)
                    compress.decompose(m, {k: replace(mp, init=init) for k, mp in plan.items()}, compare=(),
                                       progress=False, covs=covs)
                    losses.append(scoring.held_out(m, tokens, token_bytes)[0])
                print(f"{label:<12}{frac:>8.0%}{objective:>10}{count_params(m)['hf']:>12,}{len(plan):>9}"
                      + "".join(f"{x:>13.4f}" for x in losses) + f"{solve_s:>9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
