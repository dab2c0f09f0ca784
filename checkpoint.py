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

import glob
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import compress
from atomic import CheckpointError, atomic_dir, check_replaceable, write_json, write_text
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
                factors={name: mp.asdict() for name, mp in compress.plan_of(model, plan).items()},
                hf_config=hf_config or {}, **meta)


def write_student(model, directory, config):
    """Write config.json and model.safetensors into an existing (temporary) directory."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # "pt": the tensors' framework, which transformers before 5.0 requires (the model's format is in config.json)
    save_file(sd, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    factors = {k: mp.asdict() if isinstance(mp, compress.MatrixPlan) else mp for k, mp in config["factors"].items()}
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
# training runs: out_dir holds ckpt/ (a student checkpoint plus optimizer.safetensors and
# train_state.json, the whole folder written atomically) and metrics.jsonl

RUN_CKPT = "ckpt"
METRICS = "metrics.jsonl"
OPTIMIZER = "optimizer.safetensors"
TRAIN_STATE = "train_state.json"


def save_run(path, model, config, optimizer, state):
    """Write a run's checkpoint folder: the student (config: its student_config), the optimizer's
    state and the RNG states as safetensors, and `state` (iteration, losses, configuration, ...)
    with the optimizer's hyperparameters as train_state.json."""
    sd = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().contiguous().cpu() for i, st in sd["state"].items()
               for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    with atomic_dir(path, "run") as tmp:
        write_student(model, tmp, config)
        save_file(tensors, os.path.join(tmp, OPTIMIZER))
        write_json(os.path.join(tmp, TRAIN_STATE), dict(state, param_groups=groups))


def read_train_state(path):
    """A run checkpoint's train_state.json, or a CheckpointError that names the folder and says what
    can still be done with its weights."""
    try:
        with open(os.path.join(path, TRAIN_STATE)) as f:
            state = json.load(f)
        if not isinstance(state, dict) or not {"iter_num", "param_groups"} <= set(state):
            raise ValueError("iter_num or param_groups missing")
        with safe_open(os.path.join(path, OPTIMIZER), "pt"):   # its header: a cut file is found now
            pass
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path} cannot be resumed: its optimizer state or {TRAIN_STATE} is missing or "
                              f"damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); its weights "
                              f"can still start a new run: --init_from={path} --out_dir=ANOTHER_DIR") from None
    return state


