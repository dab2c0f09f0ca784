"""
Which budget objective predicts the compressed model's loss better: the total Van Loan tail energy
(compress.solve_budget's default) or the sum of relative tails? For each budget, solve with both,
decompose (Van Loan init, no training) and measure the loss on held-out OpenWebText tokens.

  python scripts/budget_objectives.py --teacher ../shared/teacher/owt-mini-gpt2 \\
      --bin ../shared/data/openwebtext/owt10k_val_karpathy-nanoGPT-263b800d.bin

The .bin is a uint16 GPT-2 token memmap (nanoGPT's format); the loss is token-weighted over
perplexity_eval.py's kp windows of the teacher's context.
"""

import argparse
import copy
import math
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import compress  # noqa: E402
import perplexity_eval as pe  # noqa: E402
import tokenizer  # noqa: E402
from model import GPT, count_params  # noqa: E402


def held_out_loss(model, tokens, token_bytes):
    """Mean next-token loss on the token file, by perplexity_eval's kp windows (token-weighted)."""
    res = pe.eval_kp(pe.make_forward(model.eval(), "cpu"), tokens, model.config.block_size, 8, "cpu", token_bytes)
    return math.log(res["ppl_token_weighted"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--bin", required=True, help="uint16 token file of held-out text")
    p.add_argument("--fracs", default="0.25,0.5", help="fractions of the block matrices' parameters to remove")
    p.add_argument("--max_tokens", type=int, default=65536, help="score the first N tokens of the file")
    args = p.parse_args()
    teacher, _ = GPT.from_pretrained(args.teacher)
    tok = tokenizer.for_model(args.teacher, teacher.config.vocab_size)
    tokens = pe.owt_tokens(args.bin, tok, teacher.config.vocab_size, args.max_tokens)
    token_bytes = tok.token_bytes(teacher.config.vocab_size)
    base = count_params(teacher)["hf"]
    print(f"teacher: loss {held_out_loss(teacher, tokens, token_bytes):.3f}, {base:,} parameters (HF)")
    blocks = sum(teacher.get_matrix(n).weight.numel() for n in teacher.matrix_names() if n != "wte")
    print(f"{'kinds':<12}{'removed':>8}{'objective':>10}{'target':>12}{'params':>12}{'loss':>8}{'ppl':>9}")
    for kinds, label in ((("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), "blocks"),
                         (("wte", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), "blocks+wte")):
        for frac in (float(f) for f in args.fracs.split(",")):
            target = base - int(frac * blocks)
            for objective in compress.OBJECTIVES:
                m = copy.deepcopy(teacher)
                plan = compress.solve_budget(m, target, kinds=kinds, objective=objective, progress=False,
                                             log=lambda *a: None)
                compress.decompose(m, plan, compare=(), progress=False)
                loss = held_out_loss(m, tokens, token_bytes)
                print(f"{label:<12}{frac:>8.0%}{objective:>10}{target:>12,}{count_params(m)['hf']:>12,}"
                      f"{loss:>8.3f}{math.exp(loss):>9.1f}", flush=True)


if __name__ == "__main__":
    main()
