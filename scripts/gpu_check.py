"""
One command for a person with a GPU: every path that only runs there, in a few minutes, into one
report (OUT/report.md, each step's command, time, status and output).

  python scripts/gpu_check.py                          GPT-2 small shapes (random weights), ../shared data
  python scripts/gpu_check.py --teacher gpt2           with the real GPT-2 (hub access)

Steps:
  1 bench_kron    KronLinear against nn.Linear on CUDA, bfloat16 (scripts/bench_kron.py)
  2 bench_train   the dense step against the distillation steps on CUDA, bfloat16, compiled and not
                  (scripts/bench_train.py: tokens/s, peak memory, MFU)
  3 bench_infer   prefill and decode with the KV cache: the teacher against its students' dense and
                  compact exports on CUDA, bfloat16 (scripts/bench_infer.py: tokens/s, weights, memory)
  4 bf16 teacher  the teacher's WikiText-2 perplexity under bfloat16 autocast against float32
                  (perplexity_eval.py --dtype; the two must agree within 0.5%)
  5 bench_eval    batched evaluation against the Hugging Face guide's loop on CUDA
  6 solver        the budget solver and decomposition on CUDA (kron_decompose.py --device cuda)
  7 train         train.py on CUDA: GPT-2 shapes, bfloat16, compile, a two-stage schedule, 6 steps
  8 nccl          two ranks with nccl on the same run, when two GPUs are there (skipped otherwise)
Every step runs whatever the others did; the exit status is 1 if any failed. --device cpu --quick
runs the same sequence on a CPU at toy sizes (what the test suite does, to keep this script working).
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import SHARED  # noqa: E402


STEPS = ("bench_kron", "bench_train", "bench_train compiled", "bench_infer", "teacher float32", "teacher bfloat16", "bench_eval",
         "solver", "train", "nccl")


def steps(args, teacher, data):
    """[(name, command, timeout seconds)], in order; None as command means skipped (with why)."""
    py, dev, q = sys.executable, args.device, args.quick
    dt = "bfloat16"
    bench_tokens = ["--tokens", "512", "--reps", "1", "--only", "balanced"] if q else []
    train_shape = ["--block_size", "64", "--batch_size", "2", "--steps", "1"] if q else []
    infer_shape = ["--prefill", "32", "--new_tokens", "8", "--reps", "1"] if q else []
    eval_tokens = ["--max_tokens", "2048"] if q else []
    work = os.path.join(args.out, "work")
    two_stages = ('--stages=[{"iters": 3, "preset": "krony-81m"}, '
                  '{"iters": 3, "rules": [{"kinds": ["wte"], "b": [1, 4]}, '
                  '{"kinds": ["mlp.c_fc"], "layers": "all", "b": [4, 1]}, {"kinds": ["mlp.c_proj"], "layers": "all", '
                  '"b": [1, 4]}]}]')
    train_args = [f"--teacher={teacher}", f"--dataset={os.path.join(work, 'bench', 'data')}", "--preset=None",
                  two_stages, "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=1", "--eval_interval=6",
                  "--eval_iters=2", "--log_interval=1", f"--dtype={dt}", "--compile=True", "--progress=False",
                  f"--block_size={64 if q else 1024}", f"--batch_size={2 if q else 8}", "--gradient_accumulation_steps=2",
                  "--overwrite=True"]
    n_gpus = _gpus() if dev.startswith("cuda") else 0
    ppl = [py, "perplexity_eval.py", teacher, "wiki2", "--data_dir", data, "--device", dev, *eval_tokens]
    return [
        ("bench_kron", [py, "scripts/bench_kron.py", "--device", dev, "--dtype", dt, *bench_tokens], 900),
        ("bench_train", [py, "scripts/bench_train.py", "--device", dev, "--dtype", dt, "--teacher", teacher,
                         "--out", os.path.join(work, "bench"), *train_shape], 900),
        ("bench_train compiled", [py, "scripts/bench_train.py", "--device", dev, "--dtype", dt, "--compile",
                                  "--teacher", teacher, "--out", os.path.join(work, "bench"), *train_shape], 900),
        ("bench_infer", [py, "scripts/bench_infer.py", "--device", dev, "--dtype", dt, "--teacher", teacher,
                         "--out", os.path.join(work, "bench"), *infer_shape], 900),
        ("teacher float32", ppl + ["--dtype", "float32", "--json", os.path.join(work, "ppl_float32.json")], 600),
        ("teacher bfloat16", ppl + ["--dtype", dt, "--json", os.path.join(work, "ppl_bfloat16.json")], 600),
        ("bench_eval", [py, "scripts/bench_eval.py", teacher, "--data_dir", data, "--device", dev,
                        "--reps", "1", *(eval_tokens or ["--max_tokens", "65536"])], 600),
        ("solver", [py, "kron_decompose.py", "--teacher", teacher, "--device", dev, "--target_params",
                    str(args.target_params), "--max_r", "128", "--out", os.path.join(work, "solver")], 900),
        ("train", [py, "train.py", *train_args, f"--device={dev}", f"--out_dir={os.path.join(work, 'train')}"], 900),
        ("nccl", [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *train_args,
                  f"--out_dir={os.path.join(work, 'nccl')}"] if n_gpus >= 2 else
         f"skipped: {n_gpus} GPU(s) here, two needed", 900),
    ]


def _gpus():
    import torch
    return torch.cuda.device_count()


def bf16_verdict(work):
    """The bfloat16-vs-float32 teacher perplexity line of the report, from the two JSON files."""
    import json
    try:
        p = {d: json.load(open(os.path.join(work, f"ppl_{d}.json")))["results"]["kp"]["wiki2"]["ppl"]
             for d in ("float32", "bfloat16")}
    except (OSError, KeyError, ValueError):
        return "bf16 vs float32 teacher perplexity: not available (a step failed)"
    rel = p["bfloat16"] / p["float32"] - 1
    return (f"bf16 vs float32 teacher perplexity (WikiText-2, kp): {p['bfloat16']:.3f} vs {p['float32']:.3f}, "
            f"{rel:+.3%} ({'within' if abs(rel) < 0.005 else 'OUTSIDE'} 0.5%)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="hub name or GPT-2 folder (default: a random-weight GPT-2 small)")
    p.add_argument("--data_dir", default=os.path.join(SHARED, "data"), help="local evaluation data")
    p.add_argument("--device", default="cuda")
    p.add_argument("--target_params", type=int, default=81_912_576, help="the solver step's target")
    p.add_argument("--out", default="out/gpu_check")
    p.add_argument("--quick", action="store_true", help="toy sizes (a smoke test of this script)")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (names as in the report)")
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - set(STEPS)
    if unknown:
        p.error(f"--only: unknown steps {sorted(unknown)}; the steps: {', '.join(STEPS)}")
    os.makedirs(os.path.join(args.out, "work"), exist_ok=True)
    import bench
    teacher = bench.build(os.path.join(args.out, "work", "bench"), args.teacher, args.target_params,
                                device=args.device)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TIKTOKEN_CACHE_DIR=os.environ.get(
        "TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "data", "gpt2_tokenizer", "tiktoken_cache")))
    report, failed = [f"# GPU check ({args.device}{', quick' if args.quick else ''})", ""], []
    for name, cmd, timeout in steps(args, teacher, args.data_dir):
        if args.only and name not in args.only:
            continue
        if isinstance(cmd, str):
            report += [f"## {name}: {cmd}", ""]
            continue
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
            status, out = ("ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"), proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, out = f"FAILED (timeout {timeout} s)", (e.stdout or b"").decode(errors="replace")
        if status != "ok":
            failed.append(name)
        report += [f"## {name}: {status}, {time.time() - t0:.0f} s", "", "`" + " ".join(cmd) + "`", "", "```",
                   "\n".join(out.strip().splitlines()[-60:]), "```", ""]
        print(f"[{name}] {status}", flush=True)
    report.append(bf16_verdict(os.path.join(args.out, "work")))
    import atomic
    atomic.write_text(os.path.join(args.out, "report.md"), "\n".join(report) + "\n")
    print(f"wrote {os.path.join(args.out, 'report.md')}; " + (f"failed: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
