"""
Inference speed and memory of a dense GPT-2 and its compressed students, as they are deployed: each
model loaded through transformers' AutoModelForCausalLM from its export and run with its KV cache,
side by side in one run.

  python scripts/bench_infer.py                                          GPT-2 small shapes (random weights)
  python scripts/bench_infer.py --teacher ../shared/teacher/owt-6x256-bpe8k --out out/bench_infer_bpe8k
  python scripts/bench_infer.py --device cuda

Cases, each in its own process (so that its memory is its own):
  teacher            the dense teacher (GPT2LMHeadModel)
  krony-81m dense    Krony-PT's 81M student multiplied out: the dense export (GPT2LMHeadModel)
  krony-81m compact  the same student with its factors kept: the compact export (krony_gpt2)
  budget dense       the budget solver's student at 65.8% of the teacher (DistilGPT2's ratio to GPT-2)
  budget compact
On a Llama-family teacher (its dense exports LlamaForCausalLM, the compact ones krony_gpt2 as for
GPT-2) the krony-81m cases are the llama-mlp-b4 preset: the same factor shapes on gate_proj, up_proj
and down_proj.
The students are decomposed from the teacher (Van Loan; speed does not depend on the values) once
and kept in --out with their dense exports; the teacher is a random-weight GPT-2 small unless
--teacher names one. Tokens are random.
Reported per case: weight bytes (parameters and buffers), prefill tokens/s (a batch of 8 prompts of
--prefill tokens, one forward that fills the cache, the last position's logits only), decode tokens/s
at batch 1 and 8 (--new_tokens greedy steps of one token each after a 64-token prompt), the peak
memory during all of it, and for a compact student the product each factored matrix uses per phase
(impl="auto" times the factored orders against multiplying out, per number of tokens: where the
factored product loses, it says "dense"). Peak memory as in bench_train.py.
Goal (the table says met or not): krony-81m compact decodes at batch 1 at least 1.2x as fast as the
teacher with at most 0.75x its weight bytes.
"""

import argparse
import json
import os
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from configurator import device_type, run_main  # noqa: E402
from autotune import sync  # noqa: E402

from bench import DISTILGPT2, build, peak_bytes, report, reset_peak, run_case  # noqa: E402

CASES = ("teacher", "krony-81m dense", "krony-81m compact", "budget dense", "budget compact")


def case_dir(workdir, teacher, case):
    if case == "teacher":
        return teacher
    student, form = case.split()
    return os.path.join(workdir, student) if form == "compact" else os.path.join(workdir, f"{student}_dense")


def prepare(args):
    """Teacher, students and their dense exports in args.out, made once. Returns the teacher."""
    import checkpoint
    teacher = build(args.out, args.teacher, target=None if args.teacher else DISTILGPT2, log=lambda *a: None)
    for student in ("krony-81m", "budget"):
        out = os.path.join(args.out, f"{student}_dense")
        if not os.path.exists(os.path.join(out, "model.safetensors")):
            model, cfg = checkpoint.load_student(os.path.join(args.out, student))
            checkpoint.export_dense(model, out, cfg.get("hf_config"))
    return teacher


