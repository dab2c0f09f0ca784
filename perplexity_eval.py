"""
Perplexity of any model form on WikiText-103, WikiText-2, LAMBADA and held-out OpenWebText, under
the published protocol and the standard ones.

  python perplexity_eval.py out_dir                          all datasets, protocol kp
  python perplexity_eval.py out_dir lambada                  one dataset
  python perplexity_eval.py gpt2 wiki2 --protocol hf --stride 512
  python perplexity_eval.py checks/ckpt --protocol harness --data_dir ../shared/data
  python perplexity_eval.py out_dir --protocol all --json results.json

MODEL: a directory written by krony_to_gpt.py (dense or compact), a student checkpoint, or a hub
name such as gpt2. DATASET: wiki103, wiki2, lambada, owt.

Protocols (docs/evaluation.md has the formulas):
  kp       Krony-PT's script, the source of the published table: WikiText-103 / WikiText-2 non-raw
           test rows joined with "\\n\\n", tokenized once, disjoint windows of the context length,
           perplexity = exp(mean over windows of the window's mean loss); LAMBADA the same on the
           original LAMBADA test text. The token-weighted variant of the same windows is printed too.
  hf       the Hugging Face perplexity guide: raw WikiText-2 test, sliding window with --stride,
           every token scored once, token-weighted.
  harness  lm-evaluation-harness: lambada_openai (accuracy, perplexity of the last word) and
           wikitext (document-level rolling windows; word perplexity, byte perplexity, bits per byte).
Every perplexity is per token of the model's tokenizer, so models with different tokenizers are
compared by bits per byte: the same windows' summed loss over the UTF-8 bytes of the tokens they
score, in bits (printed beside the perplexity; the harness's wikitext metric is the same quantity).
Data: the Hugging Face hub by default; local files with --data_dir DIR (or KRONY_DATA_DIR) in the
layout of ../shared/data. Tokenization: the model's tokenizer (tokenizer.for_model: its folder's, its
teacher's, else GPT-2's through tiktoken, which TIKTOKEN_CACHE_DIR serves offline), or --tokenizer.
"""

import argparse
import json
import os
import sys

import torch

import atomic
import tokenizer
from configurator import device_type, positive_int, run_main
from scoring import (DATASETS, PROTOCOLS, PUBLISHED_HARNESS, PUBLISHED_HF, PUBLISHED_KP, data_dir_default, evaluate,
                     format_results, load_model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export directory, student checkpoint, or hub name")
    p.add_argument("datasets", nargs="*", help=f"any of {', '.join(DATASETS)} (default: all)")
    p.add_argument("--protocol", choices=PROTOCOLS + ("all",), default="kp")
    p.add_argument("--stride", type=positive_int, help="hf protocol: window stride (default: the context length)")
    p.add_argument("--block_size", type=positive_int, help="context length, at least 2 (default: the model's)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--device", type=device_type, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype: bfloat16/float16 run under autocast (weights and logits stay float32)")
    p.add_argument("--max_tokens", type=positive_int, help="score only the first N tokens of each stream (quick runs)")
    p.add_argument("--data_dir", default=data_dir_default(),
                   help="local data in the layout of ../shared/data (default: $KRONY_DATA_DIR, else the hub)")
    p.add_argument("--owt_bin", default="data/owt/val.bin", help="held-out OpenWebText tokens (uint16)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="the results as JSON: to FILE (the tables are printed too), or printed instead of the "
                        "tables when no FILE is given")
    p.add_argument("--tokenizer", help="a folder with the model's tokenizer files or a hub name (default: the "
                                       "model's folder, its teacher's, else GPT-2's for a 50257-token vocabulary)")
    args = p.parse_args(argv)
    if args.block_size == 1:
        p.error("--block_size must be at least 2: a window of one token predicts nothing")
    if args.json in DATASETS:
        p.error(f"--json {args.json}: that is a dataset; name the datasets before --json, or give --json a file")
    if args.json not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: the folder {os.path.dirname(os.path.abspath(args.json))} does not exist")
    names = []
    for d in args.datasets or DATASETS:
        if d not in DATASETS:
            p.error(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
        if d not in names:
            names.append(d)
    if not args.datasets:
        names = [d for d in names if d != "owt" or os.path.exists(args.owt_bin)]
    return run_main("perplexity_eval.py", run, args, names)


def run(args, names):
    """Score the model on each dataset under each protocol, print the tables, and with --json write
    them with the published figures beside them."""
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    model, kind = load_model(args.model, args.device)
    tok = tokenizer.for_model(args.model, model.config.vocab_size, args.tokenizer)
    out = dict(model=args.model, form=kind, dtype=args.dtype, tokenizer=tok.info(), results={})
    for proto in protocols:
        res = evaluate(model, names, proto, args.data_dir, args.stride, args.block_size, args.batch_size,
                       args.device, args.max_tokens, args.owt_bin, dtype=getattr(torch, args.dtype), tok=tok)
        out["results"][proto] = res
        if args.json != "-":
            print(format_results(os.path.basename(os.path.normpath(args.model)), proto, res,
                                 tok.fingerprint() == tokenizer.gpt2_fingerprint()))
    out["published"] = dict(kp=PUBLISHED_KP, harness=PUBLISHED_HARNESS, hf=PUBLISHED_HF)
    if args.json == "-":
        print(json.dumps(out, indent=1))
    elif args.json:
        atomic.write_json(args.json, out)
    return 0

if __name__ == "__main__":
    sys.exit(main())
