"""
Student checkpoints and exports. One format: a directory holding

  config.json        {"model_type": "krony_gpt2", "format_version": 1, "gpt": GPTConfig,
                      "factors": plan (compress.py), "hf_config": the source GPT-2 config, ...}
  model.safetensors  the student's state dict (factors A, B, per-term scales s, permutation indices
                     rows/cols, dense weights), keys as in model.GPT.state_dict()

No pickles anywhere: loading reads JSON and safetensors, neither of which can run code. A student
checkpoint is also the compact export (krony_to_gpt.py --compact adds generation config and
tokenizer); with krony_hf.register_with_transformers() it loads through AutoModelForCausalLM.
The dense export is a plain GPT2LMHeadModel directory.

Every directory is written to a temporary sibling and swapped in only when complete, so an
interrupted or refused write leaves the previous contents untouched; the swap itself is one atomic
exchange of the two names (Linux renameat2), so there is no moment without the directory.
"""

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import tempfile

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import compress
import tokenizer
from model import GPTConfig

FORMAT = "krony_gpt2"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint or output path that cannot be used, with what is wrong and what to do."""


# -----------------------------------------------------------------------------
# atomic directories


MARKER = ".krony.json"        # in every directory atomic_dir writes: what it holds, so what may replace it
KINDS = {"student": "a student checkpoint", "export": "a Hugging Face export", "run": "a training run's checkpoint"}


def check_replaceable(out_dir, kind, inputs=()):
    """Refuse to replace out_dir unless it is absent, empty, or this toolkit's own output of the same
    kind; never an input of the same command (a teacher, the checkpoint being exported)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    out_dir = os.path.realpath(out_dir)
    if any(os.path.realpath(p) == out_dir for p in inputs if p):
        raise CheckpointError(f"{out_dir} is an input of this command; write to another path")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output path")
    if not os.listdir(out_dir):
        return
    held = written_kind(out_dir)
    if held != kind:
        what = KINDS.get(held, "something this toolkit did not write")
        raise CheckpointError(f"{out_dir} holds {what}, not {KINDS[kind]} to replace: it is left as it is; "
                              f"choose another output path, or remove it first")