def weight_bytes(model):
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def decode(model, ids, new_tokens, device):
    """Prefill ids, then new_tokens greedy one-token steps with the cache; seconds of the steps."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return time.perf_counter() - t0


def impls_used():
    """The products impl="auto" chose, per number of tokens in a call (rounded up to a power of two, as
    autotune.choose_impl keys them): {tokens: {impl: how many factor shapes}}."""
    from autotune import IMPL_CACHE
    used = {}
    for key, impl in IMPL_CACHE.items():
        used.setdefault(key[7], Counter())[impl] += 1
    return {str(k): dict(v) for k, v in sorted(used.items())}


def measure(case, args, teacher):
    """Load the case's model through transformers and time it in this process; returns its row."""
    import krony_hf
    from transformers import AutoModelForCausalLM
    krony_hf.register_with_transformers()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(case_dir(args.out, teacher, case), dtype=dtype,
                                                 trust_remote_code=False)
    model = model.to(args.device).eval()
    block = model.config.max_position_embeddings
    vocab = model.config.vocab_size
    new = min(args.new_tokens, block // 2)
    T, P = min(args.prefill, block), min(64, block - new)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, T), generator=g).to(args.device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)                  # warm-up: impl choice per shape
        for b in (1, 8):
            decode(model, ids[:b, :P], 2, args.device)
        reset_peak(args.device)
        prefill = []
        for _ in range(args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync(args.device)
            prefill.append(time.perf_counter() - t0)
        dec = {b: min(decode(model, ids[:b, :P], new, args.device) for _ in range(args.reps)) for b in (1, 8)}
    from model import count_params
    return dict(case=case, params=count_params(model)["hf"], weight_bytes=weight_bytes(model),
                prefill_tokens=8 * T, prefill_tok_s=8 * T / min(prefill), prompt=P, new_tokens=new,
                decode1_tok_s=new / dec[1], decode8_tok_s=8 * new / dec[8], peak_bytes=peak_bytes(args.device),
                impls=impls_used())


def table(rows, args):
    base = next((r for r in rows if r["case"] == "teacher"), None)
    r0 = rows[0]
    lines = [f"{args.device}, {args.dtype}; prefill 8 x {r0['prefill_tokens'] // 8} tokens; decode {r0['new_tokens']} "
             f"greedy tokens after a {r0['prompt']}-token prompt, with the KV cache; best of {args.reps}", "",
             "| case | params (hf) | weights | prefill tok/s | decode b1 tok/s | decode b8 tok/s | peak memory | "
             "b1 decode vs teacher | weights vs teacher |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = (f"{r['decode1_tok_s'] / base['decode1_tok_s']:.2f}x", f"{r['weight_bytes'] / base['weight_bytes']:.2f}x") \
            if base else ("-", "-")
        lines.append(f"| {r['case']} | {r['params']:,} | {r['weight_bytes'] / 2 ** 20:,.1f} MB | {r['prefill_tok_s']:,.0f} | "
                     f"{r['decode1_tok_s']:,.1f} | {r['decode8_tok_s']:,.1f} | {r['peak_bytes'] / 2 ** 20:,.0f} MB | "
                     f"{vs[0]} | {vs[1]} |")
    for r in rows:
        if r["impls"]:
            lines.append(f"{r['case']}: products chosen per tokens in a call (product x factor shapes): "
                         + "; ".join(f"{n}: " + ", ".join(f"{k} x{v}" for k, v in d.items()) for n, d in r["impls"].items()))
    goal = next((r for r in rows if r["case"] == "krony-81m compact"), None)
    if base and goal:
        fast = goal["decode1_tok_s"] >= 1.2 * base["decode1_tok_s"]
        light = goal["weight_bytes"] <= 0.75 * base["weight_bytes"]
        lines.append(f"goal: krony-81m compact decodes at batch 1 {'at least' if fast else 'BELOW'} 1.2x the teacher, "
                     f"with weights {'within' if light else 'ABOVE'} 0.75x its")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_type, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens per row at prefill (batch 8)")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--teacher", help="a GPT-2 folder (default: random GPT-2 small)")
    p.add_argument("--out", "--workdir", dest="out", default="out/bench_infer", help="teacher, students and exports, built once")
    p.add_argument("--json", metavar="FILE", help="also write the rows (and the arguments) as JSON to FILE")
    p.add_argument("--case", help=argparse.SUPPRESS)           # internal: measure one case in this process
    args = p.parse_args(argv)
    if min(args.prefill, args.new_tokens, args.reps) < 1:
        p.error("--prefill, --new_tokens and --reps must be at least 1")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        p.error(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    return run_main("bench_infer.py", run, args)


def run(args):
    if args.case:
        print(json.dumps(measure(args.case, args, args.teacher)))
        return 0
    teacher = prepare(args)
    rows = []
    for case in args.cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--teacher", teacher,
               "--device", args.device, "--dtype", args.dtype, "--prefill", str(args.prefill),
               "--new_tokens", str(args.new_tokens), "--reps", str(args.reps), "--out", args.out]
        rows.append(run_case(case, cmd))
        r = rows[-1]
        print(f"{case}: prefill {r['prefill_tok_s']:,.0f} tok/s, decode b1 {r['decode1_tok_s']:,.1f} tok/s, "
              f"b8 {r['decode8_tok_s']:,.1f} tok/s, peak {r['peak_bytes'] / 2 ** 20:,.0f} MB", flush=True)
    report(table(rows, args), rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
