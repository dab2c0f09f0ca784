"""
Run one config several times with different overrides and tabulate the held-out losses: the
measurement behind train.py's defaults.

  python scripts/sweep.py config/train_mini.py --max_iters=100 --lr_decay_iters=100 \\
      --run "ce only:--kd_weight=0" --run "kd only:--ce_weight=0" --run "kd+ce:" \\
      --run "kd+ce T=2:--temperature=2" --run "kd+ce+hidden:--hidden_weight=1"

Each run writes checks/sweep/<n>/ (its own out_dir); the table gives every evaluation's val loss.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--run", action="append", required=True, help='"name:--key=value --key=value"')
    p.add_argument("--out", default="checks/sweep")
    args, common = p.parse_known_args()
    results, failed = {}, []
    for i, spec in enumerate(args.run):
        name, _, overrides = spec.partition(":")
        out = os.path.join(args.out, str(i))
        cmd = [sys.executable, "train.py", args.config, *common, *overrides.split(), f"--out_dir={out}", "--progress=False",
               "--overwrite=True"]
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:])
            failed.append(name)
            continue
        with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
            evals = [json.loads(l) for l in f if "val_loss" in l]
        results[name] = {e["iter"]: e["val_loss"] for e in evals}
        print(f"[{name}] val loss {evals[-1]['val_loss']:.4f}", flush=True)
    iters = sorted({i for r in results.values() for i in r})
    print(f"{'run':<16}" + "".join(f"{'it ' + str(i):>10}" for i in iters))
    for name, r in results.items():
        print(f"{name:<16}" + "".join(f"{r.get(i, float('nan')):>10.4f}" for i in iters))
    if failed:
        print(f"sweep.py: error: {len(failed)} of {len(args.run)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
