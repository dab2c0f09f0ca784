"""
Plot training runs: the held-out loss from the first evaluation (with the teacher's on the same
batches as a dotted line), the training objective and each distillation term, and the learning
rate, from each run directory's metrics.jsonl, into one PNG.

  python scripts/plot_run.py checks/mini
  python scripts/plot_run.py checks/recipe_krony81m checks/recipe_tq_like --out recipes.png
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import atomic  # noqa: E402
from configurator import run_main  # noqa: E402


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"plot_run.py: error: {path} not found (a run directory of train.py holds it)")
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def plot(run_dirs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_terms, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.5))
    for run in run_dirs:
        rows = read_metrics(run)
        name = os.path.basename(os.path.normpath(run))
        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "val_loss" in r]
        if steps:       # the objective beside its terms: a KL is far below the held-out cross-entropy
            ax_terms.plot([r["iter"] for r in steps], [r["loss"] for r in steps], "k", alpha=0.5,
                          label=f"{name} objective")
            terms = sorted({k for r in steps for k in r if k.startswith("loss_")})
            for k in terms:
                ax_terms.plot([r["iter"] for r in steps], [r[k] for r in steps], label=f"{name} {k[5:]}")
            ax_lr.plot([r["iter"] for r in steps], [r["lr"] for r in steps], label=name)
        if evals:
            ax_loss.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o--", label=f"{name} train (eval)")
            line = ax_loss.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label=f"{name} val")
            if "teacher_val_loss" in evals[-1]:      # the teacher on the same validation batches
                ax_loss.axhline(evals[-1]["teacher_val_loss"], ls=":", color=line[0].get_color(),
                                label=f"{name} teacher val")
    for ax, title in ((ax_loss, "held-out loss (cross-entropy; dotted: the teacher)"),
                      (ax_terms, "training objective and its terms (unweighted)"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_terms.set_yscale("log")
    fig.tight_layout()
    with atomic.atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=120)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (train.py's out_dir)")
    p.add_argument("--out", help="PNG to write (default: RUN/loss.png for one run, runs.png for several)")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 else "runs.png")
    return run_main("plot_run.py", write_plot, args.runs, out)


def write_plot(runs, out):
    print(f"wrote {plot(runs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
