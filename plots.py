"""
Plots of runs and students: training curves from train.py's metrics.jsonl, and per-matrix
reconstruction errors. PNGs written atomically (matplotlib's Agg backend: no display needed).
"""

import json
import os

import atomic


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (a run directory of train.py holds it)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs, out):
    """The held-out loss from the first evaluation (the teacher's on the same batches dotted), the
    training objective and each distillation term, and the learning rate, of each run, into one PNG."""
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


def plot_reconstruction(before, after, path):
    """Each factored matrix's relative reconstruction error of the teacher's weights, after
    decomposition and after training, as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(before)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [before[n] for n in names], 0.4, label="after decomposition (init)")
    ax.bar([i + 0.2 for i in x], [after[n] for n in names], 0.4, label="after training")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("||W_teacher - W_student||_F / ||W_teacher||_F")
    ax.set_title("per-matrix reconstruction error of the teacher's weights")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
