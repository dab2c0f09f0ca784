"""
Validated nanoGPT-style configuration: config files of plain assignments, then --key=value (or
--key value) overrides.

    python train.py config/train_gpt2.py --batch_size=32 --learning_rate=6e-4

nanoGPT exec()s its config files and command-line overrides; here nothing is executed. A config
file is parsed with `ast`: it may hold comments, a docstring and assignments `key = <literal>`
(numbers, strings, booleans, None, lists, tuples, dicts), nothing else. Every key must be a field of
the script's config dataclass; an unknown key, in a file or on the command line, is an error that
lists the valid keys (and the closest one). Values are checked against the field's type: an int is
accepted where a float is expected, True/False/true/false/1/0 where a bool is. `-h` prints every key
with its type and default.
"""

import argparse
import ast
import dataclasses
import difflib
import os
import signal
import stat
import subprocess
import sys
import types
import typing

from atomic import write_text


class ConfigError(ValueError):
    pass


# The folder of what cannot be downloaded offline (reference teachers, evaluation data, the GPT-2
# tokenizer's files), beside the checkout unless KRONY_SHARED says where.
ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("KRONY_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE_TEACHER = os.path.join(SHARED, "teacher", "owt-6x256-bpe8k")
OWT_SAMPLE = os.path.join(SHARED, "data", "openwebtext", "owt10k_sample_docs.jsonl.xz")


# argparse types shared by the command lines: a bad value is a bad command line (exit status 2)

def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return v


def resolve_device(name):
    """auto (a GPU if there is one, else the CPU), cpu, cuda or cuda:N; one that does not exist here
    is refused with what does."""
    import torch
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return "cuda" if n_gpu else "cpu"
    if name == "cpu":
        return name
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not n_gpu or (index and int(index) >= n_gpu):
        raise ValueError(f"device {name!r}: {n_gpu} CUDA device(s) here (use --device cpu or auto)")
    return name


def device_type(s):
    """argparse's form of resolve_device."""
    try:
        return resolve_device(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def open_fraction(s):
    """A float strictly between 0 and 1 (a share that must leave something on both sides)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number")
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not strictly between 0 and 1")
    return v


def run_main(prog, work, *args):
    """Run a command line's work: its return value is the exit status. What a user can cause (a bad
    path, a teacher that will not load, a full disk, a GPU out of memory) is one line `prog: error:
    ...` and status 1, never a traceback (KRONY_TRACEBACK=1 shows it); Ctrl-C is status 130."""
    try:
        return work(*args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:             # the reader left (`| head`): not a failure to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if os.environ.get("KRONY_TRACEBACK"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1


def _allowed_types(tp):
    """The accepted Python types of a field annotation (X, X | None, Optional[X])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(tp) for t in _allowed_types(a))
    if tp is type(None) or tp is None:
        return (type(None),)
    return (origin or tp,)


def _type_name(tp):
    return " | ".join("None" if t is type(None) else t.__name__ for t in _allowed_types(tp))


def coerce(key, value, tp, where):
    """value checked against the field type tp; ints widen to float, bool strings become bools."""
    allowed = _allowed_types(tp)
    if bool in allowed:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got the boolean {value!r}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple) and list in allowed:
        return list(value)
    if isinstance(value, allowed):
        return value
    raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown(key, fields, where):
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(fields))}")


