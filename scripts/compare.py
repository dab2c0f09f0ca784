"""
Which compression recipe wins: the published recipes, the baselines and this project's own, each
trained on the same data, the same tokens and the same schedule (config/recipe_common.py), at the
same parameter budgets, then scored the same way. docs/RESULTS.md holds the results and what they mean.

  python data/owt/prepare.py --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz \\
      --out data/owt_bpe8k --val_last 71 --tokenizer ../shared/teacher/owt-6x256-bpe8k
  python scripts/compare.py                       # every run on owt-6x256-bpe8k (prepares the data if missing)
  python scripts/compare.py --rows best svdllm --budgets 1 --seeds 1337      # a subset
  python scripts/compare.py --teacher ../shared/teacher/owt-mini-gpt2 --dataset data/owt_teacher --out out/compare_mini
  python scripts/compare.py --device cuda         # on a GPU

Rows (the recipe), each a student built from the teacher then trained for the common schedule:
  1 krony-vl     Krony-PT: MLP matrices only, Van Loan init, language-model loss only
  2 krony-prune  Krony-PT: the same with the pruning init
  3 tq-like      TQCompressor-like: MLPs and the embedding, permutation init, multi-step distillation
                 (halfway to the budget first, then the budget)
  4 kngpt2-like  KnGPT2-like: every matrix kind, Van Loan init, intermediate-layer distillation
                 (cross-entropy + hidden-state MSE incl. the embedding output + attention-map KL)
  5 distilgpt2   DistilGPT2-style: every other block dropped (blocks 0, 2, ...), dense, KD + LM loss
  6 lowrank      truncated-SVD factors (A_k m x 1, B_k 1 x n: Eckart-Young) chosen by the budget
                 solver for the same parameter count, distilled (KD)
  7 best         this project's recipe: the budget solver over every matrix kind and Kronecker
                 shape, Van Loan init, distillation (KD) alone
  8 control      the dense teacher itself trained on for the same tokens with the LM loss (KD from
                 itself has zero gradient at the start)
  9 svdllm       whitened truncated SVD (SVD-LLM) at row 6's plan, distilled
 10 best-whiten  row 7 with the data-aware (whitened) Kronecker init
 11 scratch-factored   row 7's factored shapes from random factors (GPT-2's init everywhere), distilled
 12 scratch-dense      a dense GPT of the budget's size (the teacher's vocabulary, context and head
                 size; the most parameters that fit) from random weights, distilled
 13 svdllm-uniform     SVD-LLM as published: whitened truncated SVD of every matrix at one ratio
                 (compress.uniform_lowrank), distilled; row 9 differs from it by the solver's allocation only
 14 kron-only   the solver restricted to shapes with every factor dimension >= 2 (no rank-r product in
                 disguise), whitened, distilled: what Kronecker structure alone achieves
 15 minitron    Minitron-style width pruning (prune.py): neurons, heads and embedding channels ranked by
                 their activations, the width with the lowest calibration loss, distilled; a plain GPT-2
Budgets: 1 = 65.8% of the teacher's parameters (DistilGPT2's ratio to GPT-2), 2 = half the blocks'
parameters (the embeddings stay dense), 80, 50, 35, 20 = that percentage of the teacher's parameters.
The frontier (--frontier): rows 10, 14, 13, 9, 15, 3, 5, 12 at 80, 65.8, 50, 35 and 20%; its plot is
OUT/frontier.png. The factored rows use compress.solve_budget restricted to
the matrix kinds their recipe factors; where those kinds cannot reach the budget the row takes the
smallest model they allow and the table marks it. Parameters are count_params(...)["hf"]: every
tensor once, the tied head once. Primary metric: OWT held-out bits per byte (comparable across
tokenizers), with perplexity beside it. Three seeds at budget 1 for rows 7, 10 and 9, so that the
seed spread is measured.

Each run writes OUT/<row>-b<budget>-s<seed>/ (build.log: the solver's choice and the decomposition
report; train_config.py and train.log: the train.py run, `python train.py config/recipe_common.py
RUN/train_config.py`; ckpt/, metrics.jsonl, result.json) and is skipped when its result.json exists
(--force reruns). OUT/results.json, OUT/table.md and
OUT/ppl_vs_params.png collect every finished run.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atomic  # noqa: E402
import checkpoint  # noqa: E402
import compress  # noqa: E402
import scoring  # noqa: E402
import tokenizer  # noqa: E402
import plots  # noqa: E402
import prune  # noqa: E402
from data import load_tokens  # noqa: E402
from configurator import (OWT_SAMPLE, REFERENCE_TEACHER, SHARED, device_type, positive_int, run_command,  # noqa: E402
                          run_main, write_config)
from model import GPT, count_params, matrix_kind  # noqa: E402

MLP = ("mlp.c_fc", "mlp.c_proj")
ALL = ("wte", "attn.c_attn", "attn.c_proj") + MLP
# The rows name kinds in GPT-2's words (the papers'); a Llama-family teacher's are these.
LLAMA_WORDS = {"wte": ("wte",), "attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
               "attn.c_proj": ("attn.o_proj",), "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
               "mlp.c_proj": ("mlp.down_proj",)}
KD = dict(kd_weight=1.0, ce_weight=0.0, hidden_weight=0.0, attn_weight=0.0)
LM = dict(kd_weight=0.0, ce_weight=1.0, hidden_weight=0.0, attn_weight=0.0)
ROWS = {
    "krony-vl": dict(n=1, label="Krony-PT, Van Loan, MLP only, LM loss", kinds=MLP, init="vl", loss=LM),
    "krony-prune": dict(n=2, label="Krony-PT, pruning init, MLP only, LM loss", kinds=MLP, init="prune", loss=LM),
    "tq-like": dict(n=3, label="TQ-like: permutation init, multi-step KD", kinds=("wte",) + MLP, init="perm",
                    multistep=True, loss=KD),
    "kngpt2-like": dict(n=4, label="KnGPT2-like: intermediate-layer distillation", kinds=ALL, init="vl",
                        loss=dict(kd_weight=0.0, ce_weight=1.0, hidden_weight=1.0, attn_weight=1.0)),
    "distilgpt2": dict(n=5, label="DistilGPT2-style: blocks dropped to the budget, evenly spaced", depth=True,
                       loss=dict(KD, ce_weight=1.0)),
    "lowrank": dict(n=6, label="low-rank (truncated SVD), same budget, KD", kinds=ALL, init="vl",
                    family="lowrank", loss=KD),
    "best": dict(n=7, label="this project: budget solver, Van Loan, KD", kinds=ALL, init="vl", loss=KD),
    "control": dict(n=8, label="control: dense teacher trained on, LM loss", loss=LM),
    "svdllm": dict(n=9, label="whitened SVD (SVD-LLM), same budget, KD", kinds=ALL, init="whiten",
                   family="lowrank", loss=KD),
    "best-whiten": dict(n=10, label="this project: budget solver, whitened Kronecker init, KD", kinds=ALL,
                        init="whiten", loss=KD),
    "scratch-factored": dict(n=11, label="from scratch: row 7's factored shapes, random factors, KD", kinds=ALL,
                             init="vl", scratch=True, loss=KD),
    "scratch-dense": dict(n=12, label="from scratch: a dense GPT of the budget's size, KD", dense_scratch=True,
                          loss=KD),
    "svdllm-uniform": dict(n=13, label="SVD-LLM as published: whitened SVD, one ratio for every matrix, KD",
                           kinds=ALL, init="whiten", uniform=True, loss=KD),
    "kron-only": dict(n=14, label="Kronecker only: the solver without low-rank shapes, whitened, KD", kinds=ALL,
                      init="whiten", family="kron_only", loss=KD),
    "minitron": dict(n=15, label="Minitron-style width pruning (dense, narrower), KD", width=True, loss=KD),
}
# Every row at both budgets (the control is dense: one run serves both); three seeds at budget 1 for
# this project's two recipes, the strongest other row (SVD-LLM on the owt-6x256-bpe8k teacher
# before training, docs/INIT.md) and the best published recipe there (TQ-like), so that the seed
# spread is measured where the ranking is decided.
SPREAD = ("best", "best-whiten", "svdllm", "tq-like")
# The frontier: the project's recipe, each single structure (Kronecker only, SVD-LLM as published and
# with the solver's allocation) and the other recipes at five budgets, budget 1 among them.
FRONTIER = (80, 1, 50, 35, 20)
FRONTIER_ROWS = ("best-whiten", "kron-only", "svdllm-uniform", "svdllm", "minitron", "tq-like", "distilgpt2",
                 "scratch-dense")
RUNS = [(r, 1, 1337) for r in ROWS] + [(r, 2, 1337) for r in ROWS if r != "control"] + \
    [(r, 1, s) for s in (1338, 1339) for r in SPREAD] + \
    [(r, b, 1337) for b in FRONTIER if b != 1 for r in FRONTIER_ROWS]
# Terms per factored matrix the solver may use. r <= 4 (the published recipes' range) cannot spend
# budget 1 on this teacher: the embedding (50257 = 29 x 1733 rows) has few factor shapes, and its
# best ones are thin (1 x 128 (x) 50257 x 1 is a rank-r product), so 4 terms leave 3.7M of the 4.8M
# parameters unused. Truncated SVD may take any rank the solver's 1.5x minimum compression allows.
MAX_R = {"kron": 128, "lowrank": 1024, "kron_only": 128}
# Budget 1 is DistilGPT2's ratio to GPT-2, budget 2 half the blocks' parameters (the embeddings
# stay dense); the others are their percentage of the teacher's parameters (at 35 and 20 the
# embedding must be compressed too).
BUDGETS = {1: "65.8% of total", 2: "50% of the blocks", 80: "80% of total", 50: "50% of total",
           35: "35% of total", 20: "20% of total"}
PLANS = {}          # solve_budget's plans in this process, by (teacher, kinds, target, family)


def kinds_for(config, kinds):
    """A row's kinds in the teacher's family's words: SwiGLU's gate and up for c_fc, down for c_proj,
    q, k, v for c_attn, o for the attention's c_proj, and an untied lm_head with the embedding."""
    if not config.rotary:
        return tuple(kinds)
    out = tuple(k for gpt2 in kinds for k in LLAMA_WORDS[gpt2])
    return out + (("lm_head",) if "wte" in kinds and not config.tie_word_embeddings else ())


