"""
Which initialization gives the compressed model the smallest loss before any training, and does the
head start survive distillation? Van Loan, pruning, permutation search and the whitened (data-aware)
Kronecker fit on the same Kronecker plans; truncated SVD and SVD-LLM's whitened SVD on low-rank plans
of the same size. Three budgets: "mild" (every block matrix 2x: B 2x2 with 2 terms, or half its
parameters in rank), "distil" (65.8% of the teacher's parameters, DistilGPT2's ratio to GPT-2: the
budget solver over every kind) and "quarter" (the blocks at 25% of their parameters, the embedding
dense). Then --distill_iters steps of distillation from each init at the "distil" budget.

  python scripts/init_compare.py --teacher ../shared/teacher/owt-6x256-bpe8k --dataset data/owt_bpe8k \\
      --config config/train_bpe8k.py --out out/init_bpe8k
  python scripts/init_compare.py --teacher ../shared/teacher/owt-mini-gpt2 --dataset data/owt_teacher \\
      --config config/train_mini.py --out out/init_mini

The held-out loss is perplexity_eval.py's kp windows over the dataset's val.bin (documents the teacher
never saw); calibration reads only train.bin. Each result is stored in OUT/results.json as it is
measured, and a rerun skips what is there (--force recomputes). OUT/table.md is the summary.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atomic  # noqa: E402
import checkpoint  # noqa: E402
import compress  # noqa: E402
import scoring  # noqa: E402
import tokenizer  # noqa: E402
from data import check_data, load_tokens  # noqa: E402
from configurator import run_command, run_main, write_config  # noqa: E402
from model import GPT, count_params  # noqa: E402

BLOCKS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# (row, plan family, init)
INITS = [("Van Loan", "kron", "vl"), ("pruning", "kron", "prune"), ("permutation", "kron", "perm"),
         ("whitened Kronecker", "kron", "whiten"), ("truncated SVD", "lowrank", "vl"),
         ("whitened SVD (SVD-LLM)", "lowrank", "whiten")]
BUDGETS = ("mild", "distil", "quarter")


class Setup(NamedTuple):
    """What every measurement shares: the plans per (budget, family), the calibration, the held-out
    tokens and their bytes, and the teacher's held-out loss."""
    plans: dict
    covs: dict
    tokens: object
    token_bytes: object
    base: float


