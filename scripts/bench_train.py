"""
Training-step speed and memory at GPT-2 small's shapes: the dense model's plain language-model step
against the student's distillation step, measured side by side in one run.

  python scripts/bench_train.py                                     CPU: 1 x 1024 tokens, float32
  python scripts/bench_train.py --device cuda --dtype bfloat16 --batch_size 12 --compile

Cases, each in its own process (so that its memory is its own):
  dense      nanoGPT's step on the dense model: forward with the cross-entropy loss, backward, AdamW
  krony-81m  train.py's step on Krony-PT's 81M student: the student's forward and backward, the
             teacher's forward, KL to the teacher's next-token distribution
  budget     the same for the budget solver's student at DistilGPT2's 81,912,576 parameters
The teacher is a random-weight GPT-2 small (GPT2LMHeadModel(GPT2Config()), no hub) unless --teacher
names one; students are decomposed from it once and kept in --out. Tokens are random.
Reported per case: tokens/s of the timed steps (after --warmup steps), peak memory, and on CUDA the
MFU (machine.peak_flops; FLOPs from GPT.flops_per_token, factored products at their real
multiply-adds). Peak memory is CUDA's max_memory_allocated, or on a CPU the process's peak resident
set size during the timed steps (VmHWM, reset through /proc/self/clear_refs after malloc_trim has
returned what loading freed; memory freed during the steps stays in the process, as train.py keeps
it, so this is closer to CUDA's reserved than to its allocated memory).
Goals (the table says met or not): the distillation step's peak memory at most 1.3x the dense
step's plus the teacher's weights, and krony-81m's tokens/s at least 0.8x the dense step's.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configurator import device_type, run_main  # noqa: E402
from bench import DISTILGPT2, STUDENTS, build, peak_bytes, report, reset_peak, run_case  # noqa: E402
import machine  # noqa: E402
from autotune import sync  # noqa: E402

CASES = ("dense",) + STUDENTS


def step_fns(case, args, teacher):
    """(step(it) -> loss tensor, FLOPs per iteration, parameters, teacher weight bytes) for a case."""
    import train
    from data import get_batch, load_tokens
    from model import count_params
    cfg = train.TrainConfig(
        init_from=os.path.join(args.out, case), teacher=teacher,
        dataset=os.path.join(args.out, "data"), batch_size=args.batch_size, block_size=args.block_size,
        gradient_accumulation_steps=1, device=args.device, dtype=args.dtype, compile=args.compile,
        kd_weight=1.0, ce_weight=0.0, progress=False, max_iters=10 ** 6, lr_decay_iters=10 ** 6)
    if case == "dense":                  # nanoGPT's step: forward with targets, backward, AdamW
        from model import GPT
        machine.keep_freed_memory()
        torch.manual_seed(0)
        model = GPT.from_pretrained(teacher)[0].to(args.device)
        opt = train.make_optimizer(model, cfg, args.device)
        fwd = torch.compile(model) if args.compile else model
        amp = args.dtype != "float32"
        data = load_tokens(cfg.dataset, "train")
        ctx = torch.autocast(torch.device(args.device).type, dtype=getattr(torch, args.dtype), enabled=amp)
        if args.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True

        def step(it):
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, cfg.seed, it, 0, args.device)
            with ctx:
                loss = fwd(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        flops = model.flops_per_token(cfg.block_size) * cfg.batch_size * cfg.block_size
        return step, flops, count_params(model)["hf"], 0
    run = train.setup(cfg, lambda *a: None)
    train.prepare(run)
    teacher_bytes = sum(p.numel() * p.element_size() for p in run.teacher.parameters())
    return (lambda it: sum(train.train_step(run, it)[0].values()), run.flops_per_iter,
            count_params(run.student)["hf"], teacher_bytes)


def measure(case, args, teacher):
    """Time the case's steps in this process; returns its row."""
    step, flops, params, teacher_bytes = step_fns(case, args, teacher)
    for it in range(args.warmup):
        step(it).item()
    sync(args.device)
    reset_peak(args.device)
    t0 = time.perf_counter()
    for it in range(args.warmup, args.warmup + args.steps):
        loss = step(it)
    loss.item()
    sync(args.device)
    dt = time.perf_counter() - t0
    tokens = args.steps * args.batch_size * args.block_size
    peak = machine.peak_flops(args.device, args.dtype)
    return dict(case=case, params=params, tokens_per_s=tokens / dt, ms_per_step=1000 * dt / args.steps,
                peak_bytes=peak_bytes(args.device), teacher_bytes=teacher_bytes,
                mfu=flops * args.steps / dt / peak if peak else None, loss=float(loss))


def table(rows, args):
    dense = next((r for r in rows if r["case"] == "dense"), None)
    lines = [f"GPT-2 small shapes, {args.batch_size} x {args.block_size} tokens per step, {args.dtype}, "
             f"{args.device}{', compiled' if args.compile else ''}; {args.steps} timed steps after {args.warmup}",
             "",
             "| case | params (hf) | tokens/s | vs dense | ms/step | peak memory | (peak - teacher) / dense | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if dense else "-"
        mem = f"{(r['peak_bytes'] - r['teacher_bytes']) / dense['peak_bytes']:.2f}x" if dense else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['case']} | {r['params']:,} | {r['tokens_per_s']:,.0f} | {speed} | {r['ms_per_step']:,.0f} | "
                     f"{r['peak_bytes'] / 2 ** 30:.2f} GB | {mem} | {mfu} |")
    if dense:
        for r in rows:
            if r["case"] == "dense":
                continue
            ok_mem = r["peak_bytes"] <= 1.3 * dense["peak_bytes"] + r["teacher_bytes"]
            lines.append(f"{r['case']}: peak memory {'within' if ok_mem else 'ABOVE'} 1.3x dense + teacher weights")
            if r["case"] == "krony-81m":
                ok = r["tokens_per_s"] >= 0.8 * dense["tokens_per_s"]
                lines.append(f"{r['case']}: tokens/s {'at least' if ok else 'BELOW'} 0.8x dense")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_type, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--batch_size", type=int, default=None, help="default 1 on a CPU, 12 on CUDA")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--teacher", help="a GPT-2 folder or hub name (default: random GPT-2 small)")
    p.add_argument("--target_params", type=int, default=DISTILGPT2, help="the budget student's size")
    p.add_argument("--out", "--workdir", dest="out", default="out/bench_train", help="teacher, tokens and students, built once")
    p.add_argument("--json", metavar="FILE", help="also write the rows (and the arguments) as JSON to FILE")
    p.add_argument("--case", help=argparse.SUPPRESS)           # internal: measure one case in this process
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch_size = args.batch_size or (12 if cuda else 1)
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 1:
        p.error("--steps, --warmup and --batch_size must be at least 1")
    return run_main("bench_train.py", run, args)


def run(args):
    if args.case:
        print(json.dumps(measure(args.case, args, args.teacher)))
        return 0
    teacher = build(args.out, args.teacher, args.target_params, args.device)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--teacher", teacher,
               "--device", args.device, "--dtype", args.dtype, "--batch_size", str(args.batch_size),
               "--block_size", str(args.block_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--out", args.out] + (["--compile"] if args.compile else [])
        rows.append(run_case(case, cmd))
        print(f"{case}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, peak {rows[-1]['peak_bytes'] / 2 ** 30:.2f} GB",
              flush=True)
    report(table(rows, args), rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