def budget_target(teacher, budget):
    """(target parameters, kinds allowed to be factored at this budget)."""
    c = count_params(teacher)
    total = c["hf"]
    if budget == 1:
        return round(compress.DISTIL_RATIO * total), None
    if budget != 2:
        return round(budget / 100 * total), None
    emb = sum(c["components"].get(k, 0) for k in ("wte (tied head)", "wpe", "lm_head (untied)"))
    return total - round(0.5 * (total - emb)), "no wte"


def dense_params(config, n_layer, n_embd):
    """count_params(...)["hf"] of a dense GPT-2 of this depth and width (the teacher's vocabulary and
    context): the embeddings, 12 d^2 + 13 d per block (q/k/v, projection, 4d MLP, two LayerNorms), ln_f."""
    return (config.vocab_size + config.block_size) * n_embd + n_layer * (12 * n_embd ** 2 + 13 * n_embd) + 2 * n_embd


def dense_shape(teacher, target):
    """The dense GPT (n_layer, n_head, n_embd) with the most parameters at or under target: depth up
    to the teacher's, width in steps of the teacher's head size (which it keeps)."""
    c = teacher.config
    head = c.n_embd // c.n_head
    if dense_params(c, c.n_layer, c.n_embd) != count_params(teacher)["hf"]:
        raise ValueError("dense_params does not count this teacher as count_params does (not GPT-2's block?)")
    fits = [(dense_params(c, L, d), L, d) for L in range(1, c.n_layer + 1) for d in range(head, c.n_embd + 1, head)
            if dense_params(c, L, d) <= target]
    if not fits:
        raise ValueError(f"no dense GPT with this vocabulary fits {target:,} parameters")
    _, L, d = max(fits)
    return dict(n_layer=L, n_head=d // head, n_embd=d)


def depth_layers(teacher, target):
    """DistilGPT2's depth pruning at a budget: the most blocks that fit (one at least), evenly spaced
    from block 0 (every other one when half fit: DistilGPT2's choice, Sanh et al. 2019)."""
    L = teacher.config.n_layer
    block = (count_params(teacher)["hf"] - count_params(teacher.keep_layers([0]))["hf"]) // (L - 1)
    k = max(1, min(L, L - math.ceil((count_params(teacher)["hf"] - target) / block)))
    return [i * L // k for i in range(k)]


def rules_of(plan, init):
    """The plan as spec rules, one per matrix (for train.py's stages)."""
    rules = []
    for name, mp in plan.items():
        kind = matrix_kind(name)
        rule = dict(kinds=[kind], a=[mp.m1, mp.n1], r=mp.r, init=init)
        if name != "wte":
            rule["layers"] = [int(name.split(".")[1])]
        rules.append(rule)
    return rules


def build(row, budget, teacher, hf_config, run_dir, iters, log, tokens):
    """Make the run's starting point. Returns TrainConfig overrides (init_from, stages, ...). A
    factored or shallower student is saved as OUT/run/init; the from-scratch rows start in train.py
    (init_from=scratch). tokens: the training split, for the whiten init's calibration."""
    spec = ROWS[row]
    target, restrict = budget_target(teacher, budget)
    if spec.get("dense_scratch"):
        shape = dense_shape(teacher, target)
        log(f"dense GPT from scratch: {shape}, {dense_params(teacher.config, shape['n_layer'], shape['n_embd']):,} "
            f"parameters")
        return dict(init_from="scratch", preset=None, spec=None, **shape)
    if "kinds" in spec:
        kinds = [k for k in kinds_for(teacher.config, spec["kinds"]) if not (restrict and k in ("wte", "lm_head"))]

        def solve(t):
            family = spec.get("family", "kron")
            key = (id(teacher), tuple(kinds), t, family)
            if key not in PLANS:        # the solver reads Van Loan's spectra only: one plan per key
                PLANS[key] = compress.solve_budget(teacher, t, kinds, max_r=MAX_R[family], init="vl",
                                                   progress=False, log=log, family=family, unreachable="closest")
            return {name: replace(mp, init=spec["init"]) for name, mp in PLANS[key].items()}
        plan = compress.uniform_lowrank(teacher, target, kinds, init=spec["init"], log=log) if spec.get("uniform") \
            else solve(target)
        log(f"plan: {compress.structure(teacher.config, plan)} in {len(plan)} matrices")
        if spec.get("multistep"):
            # two steps: halfway to the budget, distil, then the budget (matrices whose factor
            # shape changes are multiplied out and factored again from their distilled weights)
            first = solve((count_params(teacher)["hf"] + target) // 2)
            stages = [dict(iters=iters // 2, rules=rules_of(first, spec["init"])),
                      dict(iters=iters - iters // 2, rules=rules_of(plan, spec["init"]))]
            return dict(init_from="decompose", preset=None, spec=None, stages=stages)
        if spec.get("scratch"):           # the same shapes, random factors, GPT-2's init elsewhere
            return dict(init_from="scratch", preset=None, spec=None,
                        stages=[dict(iters=iters, rules=rules_of(plan, "random"))])
        covs = None
        if spec["init"] == "whiten":
            covs = compress.calibrate(teacher, tokens, list(plan), progress=False)
        student = copy.deepcopy(teacher)
        log(compress.format_report(compress.decompose(student, plan, compare=(), progress=False, covs=covs)))
    elif spec.get("width"):
        student, plan = prune.prune_to(teacher, target, tokens, log=log), {}
    elif spec.get("depth"):
        student, plan = teacher.keep_layers(depth_layers(teacher, target)), {}
        log(f"depth pruning: blocks {list(depth_layers(teacher, target))} kept")
    else:
        student, plan = copy.deepcopy(teacher), {}
    checkpoint.save_student(student, os.path.join(run_dir, "init"), plan, hf_config, made_by=f"compare.py {row}")
    return dict(init_from=os.path.join(run_dir, "init"))


def score(model, args):
    """OWT validation perplexity on the held-out documents (all of them unless --owt_tokens: the
    primary metric), WikiText-2 under the kp and hf protocols and LAMBADA (kp) on their first
    --max_tokens tokens."""
    tok = tokenizer.for_model(args.teacher, model.config.vocab_size)      # the teacher's: every row alike
    r = scoring.score_suite(model, tok, [("owt", "kp"), ("wiki2", "kp"), ("lambada", "kp"), ("wiki2", "hf")],
                                    args.data_dir, os.path.join(args.dataset, "val.bin"), args.device,
                                    args.max_tokens, owt_tokens=args.owt_tokens)
    return dict(owt=r["owt kp"]["ppl_token_weighted"], owt_bpb=r["owt kp"]["bits_per_byte"],
                wiki2_kp=r["wiki2 kp"]["ppl"], wiki2_hf=r["wiki2 hf"]["ppl"], lambada_kp=r["lambada kp"]["ppl"])


def settings(args):
    """What a stored result depends on besides its row, budget and seed: a change reruns it. The keys
    keep the flags' older names (iters, eval_tokens) so that stored results stay valid."""
    return dict(teacher=os.path.abspath(args.teacher), dataset=os.path.abspath(args.dataset), iters=args.max_iters,
                eval_tokens=args.max_tokens, owt_tokens=args.owt_tokens)


def run_one(row, budget, seed, args, teacher, hf_config):
    name = f"{row}-b{budget}-s{seed}"
    run_dir = os.path.join(args.out, name)
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done) and not args.force:
        with open(done) as f:
            old = json.load(f)
        if old.get("settings") == settings(args):
            return old
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "build.log"), "w") as logf:
        def log(msg):
            logf.write(str(msg) + "\n")
            logf.flush()
        t0 = time.time()
        overrides = build(row, budget, teacher, hf_config, run_dir, args.max_iters, log,
                          load_tokens(args.dataset, "train"))
        t_build = time.time() - t0
    if args.max_iters == 0:                 # the starting point itself: the loss before any training
        if not os.path.isdir(str(overrides.get("init_from"))):
            raise ValueError(f"{row} starts in train.py (from scratch or in stages): it has no starting point to "
                             f"score without training (--max_iters 0)")
        ckpt, trained = overrides["init_from"], dict(iters=0, tokens=0, train_s=0.0, val_loss=None)
    else:
        ckpt, trained = os.path.join(run_dir, "ckpt"), train(row, name, run_dir, seed, overrides, args)
    student, meta = checkpoint.load_student(ckpt)
    target, _ = budget_target(teacher, budget)
    params = count_params(student)["hf"]
    res = dict(run=name, row=row, n=ROWS[row]["n"], label=ROWS[row]["label"], budget=budget, seed=seed,
               target=target, params=params, reached=params <= target,
               n_layer=student.config.n_layer, factored=len(meta["factors"]),
               structure=compress.structure(student.config, meta["factors"]),
               n_embd=student.config.n_embd, n_inner=student.config.n_inner,
               build_s=round(t_build, 1), **trained)
    t0 = time.time()
    res.update(score(student, args))
    res["eval_s"] = round(time.time() - t0, 1)
    res["settings"] = settings(args)
    atomic.write_json(done, res)
    return res


def train(row, name, run_dir, seed, overrides, args):
    """The run's train.py (config/recipe_common.py, then the run's own file). Returns what the result
    records of it: iters, tokens, train_s, val_loss (the last in-training estimate)."""
    run_cfg = os.path.join(run_dir, "train_config.py")     # on top of config/recipe_common.py
    write_config(run_cfg, dict(
        out_dir=run_dir, teacher=args.teacher, dataset=args.dataset, seed=seed, max_iters=args.max_iters,
        lr_decay_iters=args.max_iters, eval_interval=max(1, args.max_iters // 2), eval_iters=args.eval_iters,
        device=args.device, progress=False, overwrite=True, **ROWS[row]["loss"], **overrides),
        f"compare.py's run {name}: train.py config/recipe_common.py {run_cfg}")
    t0 = time.time()
    run_command("train.py", [os.path.join(ROOT, "config", "recipe_common.py"), run_cfg],
                log_path=os.path.join(run_dir, "train.log"))
    with open(os.path.join(run_dir, "ckpt", checkpoint.TRAIN_STATE)) as f:
        state = json.load(f)
    cfg = state["config"]
    evals = [r for r in plots.read_metrics(run_dir) if "val_loss" in r]
    return dict(iters=state["iter_num"], train_s=round(time.time() - t0, 1),
                tokens=cfg["max_iters"] * cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"],
                val_loss=evals[-1]["val_loss"] if evals else None)


def table(results, teacher_row):
    head = ("| # | recipe | budget | seed | params (hf) | of teacher | OWT val bits/byte | OWT val ppl | WikiText-2 kp | "
            "WikiText-2 hf | LAMBADA kp | build + train (s) |")
    lines = [head, "|" + "---|" * 12]
    t = teacher_row

    def line(r, n, label, budget, seed):
        mark = "" if r.get("reached", True) or r.get("row") == "control" else \
            " (over budget: the recipe's kinds cannot reach it)"
        mark += f" (plan: {r['structure']})" if r.get("factored") else ""
        time_s = f"{r['build_s']:.0f} + {r['train_s']:.0f}" if "train_s" in r else "-"
        return (f"| {n} | {label}{mark} | {budget} | {seed} | {r['params']:,} | {r['params'] / t['params']:.1%} | "
                f"{r['owt_bpb']:.4f} | {r['owt']:.2f} | {r['wiki2_kp']:.1f} | {r['wiki2_hf']:.1f} | {r['lambada_kp']:.1f} | {time_s} |")
    lines.append(line(t, 0, "teacher (no training)", "-", "-"))
    for r in sorted(results, key=lambda r: (-r["target"] if r["row"] != "control" else -1e18, r["budget"], r["n"],
                                            r["seed"])):
        lines.append(line(r, r["n"], r["label"], BUDGETS[r["budget"]] if r["row"] != "control" else "dense",
                          r["seed"]))
    return "\n".join(lines)


def plot(results, teacher_row, targets, out):
    """OWT bits per byte against parameters: every run (circles budget 1, squares budget 2, one
    colour per row), the teacher, the control; the right panel zooms on the runs near the teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    near = [r["owt_bpb"] for r in results if r["owt_bpb"] < 1.05 * teacher_row["owt_bpb"]] + [teacher_row["owt_bpb"]]
    for ax, zoom in zip(axes, (False, True)):
        seen = set()
        ax.scatter([teacher_row["params"]], [teacher_row["owt_bpb"]], marker="*", s=150, c="k", label="teacher", zorder=3)
        ax.axhline(teacher_row["owt_bpb"], ls=":", c="k", lw=1)
        for r in results:
            if r["row"] == "control":
                ax.axhline(r["owt_bpb"], ls="--", c="gray", lw=1, label=f"control (dense, trained on), seed {r['seed']}")
                continue
            ax.scatter(r["params"], r["owt_bpb"], marker="o" if r["budget"] == 1 else "s", s=40 if r["n"] <= 10 else 60,
                       color=f"C{(r['n'] - 1) % 10}", label=None if zoom or r["n"] in seen else f"{r['n']} {r['row']}")
            seen.add(r["n"])
            ax.annotate(f"{r['n']}" + ("'" if r["seed"] != 1337 else ""), (r["params"], r["owt_bpb"]),
                        textcoords="offset points", xytext=(5, -3 + 7 * (r["n"] % 3 - 1)), fontsize=8)
        for budget in sorted({r["budget"] for r in results if r["row"] != "control"}):
            ax.axvline(targets[budget], ls=":", c="C1" if budget == 1 else "C2", lw=1,
                       label=f"budget {budget}: {BUDGETS[budget]}" if not zoom else None)
        if zoom:
            ax.set_ylim(min(near) - 0.01, max(near) + 0.01)
            ax.set_title("zoom: the runs within 5% of the teacher")
        else:
            ax.set_title("OWT bits per byte against parameters (o budget 1, s budget 2; ' other seeds)")
            ax.legend(fontsize=7)
        ax.set_xlabel("parameters (hf: every tensor once, tied head once)")
        ax.set_ylabel("OWT validation bits per byte (teacher's held-out docs)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110)


def frontier_points(results):
    """Per row, its frontier budgets' (mean parameters, mean bits per byte, seed range), by size."""
    out = {}
    for row in FRONTIER_ROWS:
        for b in FRONTIER:
            rs = [r for r in results if r["row"] == row and r["budget"] == b]
            if rs:
                bpb = [r["owt_bpb"] for r in rs]
                out.setdefault(row, []).append((sum(r["params"] for r in rs) / len(rs), sum(bpb) / len(bpb),
                                                max(bpb) - min(bpb)))
    return {row: sorted(p) for row, p in out.items()}


def plot_frontier(results, teacher_row, out):
    """OWT bits per byte against parameters, one curve per recipe through its budgets (seed means,
    the seed range as an error bar), the teacher as a star: where each structure lies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row, pts in frontier_points(results).items():
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=[v / 2 for v in e], marker="o", ms=4, capsize=2,
                    label=f"{ROWS[row]['n']} {row}", color=f"C{FRONTIER_ROWS.index(row)}")
    ax.scatter([teacher_row["params"]], [teacher_row["owt_bpb"]], marker="*", s=150, c="k", label="teacher", zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("parameters (hf: every tensor once, tied head once)")
    ax.set_ylabel("OWT validation bits per byte (log scale)")
    ax.set_title("the compression frontier: 80, 65.8, 50, 35 and 20% of the teacher")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=REFERENCE_TEACHER)
    p.add_argument("--dataset", default="data/owt_bpe8k", help="train.bin / val.bin (the teacher's split, in its "
                                                               "tokenizer)")
    p.add_argument("--data_dir", default=None, help="local evaluation data (default: ../shared/data if present)")
    p.add_argument("--out", default="out/compare")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="only these rows")
    p.add_argument("--budgets", nargs="+", type=int, choices=list(BUDGETS), help="only these budgets (1: 65.8%%, "
                   "2: half the blocks, 80, 50, 35, 20: that percentage of the teacher's parameters)")
    p.add_argument("--frontier", action="store_true", help="only the frontier's runs: its rows at its five budgets")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--max_iters", type=int, default=200,
                   help="optimizer steps per run (200 x 2,048 = 409,600 tokens)")
    p.add_argument("--eval_iters", type=int, default=10, help="batches per in-training loss estimate")
    p.add_argument("--max_tokens", type=positive_int, default=32768,
                   help="tokens of WikiText-2 and LAMBADA scored per run (OWT: all of val.bin)")
    p.add_argument("--owt_tokens", type=int, help="score only this many OWT validation tokens (quick runs)")
    p.add_argument("--device", type=device_type, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="rerun runs that have a result.json")
    args = p.parse_args(argv)
    if args.max_iters < 2 and args.max_iters != 0:
        p.error("--max_iters must be at least 2 (multi-step needs a step per stage), or 0 (score each starting "
                "point without training)")
    if not all(os.path.exists(os.path.join(args.dataset, f)) for f in ("train.bin", "val.bin")):
        if not os.path.exists(OWT_SAMPLE):
            p.error(f"{args.dataset} has no train.bin / val.bin and the OWT sample is not at {OWT_SAMPLE}; "
                    f"prepare the data first (see the top of this script's help)")
        teacher_tok = tokenizer.for_model(args.teacher, GPT.from_pretrained(args.teacher)[0].config.vocab_size)
        run_command("data/owt/prepare.py", ["--input", OWT_SAMPLE, "--val_last", "71", "--out", args.dataset,
                                            "--tokenizer", teacher_tok.name])        # the teacher's own split
    if args.data_dir is None:
        local = os.path.join(SHARED, "data")
        args.data_dir = local if os.path.isdir(local) else None
    runs = [(r, b, s) for r, b, s in RUNS if (not args.rows or r in args.rows)
            and (not args.frontier or (r in FRONTIER_ROWS and b in FRONTIER))
            and (not args.budgets or b in args.budgets) and (not args.seeds or s in args.seeds)]
    if not runs:
        p.error("no run matches --rows/--budgets/--seeds (the runs: " +
                ", ".join(f"{r}-b{b}-s{s}" for r, b, s in RUNS) + ")")
    return run_main("compare.py", run_all, args, runs)


def run_all(args, runs):
    """Score the teacher (once per settings), run every run not done yet, then write the table, the
    plot and results.json from every finished run."""
    teacher, hf_config = GPT.from_pretrained(args.teacher)
    teacher.requires_grad_(False)
    targets = {b: budget_target(teacher, b)[0] for b in BUDGETS}
    os.makedirs(args.out, exist_ok=True)
    tpath = os.path.join(args.out, "teacher.json")
    teacher_row = None
    if os.path.exists(tpath):
        with open(tpath) as f:
            teacher_row = json.load(f)
    if teacher_row is None or teacher_row.get("settings") != settings(args):
        teacher_row = dict(params=count_params(teacher)["hf"], settings=settings(args), **score(teacher, args))
        atomic.write_json(tpath, teacher_row)
    budgets = "; ".join(f"budget {b} = {t:,}" for b, t in targets.items())
    print(f"teacher {args.teacher}: {teacher_row['params']:,} parameters, OWT val ppl {teacher_row['owt']:.2f}; "
          f"{budgets}", flush=True)
    for row, budget, seed in runs:
        t0 = time.time()
        try:
            r = run_one(row, budget, seed, args, teacher, hf_config)
        except KeyboardInterrupt:       # the run's result.json is not written: it reruns next time
            print(f"compare.py: interrupted in {row}-b{budget}-s{seed}; finished runs are kept, rerun to continue",
                  file=sys.stderr)
            return 130
        except Exception as e:
            raise RuntimeError(f"{row}-b{budget}-s{seed} failed: {e}") from e
        over = not r["reached"] and row != "control"
        print(f"{r['run']:<24} params {r['params']:>10,}{' (over budget)' if over else ''}  "
              f"OWT {r['owt_bpb']:.4f} bits/byte (ppl {r['owt']:8.2f})  wiki2 kp {r['wiki2_kp']:8.1f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
    done = []
    for row, budget, seed in RUNS:                  # every finished run, for the table and the plot
        path = os.path.join(args.out, f"{row}-b{budget}-s{seed}", "result.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            if r.get("settings") == settings(args):
                done.append(r)
    atomic.write_json(os.path.join(args.out, "results.json"), dict(teacher=teacher_row, runs=done))
    md = table(done, teacher_row)
    atomic.write_text(os.path.join(args.out, "table.md"), md + "\n")
    plot(done, teacher_row, targets, os.path.join(args.out, "ppl_vs_params.png"))
    front = [r for r in done if r["row"] in FRONTIER_ROWS and r["budget"] in FRONTIER]
    if front:
        plot_frontier(front, teacher_row, os.path.join(args.out, "frontier.png"))
    print(md)
    print(f"wrote {args.out}/results.json, table.md, ppl_vs_params.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
