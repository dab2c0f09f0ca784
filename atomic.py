"""
Writes that are whole or absent. Every file and directory this toolkit writes goes through here:

  atomic_file(path)        a file written beside its place and renamed onto it in one step
  atomic_dir(out, kind)    a directory built beside its place and swapped in in one step (Linux
                           renameat2 exchange; two renames and recover() elsewhere)
  atomic_files(out, last)  a set of files moved into a folder that holds other things (a dataset)

A directory written here carries a MARKER saying what it holds, and only an empty directory or one
of the same kind is ever replaced; never an input of the same command, nor a folder that contains
one or lies inside one. Temporaries are named after their writer's process id, so a writer removes
its own and those whose process is gone, never another live writer's.

This module imports nothing of the project: every other module may use it.
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

MARKER = ".krony.json"        # in every directory atomic_dir writes: what it holds, so what may replace it
MARKER_VERSION = 1
DIR_KINDS = {"student": "a student checkpoint", "export": "a Hugging Face export", "run": "a training run's checkpoint"}


class CheckpointError(ValueError):
    """A checkpoint or output path that cannot be used, with what is wrong and what to do."""


def overlap(path, other):
    """How `path` relates to `other` on disk: "is", "contains", "is inside", or None (real paths,
    so links and `..` do not hide it)."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "is inside"
    return None


def check_inputs(out_dir, inputs):
    """Refuse an output that is, contains or lies inside one of the command's inputs (a teacher,
    the checkpoint being exported, a dataset): replacing it would delete the input, writing into it
    would change it. Of inputs not on disk (hub names) only the same path is refused."""
    for p in inputs:
        if p and (how := overlap(out_dir, p)) and (how == "is" or os.path.exists(p)):
            raise CheckpointError(f"{out_dir} {how} {p}, which is an input of this command; write to another path")


def check_replaceable(out_dir, kind, inputs=()):
    """Refuse to replace out_dir unless it is absent, empty, or this toolkit's own output of the same
    kind; never an input of the same command, nor a folder holding one or inside one."""
    if kind not in DIR_KINDS:
        raise ValueError(f"kind must be one of {sorted(DIR_KINDS)}, got {kind!r}")
    check_inputs(out_dir, inputs)
    out_dir = os.path.realpath(out_dir)
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output path")
    if not os.listdir(out_dir):
        return
    held = written_kind(out_dir)
    if held != kind:
        what = DIR_KINDS.get(held, "something this toolkit did not write")
        raise CheckpointError(f"{out_dir} holds {what}, not {DIR_KINDS[kind]} to replace: it is left as it is; "
                              f"choose another output path, or remove it first")


def written_kind(directory):
    """What this toolkit wrote in `directory` (a DIR_KINDS key), or None. Directories from before the
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
        with open(os.path.join(directory, "config.json")) as f:
            legacy = json.load(f).get("model_type") == "krony_gpt2"
    except (OSError, ValueError, AttributeError):
        return None
    if not legacy:
        return None
    return "run" if os.path.exists(os.path.join(directory, "optimizer.safetensors")) else "student"


# -----------------------------------------------------------------------------
# temporaries: named after their writer, removed only by it or once it is gone


def temp_prefix(name, what):
    """The prefix of this process's temporaries of `name` ("tmp", "old" or "staging")."""
    return f".{name}.{what}-{os.getpid()}-"


def writer_alive(path):
    """Whether the process that named the temporary `path` (temp_prefix) still runs. A name
    without a process id (written by older code) counts as gone."""
    try:
        pid = int(os.path.basename(path).rsplit(".", 1)[-1].split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # another user's live process
        return True
    return True


def temporaries(parent, name, what):
    """The temporaries of `name` in `parent` whose writers are gone (this process's included):
    the name is escaped, so `*` or `run[1]` match themselves only."""
    pattern = os.path.join(glob.escape(parent), f".{glob.escape(name)}.{what}-*")
    return [p for p in glob.glob(pattern) if not writer_alive(p)]


@contextlib.contextmanager
def atomic_dir(out_dir, kind, inputs=()):
    """Yield a fresh temporary directory beside out_dir; on success it replaces out_dir in one
    rename (the old one is removed only after), on error it is deleted and out_dir is untouched.
    Only an empty directory or this toolkit's own output of the same kind is replaced
    (check_replaceable); the result carries the MARKER that says what it is."""
    recover(out_dir)
    check_replaceable(out_dir, kind, inputs)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=temp_prefix(name, "tmp"), dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)               # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        write_json(os.path.join(tmp, MARKER), dict(kind=kind, format_version=MARKER_VERSION))
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
        old = tempfile.mkdtemp(prefix=temp_prefix(name, "old"), dir=parent)
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
    atomic_dir writes last) or else the previous one back into place; then remove the temporaries
    of out_dir whose writers are gone. Only a writer of out_dir calls this."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    tmps = sorted(temporaries(parent, name, "tmp"), key=os.path.getmtime)
    olds = [o for o in temporaries(parent, name, "old") if os.path.isdir(os.path.join(o, "x"))]
    if not os.path.exists(out_dir):
        done = [t for t in tmps if os.path.exists(os.path.join(t, MARKER))]
        if done:
            os.rename(done[-1], out_dir)
        elif olds:
            os.rename(os.path.join(olds[0], "x"), out_dir)
    for t in temporaries(parent, name, "tmp") + temporaries(parent, name, "old"):
        shutil.rmtree(t, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(out_dir, last):
    """Yield a staging folder inside out_dir (which may hold other things: data/owt holds
    prepare.py); on success its files replace out_dir's as one set. `last` is the file that says the
    set is whole (a dataset's meta.json): the old one is removed before any file moves and the new
    one moves in last, so a kill part way leaves no `last`, never a mixture it vouches for, and
    finish_files() completes the set. On error the staging folder is deleted, out_dir untouched."""
    os.makedirs(out_dir, exist_ok=True)
    for st in staged(out_dir):
        if not os.path.exists(os.path.join(st, MARKER)) and not writer_alive(st):
            shutil.rmtree(st, ignore_errors=True)        # a killed writer's, never completed
    finish_files(out_dir, last)
    tmp = tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out_dir)
    try:
        yield tmp
        write_json(os.path.join(tmp, MARKER), dict(kind="files", last=last))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_files(out_dir, last)


def staged(out_dir):
    """The staging folders in out_dir, oldest first."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), ".staging-*")), key=os.path.getmtime)


def finish_files(out_dir, last):
    """Move every complete staged set (atomic_files) into out_dir, `last` after the rest. Readers
    call it too: it completes a set whose moves a kill cut short, and only ever moves whole sets."""
    for st in staged(out_dir):
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
# one writer per folder


class Busy(CheckpointError):
    """The folder is held by another live process."""


@contextlib.contextmanager
def folder_lock(directory, what):
    """Hold an exclusive lock on `directory` (created if missing) while the block runs: a second
    writer is refused, naming the process that holds it. The lock is the kernel's (flock on the
    folder itself), so it ends with its process however that ends: a killed writer's lock is never
    stale. Who holds it is written to `directory`/.lock for the message, and removed on release."""
    import fcntl
    os.makedirs(directory, exist_ok=True)
    info = os.path.join(directory, ".lock")
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                with open(info) as f:
                    holder = f.read(200).strip()
            except OSError:
                holder = ""
            raise Busy(f"{directory} is in use by {holder or 'another process'}; wait for it to finish, or stop "
                       f"it, then run again") from None
        write_text(info, f"process {os.getpid()} ({what})\n")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(info)
    finally:
        os.close(fd)                    # closing releases the lock
