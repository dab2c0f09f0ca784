"""
Evaluation speed: perplexity_eval.py's batched windows against the Hugging Face guide's plain loop
(one window per forward, transformers' GPT2LMHeadModel, labels shifted inside the model) on the
same model, the same raw WikiText-2 test tokens and the same windows (stride = context length).
Prints tokens per second of each, their ratio, and both perplexities (they must agree).

  python scripts/bench_eval.py ../shared/teacher/owt-mini-gpt2 --data_dir ../shared/data
  python scripts/bench_eval.py gpt2 --device cuda --batch_size 16
"""

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scoring  # noqa: E402
import tokenizer  # noqa: E402
from configurator import device_type, positive_int, run_main  # noqa: E402
from autotune import sync  # noqa: E402


def guide_loop(hf, ids, L, device):
    """The Hugging Face perplexity guide's loop at stride = L, one window at a time."""
    ids = torch.tensor(ids)[None].to(device)
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), L):
        end = min(begin + L, ids.size(1))
        trg_len = end - prev_end
        x = ids[:, begin:end]
        y = x.clone()
        y[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(x, labels=y).loss
        valid = (y[:, 1:] != -100).sum().item()
        nll += loss.item() * valid
        n += valid
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll / n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="hub name or local GPT-2 directory (or --model)")
    p.add_argument("--model", dest="model_opt", help=argparse.SUPPRESS)       # the older spelling
    p.add_argument("--data_dir", default=scoring.data_dir_default())
    p.add_argument("--device", type=device_type, default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--max_tokens", type=positive_int, default=None)
    p.add_argument("--reps", type=positive_int, default=3)
    args = p.parse_args(argv)
    args.model = args.model or args.model_opt
    if not args.model:
        p.error("give the model: a hub name or a local GPT-2 directory")
    return run_main("bench_eval.py", run, args)


def run(args):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(args.model, trust_remote_code=False).to(args.device).eval()
    ours, _ = scoring.load_model(args.model, args.device)
    L = ours.config.block_size
    tok = tokenizer.for_model(args.model, ours.config.vocab_size)
    ids = scoring.cached_tokens("\n\n".join(scoring.load_rows("wikitext-2-raw-v1", args.data_dir)), tok, "data/eval_cache")
    ids = ids[:args.max_tokens] if args.max_tokens else ids
    forward = scoring.make_forward(ours, args.device)
    times = {"guide loop": [], "batched": []}
    ppl = {}
    for _ in range(args.reps):                 # interleaved, best of reps
        sync(args.device)
        t = time.perf_counter()
        ppl["guide loop"] = guide_loop(hf, ids, L, args.device)
        sync(args.device)
        times["guide loop"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ppl["batched"] = scoring.eval_hf(forward, ids, L, L, args.batch_size, args.device,
                                    tok.token_bytes(ours.config.vocab_size))["ppl"]
        sync(args.device)
        times["batched"].append(time.perf_counter() - t)
    print(f"{args.model} on {args.device}, raw WikiText-2 test, {len(ids):,} tokens, context {L}, "
          f"batch {args.batch_size} windows, best of {args.reps}")
    for k in times:
        print(f"{k:<12}{len(ids) / min(times[k]):>12,.0f} tok/s   perplexity {ppl[k]:.4f}")
    print(f"speed-up: {min(times['guide loop']) / min(times['batched']):.2f}x; "
          f"perplexities differ by {abs(ppl['batched'] / ppl['guide loop'] - 1):.1e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
