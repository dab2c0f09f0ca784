"""
Sample text from any model form: a hub name or Hugging Face GPT-2 folder, a student checkpoint
(kron_decompose.py or train.py output), or a krony_to_gpt.py export, dense or compact.

  python sample.py out/gpt2_student                       10 samples from an end-of-text start
  python sample.py checks/ckpt --start "The meaning of life is" --num_samples 3 --max_new_tokens 100
  python sample.py gpt2 --start FILE:prompt.txt --temperature 0.8 --top_k 200 --device cuda

nanoGPT's flags (--start, --num_samples, --max_new_tokens, --temperature, --top_k, --seed, --device,
--dtype); --temperature 0 is greedy. Tokenizer: the model folder's own files, else (a student
checkpoint) its teacher's, else GPT-2's (tiktoken) for a 50257-token vocabulary; --tokenizer DIR
names one.
"""

import argparse
import sys

import torch

import tokenizer
from configurator import device_type, read_small_file, run_main


def sample(model, tok, start, num_samples, max_new_tokens, temperature, top_k, seed, device, dtype):
    """The decoded samples, each prompt + continuation."""
    ids = tok.encode(start) if start else [tok.eot]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    amp = dtype != torch.float32
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
        for _ in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
            out.append(tok.decode(y[0].tolist()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hub name, Hugging Face GPT-2 folder, student checkpoint or export")
    p.add_argument("--start", default="", help='prompt text, or FILE:path (default: an end-of-text token)')
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", type=device_type, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype (weights and logits stay float32)")
    p.add_argument("--tokenizer", help="a folder with the tokenizer's files, or a hub name")
    args = p.parse_args(argv)
    for k in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1, got {getattr(args, k)}")
    if args.temperature < 0:
        p.error(f"--temperature must be non-negative, got {args.temperature}")
    return run_main("sample.py", run, args)


def run(args):
    import scoring
    start = args.start
    if start.startswith("FILE:"):
        start = read_small_file(start[5:], "prompt file", limit=16 << 20)
    model, _ = scoring.load_model(args.model, args.device)
    tok = tokenizer.for_model(args.model, model.config.vocab_size, args.tokenizer)
    texts = sample(model, tok, start, args.num_samples, args.max_new_tokens, args.temperature,
                   args.top_k, args.seed, args.device, getattr(torch, args.dtype))
    for t in texts:
        print(t)
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
