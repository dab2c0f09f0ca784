"""
Convert a student checkpoint to Hugging Face format.

  python krony_to_gpt.py checks/ckpt out_dir              a plain dense folder of the teacher's class
                                                          (GPT2LMHeadModel, LlamaForCausalLM, ...)
  python krony_to_gpt.py checks/ckpt out_dir --compact    keep the factors (the compression itself)
  python krony_to_gpt.py checks/ckpt --out out_dir        the same, in the other scripts' words
  python krony_to_gpt.py checks/ckpt out_dir --device cuda   multiply out and verify on a GPU

Shapes, factors and permutations are read from the checkpoint; nothing else needs to exist. The
dense export multiplies the factors out, so any tool for the teacher's class loads it (at the dense size). The
compact export keeps the factors; it loads with checkpoint.load_student(out_dir), or through
transformers once krony_hf.register_with_transformers() has run:

    import krony_hf; krony_hf.register_with_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)

Both exports are checked before the command returns: their logits on a probe batch must equal the
student's (max abs difference below 1e-4, or 4x the student's own float32 rounding when that is
larger: measured per export and printed). Exit status: 2 for a bad command line, 1 for a failure.
"""

import argparse
import copy
import os
import sys

import torch

import checkpoint
import tokenizer
from configurator import device_type, run_main
from model import count_params

TOLERANCE = 1e-4       # max abs logit difference allowed, or 4x the student's own float32 rounding if larger


def probe_logits(forward, vocab_size, block_size, device="cpu", seed=0):
    """Logits on a fixed random batch (the same ids on every device), returned on the CPU."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (2, min(block_size, 64)), generator=g)
    with torch.no_grad():
        return forward(idx.to(device)).cpu()


def float32_rounding(model, ref):
    """Max abs difference between the float32 student's probe logits (ref) and its float64 copy's."""
    exact = copy.deepcopy(model).double()
    c = model.config
    dev = next(model.parameters()).device
    exact_logits = probe_logits(lambda idx: exact(idx)[0], c.vocab_size, c.block_size, dev)
    return (exact_logits.double() - ref.double()).abs().max().item()


def find_tokenizer(ckpt, vocab_size, given=None):
    """The student's tokenizer (given, else its teacher's, else GPT-2's for a GPT-2 vocabulary), or
    None when there is none to find; a `given` that is not a tokenizer is an error."""
    try:
        return tokenizer.for_model(ckpt, vocab_size, given)
    except ValueError:
        if given:
            raise
        return None


def convert(ckpt, out_dir, compact=False, given_tokenizer=None, device="cpu"):
    """Export and verify (on `device`); the export replaces out_dir only once verified. Returns
    (the check's figures, bytes on disk of out_dir, the tokenizer written or None, parameter counts)."""
    model, cfg = checkpoint.load_student(ckpt, device)
    model.eval()
    c = model.config
    tok = find_tokenizer(ckpt, c.vocab_size, given_tokenizer)
    ref = probe_logits(lambda idx: model(idx)[0], c.vocab_size, c.block_size, device)
    # Multiplying the factors out rounds differently from the factored product: the export is held
    # to the float32 student's own distance from its float64 self (deep, wide models exceed 1e-4).
    rounding = float32_rounding(model, ref)
    tolerance = max(TOLERANCE, 4 * rounding)
    diffs = []

    def check(written):
        if compact:
            back = checkpoint.load_student(written, device)[0].eval()
            got = probe_logits(lambda idx: back(idx)[0], c.vocab_size, c.block_size, device)
        else:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(written, trust_remote_code=False).to(device).eval()
            got = probe_logits(lambda idx: hf(idx).logits, c.vocab_size, c.block_size, device)
        diffs.append((got - ref).abs().max().item())
        if not diffs[-1] < tolerance:
            raise checkpoint.CheckpointError(f"the export does not reproduce the student: max abs logit difference "
                                             f"{diffs[-1]:.3g} >= {tolerance:.3g} (the student's float32 rounding "
                                             f"{rounding:.3g}); {out_dir} is left as it was")

    if compact:
        checkpoint.export_compact(model, out_dir, cfg, tok, check=check, inputs=(ckpt,))
    else:
        checkpoint.export_dense(model, out_dir, cfg.get("hf_config"), tok, check=check, inputs=(ckpt,))
    return dict(diff=diffs[-1], rounding=rounding, tolerance=tolerance), checkpoint.dir_size(out_dir), tok, \
        count_params(model)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="student checkpoint directory (kron_decompose.py or train.py output)")
    p.add_argument("out_dir", nargs="?", help="directory to write (replaced only once the export is complete); "
                                              "or --out")
    p.add_argument("--out", help="the same as OUT_DIR")
    p.add_argument("--compact", action="store_true", help="keep the Kronecker factors instead of multiplying out")
    p.add_argument("--tokenizer", help="the tokenizer to ship (a folder with its files or a hub name); default: "
                                       "the teacher's, else GPT-2's for a 50257-token vocabulary")
    p.add_argument("--device", type=device_type, default="auto", help="auto (default), cpu, cuda, cuda:N: where the "
                                                                      "factors are multiplied out and the export checked")
    args = p.parse_args(argv)
    if args.out and args.out_dir and os.path.abspath(args.out) != os.path.abspath(args.out_dir):
        p.error(f"two output folders: OUT_DIR {args.out_dir} and --out {args.out}; give one")
    args.out = args.out or args.out_dir
    if not args.out:
        p.error("give the output folder: OUT_DIR or --out")
    return run_main("krony_to_gpt.py", export, args)


def export(args):
    diff, size, tok, counts = convert(args.checkpoint, args.out, args.compact, args.tokenizer, args.device)
    arch = checkpoint.read_config(args.checkpoint)["gpt"].get("arch", "gpt2")
    kind = "compact (factored)" if args.compact else f"dense {checkpoint.HF_CLASSES[arch]}"
    print(f"wrote {args.out}: {kind}, {size / 2**20:.1f} MiB on disk; student {counts['hf']:,} parameters "
          f"(HF convention), {counts['nanogpt']:,} (nanoGPT, no wpe)")
    print(f"verified: max abs logit difference to the student {diff['diff']:.2e} (< {diff['tolerance']:.2g}; the "
          f"student's own float32 rounding {diff['rounding']:.2e})")
    if tok is None:
        print("note: no tokenizer found (the teacher has no tokenizer files and the vocabulary is not GPT-2's): "
              "the directory has none; give --tokenizer DIR")
    else:
        print(f"tokenizer: {tok.name} ({tok.vocab_size:,} ids), checked to reproduce its ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