def written_kind(directory):
    """What this toolkit wrote in `directory` (a KINDS key), or None. Directories from before the
    MARKER: a student-format config.json is a run's checkpoint with an optimizer state beside it, else
    a student checkpoint."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f).get("kind")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return None
    try:
        with open(os.path.join(directory, CONFIG)) as f:
            legacy = json.load(f).get("model_type") == FORMAT
    except (OSError, ValueError, AttributeError):
        return None
    if not legacy:
        return None
    return "run" if os.path.exists(os.path.join(directory, "optimizer.safetensors")) else "student"


@contextlib.contextmanager
def atomic_dir(out_dir, kind, inputs=()):
    """Yield a fresh temporary directory beside out_dir; on success it replaces out_dir in one
    rename (the old one is removed only after), on error it is deleted and out_dir is untouched.
    Only an empty directory or this toolkit's own output of the same kind is replaced
    (check_replaceable); the result carries the MARKER that says what it is."""
    recover(out_dir)
    check_replaceable(out_dir, kind, inputs)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)               # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        write_json(os.path.join(tmp, MARKER), dict(kind=kind, format_version=FORMAT_VERSION))
    except SafetensorError as e:        # safetensors reports a failed write (a full disk) as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"writing {out_dir} failed ({e}); it was left as it was") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir) and exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)        # tmp now holds the previous contents
        return
    old = None                  # no atomic exchange here: two renames, and recover() for the moment between
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def exchange(a, b):
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE). Returns
    False where the system or file system cannot, and the caller falls back to two renames."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def recover(out_dir):
    """Repair what a killed writer left beside out_dir: if out_dir is missing (a kill between the
    fallback's two renames), move the complete new version (a temporary holding the MARKER, which
    atomic_dir writes last) or else the previous one back into place; then remove every temporary
    of out_dir. Only the writer of out_dir calls this (a reader could remove a save in progress)."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    tmps = sorted(glob.glob(os.path.join(parent, f".{name}.tmp-*")), key=os.path.getmtime)
    olds = [o for o in glob.glob(os.path.join(parent, f".{name}.old-*")) if os.path.isdir(os.path.join(o, "x"))]
    if not os.path.exists(out_dir):
        done = [t for t in tmps if os.path.exists(os.path.join(t, MARKER))]
        if done:
            os.rename(done[-1], out_dir)
        elif olds:
            os.rename(os.path.join(olds[0], "x"), out_dir)
    for t in tmps + glob.glob(os.path.join(parent, f".{name}.old-*")):
        shutil.rmtree(t, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(out_dir, last):
    """Yield a staging folder inside out_dir (which may hold other things: data/owt holds
    prepare.py); on success its files replace out_dir's as one set. `last` is the file that says the
    set is whole (a dataset's meta.json): the old one is removed before any file moves and the new
    one moves in last, so a kill part way leaves no `last`, never a mixture it vouches for, and
    finish_files() completes the set. On error the staging folder is deleted, out_dir untouched."""
    os.makedirs(out_dir, exist_ok=True)
    for st in glob.glob(os.path.join(out_dir, ".staging-*")):
        if not os.path.exists(os.path.join(st, MARKER)):
            shutil.rmtree(st, ignore_errors=True)        # a killed writer's, never completed
    finish_files(out_dir, last)
    tmp = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        yield tmp
        write_json(os.path.join(tmp, MARKER), dict(kind="files", last=last))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_files(out_dir, last)


def finish_files(out_dir, last):
    """Move every complete staged set (atomic_files) into out_dir, `last` after the rest. Readers
    call it too: it completes a set whose moves a kill cut short, and only ever moves whole sets."""
    for st in sorted(glob.glob(os.path.join(out_dir, ".staging-*")), key=os.path.getmtime):
        if not os.path.exists(os.path.join(st, MARKER)):
            continue                                      # still being written, or a killed writer's
        if os.path.exists(os.path.join(st, last)) and os.path.exists(os.path.join(out_dir, last)):
            os.remove(os.path.join(out_dir, last))
        names = sorted(n for n in os.listdir(st) if n not in (last, MARKER)) + [last]
        for n in names:
            if os.path.exists(os.path.join(st, n)):
                os.replace(os.path.join(st, n), os.path.join(out_dir, n))
        shutil.rmtree(st, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path` in one
    step, so a file that exists is complete (a result, a plot, a cache entry is never half-written,
    whatever interrupts the writer); on error it is removed and `path` is left as it was. The
    temporary keeps the extension (matplotlib picks the format by it). Every file writer uses this."""
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


# -----------------------------------------------------------------------------
# student checkpoints


def student_config(model, plan, hf_config=None, **meta):
    """The config.json of a student: what is needed to rebuild it, plus free-form metadata."""
    return dict(model_type=FORMAT, format_version=FORMAT_VERSION, architectures=["KronyGPT2LMHeadModel"],
                gpt=model.config.asdict(), factors=compress.plan_of(model, plan),
                hf_config=hf_config or {}, **meta)


def write_student(model, directory, config):
    """Write config.json and model.safetensors into an existing (temporary) directory."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(directory, WEIGHTS), metadata={"format": FORMAT})
    write_json(os.path.join(directory, CONFIG), config)


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
    try:
        config = GPTConfig.from_dict(cfg["gpt"])
        plan = compress.check_plan(cfg["factors"], config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG} does not describe a valid student: {e}")
    model = compress.build_student(config, plan)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    try:
        sd = load_file(weights, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is truncated or corrupt")
    expected = model.state_dict()
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
    return model.to(device), cfg


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
    d.setdefault("bos_token_id", 50256)
    d.setdefault("eos_token_id", 50256)
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
        GenerationConfig(bos_token_id=hc.get("bos_token_id", 50256),
                         eos_token_id=hc.get("eos_token_id", 50256)).save_pretrained(tmp)
        if tok is not None:
            tokenizer.save(tok, tmp, model.config.block_size)
        if check is not None:
            check(tmp)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))
