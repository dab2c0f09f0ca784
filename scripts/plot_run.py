"""
Plot training runs: the held-out loss from the first evaluation (with the teacher's on the same
batches as a dotted line), the training objective and each distillation term, and the learning
rate, from each run directory's metrics.jsonl, into one PNG.

  python scripts/plot_run.py checks/mini
  python scripts/plot_run.py checks/recipe_krony81m checks/recipe_tq_like --out recipes.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plots  # noqa: E402
from configurator import run_main  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (train.py's out_dir)")
    p.add_argument("--out", help="PNG to write (default: RUN/loss.png for one run, runs.png for several)")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(args.runs[0], "loss.png") if len(args.runs) == 1 else "runs.png")
    return run_main("plot_run.py", write_plot, args.runs, out)


def write_plot(runs, out):
    print(f"wrote {plots.plot_runs(runs, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