def load_optimizer(path, optimizer, state):
    """Restore the optimizer (moments and hyperparameters, `state` being the run's train_state.json)
    and the RNG states saved with a run's checkpoint; a file that does not fit is a CheckpointError."""
    try:
        tensors = load_file(os.path.join(path, OPTIMIZER))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}/{OPTIMIZER} cannot be read ({e}); its weights can still start a new run: "
                              f"--init_from={path} --out_dir=ANOTHER_DIR") from None
    per = {}
    for k, v in tensors.items():
        if k.startswith("state."):
            _, i, name = k.split(".", 2)
            per.setdefault(int(i), {})[name] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in per.items():
        for name, v in st.items():
            if name != "step" and (i >= len(params) or v.shape != params[i].shape):
                raise CheckpointError(f"{path}/{OPTIMIZER} does not fit the student: state.{i}.{name} has shape "
                                      f"{tuple(v.shape)}, the parameter {tuple(params[i].shape) if i < len(params) else 'none'}")
    sd = optimizer.state_dict()
    groups = [dict(g, params=sg["params"]) for g, sg in zip(state["param_groups"], sd["param_groups"])]
    optimizer.load_state_dict({"state": per, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def check_new_run(out_dir, overwrite, inputs):
    """A fresh run never replaces a run in out_dir (its checkpoint and metrics) unless told to; nor
    anything there that is not a run's checkpoint, nor one of its inputs (atomic.check_replaceable)."""
    held = [f for f in (RUN_CKPT, METRICS) if os.path.exists(os.path.join(out_dir, f))]
    if held and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a training run ({', '.join(held)}): continue it with "
                              f"--init_from=resume, start over with --overwrite=True, or choose another out_dir")
    check_replaceable(os.path.join(out_dir, RUN_CKPT), "run", inputs=inputs)


def pending_metrics(out_dir, run_id):
    """Where a run that replaces another (overwrite) keeps its records until its first save."""
    return os.path.join(out_dir, f".metrics-{run_id}.jsonl")


def open_metrics(out_dir, resume, run_id, iter_num):
    """The metrics file run `run_id` appends to. A resume first completes a first save whose metrics
    move a kill cut short, then drops the records it will write again; a fresh run over an existing
    run writes to a pending file that replaces metrics.jsonl at its first save (take_metrics), so
    that until then the old run (checkpoint and metrics) is whole. Other pending files are removed
    (the caller holds out_dir's lock: their writers are gone)."""
    path = os.path.join(out_dir, METRICS)
    own = pending_metrics(out_dir, run_id)
    if resume and os.path.exists(own):
        os.replace(own, path)
    for p in glob.glob(pending_metrics(glob.escape(out_dir), "*")):
        os.remove(p)
    if resume:
        truncate_metrics(path, iter_num)
        return path
    replacing = any(os.path.exists(os.path.join(out_dir, f)) for f in (RUN_CKPT, METRICS))
    return own if replacing else path


def take_metrics(out_dir, pending):
    """At a run's first save: its pending records become out_dir's metrics.jsonl. Returns that path."""
    final = os.path.join(out_dir, METRICS)
    if pending != final:
        if os.path.exists(pending):
            os.replace(pending, final)
        else:
            write_text(final, "")
    return final


def truncate_metrics(path, upto):
    """On resume from iteration `upto`, drop the records the resumed run will write again: steps
    from `upto` on, evaluations after it (the evaluation at `upto` came before the save)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
            rows[-1]["iter"]
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:             # a record cut off by a kill while it was appended
                break
            raise CheckpointError(f"{path} line {i + 1} is not a metrics record; repair or delete that line (the "
                                  f"checkpoint is intact), then resume") from None
    keep = [json.dumps(r) + "\n" for r in rows
            if r["iter"] < upto or (r["iter"] == upto and "val_loss" in r)]
    write_text(path, "".join(keep))


# -----------------------------------------------------------------------------
# exports


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "mistral": "MistralForCausalLM"}
_NOT_COPIED = ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


def hf_export_config(model, hf_config):
    """The dense export's transformers config: the source's (hf_config) with this model's sizes, of
    the source's own class (GPT2Config, LlamaConfig, Qwen2Config, MistralConfig)."""
    from transformers import AutoConfig
    d = {k: v for k, v in (hf_config or {}).items() if k not in _NOT_COPIED}
    c = model.config
    if c.rotary:
        for k in ("rope_theta", "rope_scaling"):            # transformers 5 reads rope_parameters
            d.pop(k, None)
        d.update(hidden_size=c.n_embd, intermediate_size=c.n_inner, num_hidden_layers=c.n_layer,
                 num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
                 vocab_size=c.vocab_size, max_position_embeddings=c.block_size, rms_norm_eps=c.layer_norm_epsilon,
                 hidden_act="silu", tie_word_embeddings=c.tie_word_embeddings,
                 rope_parameters=dict(c.rope_scaling or {"rope_type": "default"}, rope_theta=c.rope_theta))
    else:
        d.update(n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                 n_embd=c.n_embd, n_inner=None if c.n_inner == 4 * c.n_embd else c.n_inner,
                 layer_norm_epsilon=c.layer_norm_epsilon, activation_function=c.activation_function,
                 tie_word_embeddings=True)
        d.setdefault("bos_token_id", tokenizer.GPT2_EOT)
        d.setdefault("eos_token_id", tokenizer.GPT2_EOT)
    return AutoConfig.for_model(c.arch, architectures=[HF_CLASSES[c.arch]], **d)


def export_dense(model, out_dir, hf_config=None, tok=None, check=None, inputs=()):
    """A plain directory of the source's class (GPT2LMHeadModel, LlamaForCausalLM, ...: config,
    safetensors, generation config, the tokenizer's files when given, checked to reproduce its ids)
    holding the student's multiplied-out weights.
    check(directory), when given, runs on the finished export before it replaces out_dir: if it
    raises, out_dir is left as it was."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(hf_export_config(model, hf_config))
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