def mild_plan(teacher, family):
    """Every block matrix at half its weights: A (m/2, n/2) (x) B 2x2 with two terms, or the rank that
    spends half of them."""
    plan = {}
    for name in teacher.matrix_names():
        if name == "wte":
            continue
        m, n = teacher.get_matrix(name).weight.shape
        shape = dict(m1=m // 2, n1=n // 2, r=2) if family == "kron" else dict(m1=m, n1=1, r=m * n // (2 * (m + n)))
        plan[name] = compress.MatrixPlan(**shape)
    return plan


def plan_for(teacher, budget, family, max_r):
    if budget == "mild":
        return mild_plan(teacher, family)
    c = count_params(teacher)
    blocks = sum(teacher.get_matrix(n).weight.numel() for n in teacher.matrix_names() if n != "wte")
    target, kinds = (round(compress.DISTIL_RATIO * c["hf"]), ("wte",) + BLOCKS) if budget == "distil" else \
        (c["hf"] - round(0.75 * blocks), BLOCKS)
    return compress.solve_budget(teacher, target, kinds, max_r=max_r if family == "kron" else 1024, progress=False,
                                 log=lambda *a: None, family=family, unreachable="closest")


def distill(init_dir, run_dir, args):
    """train.py --config with this run's overrides (RUN/train_config.py); its output in RUN/train.log."""
    over = os.path.join(run_dir, "train_config.py")
    write_config(over, dict(init_from=init_dir, out_dir=run_dir, teacher=args.teacher, dataset=args.dataset,
                            max_iters=args.distill_iters, lr_decay_iters=args.distill_iters,
                            eval_interval=args.distill_iters, progress=False, device="cpu", overwrite=True))
    run_command("train.py", [args.config, over], log_path=os.path.join(run_dir, "train.log"))
    student, _ = checkpoint.load_student(os.path.join(run_dir, "ckpt"))
    return student


def measure(key, teacher, budget, family, init, setup, args):
    covs, tokens, token_bytes, base = setup.covs, setup.tokens, setup.token_bytes, setup.base
    student = copy.deepcopy(teacher)
    plan = {k: replace(mp, init=init) for k, mp in setup.plans[(budget, family)].items()}
    t0 = time.time()
    compress.decompose(student, plan, compare=(), progress=False, covs=covs,
                       perm_kw=dict(max_iters=args.perm_iters, kicks=args.perm_kicks))
    res = dict(budget=budget, family=family, init=init, params=count_params(student)["hf"],
               decompose_s=round(time.time() - t0, 1))
    res["loss"], res["bpb"] = scoring.held_out(student, tokens, token_bytes)
    res["excess"] = res["loss"] - base
    if budget == "distil" and args.distill_iters:
        run_dir = os.path.join(args.out, key.replace(" ", "_"))
        checkpoint.save_student(student, os.path.join(run_dir, "init"), plan, teacher=args.teacher,
                                made_by="init_compare.py")
        t0 = time.time()
        trained = distill(os.path.join(run_dir, "init"), run_dir, args)
        res["distill_s"] = round(time.time() - t0, 1)
        res["loss_distilled"], res["bpb_distilled"] = scoring.held_out(trained, tokens, token_bytes)
        res["excess_distilled"] = res["loss_distilled"] - base
    return res


def wte_rows(teacher, setup):
    """The tied embedding alone at 4x, weighted by its head's inputs (whiten) or not (vl): does the
    output head's weighting serve the lookup too?"""
    covs, tokens, token_bytes, base = setup.covs, setup.tokens, setup.token_bytes, setup.base
    V, n = teacher.transformer.wte.weight.shape
    out = {}
    for family, shape in (("kron", dict(m1=V, n1=n // 4, r=1)),
                          ("lowrank", dict(m1=V, n1=1, r=n * V // (4 * (V + n))))):
        for init in ("vl", "whiten"):
            student = copy.deepcopy(teacher)
            compress.decompose(student, {"wte": compress.MatrixPlan(**shape, init=init)}, compare=(), progress=False, covs=covs)
            loss, _ = scoring.held_out(student, tokens, token_bytes)
            out[f"wte {family} {init}"] = dict(params=count_params(student)["hf"], excess=loss - base, **shape)
            print(f"wte only, {family} {shape}, {init}: excess {loss - base:.4f}", flush=True)
    return out


def table(results, teacher_loss):
    lines = [f"teacher held-out loss {teacher_loss:.4f} nats/token (ppl {math.exp(teacher_loss):.2f}); "
             "excess = student loss - teacher loss, nats per token, before any training", "",
             "| init | plan | " + " | ".join(f"{b}: params | {b}: excess | {b}: ppl" for b in BUDGETS) + " |",
             "|---|---|" + "---:|" * (3 * len(BUDGETS))]
    for label, family, init in INITS:
        cells = []
        for b in BUDGETS:
            r = results.get(f"{b} {family} {init}")
            cells += [f"{r['params']:,}", f"{r['excess']:.4f}", f"{math.exp(r['loss']):.2f}"] if r else ["", "", ""]
        lines.append(f"| {label} | {family} | " + " | ".join(cells) + " |")
    wte = [(k, r) for k, r in results.items() if k.startswith("wte ")]
    if wte:
        lines += ["", "the tied embedding alone at 4x (head's input weighting for whiten)", "",
                  "| plan | init | params | excess |", "|---|---|---:|---:|"]
        lines += [f"| {k.split()[1]} | {k.split()[2]} | {r['params']:,} | {r['excess']:.4f} |" for k, r in wte]
    rows = [(label, results.get(f"distil {family} {init}")) for label, family, init in INITS]
    if any(r and "loss_distilled" in r for _, r in rows):
        lines += ["", "distil budget, then distillation: excess before -> after (nats per token), ppl after", "",
                  "| init | before | after | ppl after | bits/byte after |", "|---|---:|---:|---:|---:|"]
        for label, r in rows:
            if r and "loss_distilled" in r:
                lines.append(f"| {label} | {r['excess']:.4f} | {r['excess_distilled']:.4f} | "
                             f"{math.exp(r['loss_distilled']):.2f} | {r['bpb_distilled']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--dataset", required=True, help="prepared dataset folder: train.bin calibrates, val.bin scores")
    p.add_argument("--config", required=True, help="training config for the distillation runs")
    p.add_argument("--out", required=True)
    p.add_argument("--calib_tokens", type=int, default=compress.CALIB_TOKENS)
    p.add_argument("--distill_iters", type=int, default=100)
    p.add_argument("--perm_iters", type=int, default=10, help="permutation search iterations per matrix")
    p.add_argument("--perm_kicks", type=int, default=1, help="permutation search restarts per matrix")
    p.add_argument("--max_r", type=int, default=8, help="most Kronecker terms per matrix the budget solver may use")
    p.add_argument("--wte", action="store_true", help="also the tied embedding alone at 4x, vl against whiten")
    p.add_argument("--inits", default=",".join(i for _, _, i in INITS if i != "perm") + ",perm",
                   help="which kron-plan inits to run (the permutation search is minutes per matrix on a CPU)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    return run_main("init_compare.py", run, args)


def run(args):
    teacher, _ = GPT.from_pretrained(args.teacher)
    tok = tokenizer.for_model(args.teacher, teacher.config.vocab_size)
    data = load_tokens(args.dataset, "train"), load_tokens(args.dataset, "val")
    check_data(args.dataset, data, teacher.config.vocab_size, args.teacher, print)
    tokens = scoring.owt_tokens(os.path.join(args.dataset, "val.bin"), tok, teacher.config.vocab_size)
    token_bytes = tok.token_bytes(teacher.config.vocab_size)
    base, _ = scoring.held_out(teacher, tokens, token_bytes)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = {} if args.force or not os.path.exists(path) else json.load(open(path))
    t0 = time.time()
    covs = compress.calibrate(teacher, data[0], teacher.matrix_names(), n_tokens=args.calib_tokens, progress=False)
    print(f"teacher loss {base:.4f}; calibrated on {args.calib_tokens:,} tokens in {time.time() - t0:.1f}s", flush=True)
    plans = {(b, f): plan_for(teacher, b, f, args.max_r) for b in BUDGETS for f in ("kron", "lowrank")}
    setup = Setup(plans, covs, tokens, token_bytes, base)
    for budget in BUDGETS:
        for label, family, init in INITS:
            key = f"{budget} {family} {init}"
            if key in results or (family == "kron" and init not in args.inits.split(",")):
                continue
            results[key] = measure(key, teacher, budget, family, init, setup, args)
            r = results[key]
            print(f"{budget:<8}{label:<24}{r['params']:>12,}  excess {r['excess']:.4f}  ({r['decompose_s']}s)"
                  + (f"  distilled {r['excess_distilled']:.4f}" if "excess_distilled" in r else ""), flush=True)
            atomic.write_json(path, results)
    if args.wte and "wte kron vl" not in results:
        results.update(wte_rows(teacher, setup))
    results["teacher"] = dict(loss=base, calib_tokens=args.calib_tokens, teacher=args.teacher)
    atomic.write_json(path, results)
    atomic.write_text(os.path.join(args.out, "table.md"), table(results, base))
    print(table(results, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