def read_small_file(path, what, limit=1 << 20):
    """The text of `path`, a regular UTF-8 file of at most `limit` bytes (a config, a spec, a prompt):
    /dev/zero, a pipe or a folder is refused rather than read until memory runs out."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise ConfigError(f"{what} {path} has {st.st_size:,} bytes, more than the {limit:,} a {what} may have")
        with open(path, encoding="utf-8") as f:
            text = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    if len(text) > limit:
        raise ConfigError(f"{what} {path} grew past {limit:,} characters while it was read")
    return text


def read_config_file(path):
    """{key: value} of a config file of literal assignments, without executing it."""
    src = read_small_file(path, "config file")
    try:
        tree = ast.parse(src, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: not valid Python syntax: {e.msg}")
    except (MemoryError, RecursionError):           # e.g. 200,000 unary minus signs
        raise ConfigError(f"{path}: nested too deeply to parse; config files hold plain literals") from None
    out = {}
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue                                           # the module docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path} line {node.lineno}: config files hold assignments `key = value` of literal "
                              f"values only (nothing is executed)")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, MemoryError, RecursionError):     # TypeError: {[1]: 2}, an unhashable key
            raise ConfigError(f"{path} line {node.lineno}: the value of {node.targets[0].id} is not a literal "
                              f"(numbers, strings, True/False/None, lists, tuples, dicts)")
        out[node.targets[0].id] = value
    return out


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text                 # a bare string (--out_dir=checks/run1), or no literal ({[1]: 2}): the type check says which


def help_text(cls, doc=""):
    lines = [doc.strip(), "", "usage: python SCRIPT.py [CONFIG_FILE ...] [--key=value | --key value ...]", "", "keys:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        comment = f.metadata.get("help", "")
        lines.append(f"  --{f.name}={default!r:<24} ({_type_name(f.type)}){'  ' + comment if comment else ''}")
    return "\n".join(lines)


def parse_config(cls, argv, doc=""):
    """An instance of the dataclass `cls` from config files and --key=value (or --key value)
    arguments, in order (later ones win). Returns (config, sources) where sources names where each non-default came from."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    values, sources = {}, {}
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            print(help_text(cls, doc))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:                       # --key value, as argparse takes it
                if not argv:
                    raise ConfigError(f"command line: {arg!r} needs a value: --{key}=VALUE or --{key} VALUE")
                text = argv.pop(0)
            if key not in fields:
                raise _unknown(key, fields, "command line")
            values[key] = coerce(key, _parse_value(text), fields[key], "command line")
            sources[key] = "command line"
        elif arg.startswith("-"):
            raise ConfigError(f"command line: {arg!r} is not an option; use --key=value (see -h)")
        else:
            for key, value in read_config_file(arg).items():
                if key not in fields:
                    raise _unknown(key, fields, arg)
                values[key] = coerce(key, value, fields[key], arg)
                sources[key] = arg
    return cls(**values), sources


def write_config(path, values, doc=""):
    """Write {key: value} as a config file parse_config reads back to the same values (every value a
    literal: repr round-trips numbers, strings, booleans, None, lists and dicts)."""
    lines = [f'"""{doc}"""', ""] if doc else []
    for key, value in values.items():
        if _parse_value(repr(value)) != value:
            raise ValueError(f"{key} = {value!r} is not a literal a config file can hold")
        lines.append(f"{key} = {value!r}")
    write_text(path, "\n".join(lines) + "\n")


class CommandFailed(RuntimeError):
    pass


def run_command(script, args, log_path=None):
    """Run one of the project's command lines (`script` relative to the repository, e.g. "train.py")
    in a child Python, as a user would type it; its output goes to log_path when given. A stage
    that fails raises CommandFailed naming its exit status. Ctrl-C reaches the child through the
    terminal's process group, and train.py saves its checkpoint before it exits, so this process
    only notes the signal while the child runs (a SIGTERM sent to this process alone is passed on)
    and then raises KeyboardInterrupt: nothing after an interrupted stage runs."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    got, child = [], []

    def note(signum, frame):
        got.append(signum)
        if signum == signal.SIGTERM and child:
            child[0].send_signal(signal.SIGTERM)
    # installed before the child starts (a caught signal is reset to its default in the child by exec)
    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(log_path, "w") if log_path else open(os.devnull) as out:
            child.append(subprocess.Popen(cmd, stdout=out if log_path else None,
                                          stderr=subprocess.STDOUT if log_path else None))
            rc = child[0].wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got or rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt(script)
    if rc:
        raise CommandFailed(f"{script} exited with status {rc}" + (f"; its output is in {log_path}" if log_path else ""))
