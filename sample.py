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
import os
import sys

import torch


def load_tokenizer(model_dir, vocab_size, teacher=None, given=None):
    """(encode, decode, end-of-text id) from the first source that has a tokenizer."""
    from transformers import AutoTokenizer
    for src in (given, model_dir, teacher):
        if not src or not os.path.isdir(src) or not any(
                os.path.exists(os.path.join(src, f)) for f in ("tokenizer.json", "vocab.json")):
            if src is given and given:
                raise ValueError(f"--tokenizer {given}: no tokenizer.json or vocab.json there")
            continue
        tok = AutoTokenizer.from_pretrained(src)
        return (lambda s: tok(s).input_ids), tok.decode, tok.eos_token_id
    if vocab_size != 50257:
        raise ValueError(f"no tokenizer found for a vocabulary of {vocab_size} (not GPT-2's 50257); "
                         f"give --tokenizer DIR")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode, enc.eot_token


def sample(model, encode, decode, eot, start, num_samples, max_new_tokens, temperature, top_k, seed, device, dtype):
    """The decoded samples, each prompt + continuation."""
    ids = encode(start) if start else [eot]
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    amp = dtype != torch.float32
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
        for _ in range(num_samples):
            y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
            out.append(decode(y[0].tolist()))
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype (weights and logits stay float32)")
    p.add_argument("--tokenizer", help="a folder with the tokenizer's files")
    args = p.parse_args(argv)
    for k in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1, got {getattr(args, k)}")
    if args.temperature < 0:
        p.error(f"--temperature must be non-negative, got {args.temperature}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        import checkpoint
        import perplexity_eval
        start = args.start
        if start.startswith("FILE:"):
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        model, _ = perplexity_eval.load_model(args.model, device)
        config = checkpoint.read_config(args.model) if os.path.isdir(args.model) else {}
        teacher = config.get("teacher") if config.get("model_type") == checkpoint.FORMAT else None
        encode, decode, eot = load_tokenizer(args.model if os.path.isdir(args.model) else None,
                                             model.config.vocab_size, teacher, args.tokenizer)
        texts = sample(model, encode, decode, eot, start, args.num_samples, args.max_new_tokens, args.temperature,
                       args.top_k, args.seed, device, getattr(torch, args.dtype))
    except (ValueError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 1
    for t in texts:
        print(t)
        print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
