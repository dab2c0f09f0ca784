"""
Student checkpoints and exports. One format: a directory holding

  config.json        {"model_type": "krony_gpt2", "format_version": 1, "gpt": GPTConfig,
                      "factors": plan (compress.MatrixPlan's fields), "hf_config": the source GPT-2 config, ...}
  model.safetensors  the student's state dict (factors A, B, per-term scales, permutation indices
                     rows/cols, dense weights), keys as in model.GPT.state_dict()

No pickles anywhere: loading reads JSON and safetensors, neither of which can run code. A student
checkpoint is also the compact export (krony_to_gpt.py --compact adds generation config and
tokenizer); with krony_hf.register_with_transformers() it loads through AutoModelForCausalLM.
The dense export is a plain GPT2LMHeadModel directory.

Every directory is written to a temporary sibling and swapped in only when complete, so an
interrupted or refused write leaves the previous contents untouched; the swap itself is one atomic
exchange of the two names (Linux renameat2), so there is no moment without the directory.
"""

import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import compress
from atomic import CheckpointError, atomic_dir, write_json
import tokenizer
from model import GPTConfig, check_finite_config, check_finite_tensors, check_sizes

FORMAT = "krony_gpt2"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# -----------------------------------------------------------------------------
# student checkpoints


def student_config(model, plan, hf_config=None, **meta):
    """The config.json of a student: what is needed to rebuild it, plus free-form metadata."""
    return dict(model_type=FORMAT, format_version=FORMAT_VERSION, architectures=["KronyGPT2LMHeadModel"],
                gpt=model.config.asdict(),
                factors={name: e.asdict() for name, e in compress.plan_of(model, plan).items()},
                hf_config=hf_config or {}, **meta)


def write_student(model, directory, config):
    """Write config.json and model.safetensors into an existing (temporary) directory."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # "pt": the tensors' framework, which transformers before 5.0 requires (the model's format is in config.json)
    save_file(sd, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    factors = {k: e.asdict() if isinstance(e, compress.MatrixPlan) else e for k, e in config["factors"].items()}
    write_json(os.path.join(directory, CONFIG), dict(config, factors=factors))   # load_student gives MatrixPlans


def save_student(model, out_dir, plan, hf_config=None, inputs=(), **meta):
    """Save a student checkpoint directory atomically (never over one of `inputs`, the command's
    input paths, nor over anything but an earlier student checkpoint). Returns its config dict."""
    config = student_config(model, plan, hf_config, **meta)
    with atomic_dir(out_dir, "student", inputs) as tmp:
        write_student(model, tmp, config)
    return config


def read_config(path):
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a directory with {CONFIG} and {WEIGHTS}")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no {CONFIG}: not a checkpoint directory")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is damaged")


def check_student_config(path, cfg):
    """The GPTConfig of a student's config.json, every number in it finite; else CheckpointError."""
    try:
        check_finite_config(cfg, f"{path}/{CONFIG}")
        return GPTConfig.from_dict(cfg["gpt"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG} does not describe a valid student: {e}")


def load_student(path, device="cpu"):
    """Rebuild a student from its checkpoint directory. Returns (model, config dict).
    Refuses, saying what is wrong: a directory that is not a student checkpoint, a config that
    does not validate, a missing or truncated weights file, missing or unexpected tensors, and
    tensors whose shapes do not match the spec."""
    cfg = read_config(path)
    if cfg.get("model_type") != FORMAT:
        hint = (" (a plain GPT-2 directory: load it with GPT.from_pretrained)" if cfg.get("model_type") == "gpt2" else "")
        raise CheckpointError(f"{path} is not a student checkpoint: model_type is {cfg.get('model_type')!r}, "
                              f"expected {FORMAT!r}{hint}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {cfg.get('format_version')!r} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    config = check_student_config(path, cfg)
    try:
        plan = compress.check_plan(cfg["factors"], config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG} does not describe a valid student: {e}")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    try:
        check_sizes(path, config)               # from the file's header, before building what config.json says
        sd = load_file(weights, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is truncated or corrupt")
    except ValueError as e:
        raise CheckpointError(str(e))
    check_finite_tensors(sd, weights)
    model = compress.build_student(config, plan)
    expected = model.state_dict()
    sd = {(k[:-2] + ".scales" if k.endswith(".s") and k[:-2] + ".scales" in expected else k): v
          for k, v in sd.items()}               # per-term scales were saved as ".s" before
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [f"{k}: file {tuple(sd[k].shape)}, spec {tuple(expected[k].shape)}" for k in expected
           if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        msg = [f"{weights} does not match the spec in {CONFIG}:"]
        if missing:
            msg.append(f"missing tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            msg.append(f"unexpected tensors {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if bad:
            msg.append(f"wrong shapes {bad[:6]}")
        raise CheckpointError(" ".join(msg))
    try:
        model.load_state_dict(sd, strict=True)
    except ValueError as e:                 # e.g. a permutation index buffer that is not a permutation
        raise CheckpointError(f"{weights}: {e}")
    return model.to(device), dict(cfg, factors=plan)


# -----------------------------------------------------------------------------
# exports


def hf_gpt2_config(model, hf_config):
    """A GPT2Config for the dense export: the source's config with this model's dimensions."""
    from transformers import GPT2Config
    d = {k: v for k, v in (hf_config or {}).items()
         if k not in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    c = model.config
    d.update(n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
             n_embd=c.n_embd, n_inner=None if c.n_inner == 4 * c.n_embd else c.n_inner,
             layer_norm_epsilon=c.layer_norm_epsilon, activation_function=c.activation_function,
             tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])
    d.setdefault("bos_token_id", tokenizer.GPT2_EOT)
    d.setdefault("eos_token_id", tokenizer.GPT2_EOT)
    return GPT2Config(**d)


def export_dense(model, out_dir, hf_config=None, tok=None, check=None, inputs=()):
    """A plain GPT2LMHeadModel directory (config, safetensors, generation config, the tokenizer's
    files when given, checked to reproduce its ids) holding the student's multiplied-out weights.
    check(directory), when given, runs on the finished export before it replaces out_dir: if it
    raises, out_dir is left as it was."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_gpt2_config(model, hf_config))
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    with atomic_dir(out_dir, "export", inputs) as tmp:
        hf.save_pretrained(tmp)
        if tok is not None:
            tokenizer.save(tok, tmp, model.config.block_size)
        if check is not None:
            check(tmp)
    return hf


def export_compact(model, out_dir, config, tok=None, check=None, inputs=()):
    """The student checkpoint itself (factors kept), plus generation config and tokenizer; check as
    in export_dense."""
    from transformers import GenerationConfig
    with atomic_dir(out_dir, "export", inputs) as tmp:
        write_student(model, tmp, config)
        hc = config.get("hf_config") or {}
        GenerationConfig(bos_token_id=hc.get("bos_token_id", tokenizer.GPT2_EOT),
                         eos_token_id=hc.get("eos_token_id", tokenizer.GPT2_EOT)).save_pretrained(tmp)
        if tok is not None:
            tokenizer.save(tok, tmp, model.config.block_size)
        if check is not None:
            check(tmp)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))
