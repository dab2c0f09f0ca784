"""data/owt/prepare.py on small local files: the same ids as tiktoken, nanoGPT's split, no half-written .bin."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "data" / "owt"))
import prepare  # noqa: E402

TIKTOKEN_CACHE = SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"
DOCS = [f"Document number {i}: the quick brown fox jumps over {i * 7} lazy dogs.\nSecond line, café." for i in range(40)]


@pytest.fixture(autouse=True)
def tiktoken_offline(monkeypatch):
    if not (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").exists():
        pytest.skip(f"tiktoken cache not found at {TIKTOKEN_CACHE} (set KRONY_SHARED to the shared/ folder)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


def write_inputs(d):
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:30]))
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in DOCS[30:38]))
    (d / "sub").mkdir()
    (d / "sub" / "c.txt").write_text(DOCS[38])
    (d / "sub" / "d.txt").write_text(DOCS[39])


def test_same_ids_as_tiktoken_and_nanogpt_split(tmp_path):
    import datasets
    import tiktoken
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src)
    c = prepare.prepare([str(src)], str(tmp_path / "out"), val_fraction=0.1)
    enc = tiktoken.get_encoding("gpt2")
    # the split nanoGPT makes: train_test_split(test_size, seed=2357, shuffle=True)
    split = datasets.Dataset.from_dict({"text": DOCS}).train_test_split(test_size=0.1, seed=2357, shuffle=True)
    for name, part in (("train", "train"), ("val", "test")):
        want = [t for doc in split[part]["text"] for t in enc.encode_ordinary(doc) + [50256]]
        got = np.fromfile(tmp_path / "out" / f"{name}.bin", dtype=np.uint16)
        assert got.tolist() == want
        assert c[name] == len(want)
    assert c["documents"] == 40 and c["val_documents"] == 4
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"] == c["train"] and meta["dtype"] == "uint16"


def test_slices(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src)
    assert prepare.prepare([str(src)], str(tmp_path / "a"), num_docs=10, val_fraction=0.2)["documents"] == 10
    assert prepare.prepare([str(src)], str(tmp_path / "b"), fraction=0.5, val_fraction=0.2)["documents"] == 20
    with pytest.raises(SystemExit, match="not both"):
        prepare.prepare([str(src)], str(tmp_path / "c"), num_docs=3, fraction=0.5)


def test_interrupted_write_leaves_no_bin(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src)
    real = np.fromiter
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(prepare.np, "fromiter", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(src)], str(tmp_path / "out"), val_fraction=0.1)
    assert not any(f.endswith((".bin", ".tmp")) for f in os.listdir(tmp_path / "out"))


def test_bad_input_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SystemExit, match="line 2 is not a JSON object"):
        prepare.prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"))
    (tmp_path / "null.jsonl").write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(SystemExit, match="null.jsonl line 2 is not a JSON object with a \"text\" string"):
        prepare.prepare([str(tmp_path / "null.jsonl")], str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="does not exist"):
        prepare.prepare([str(tmp_path / "missing")], str(tmp_path / "o"))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 na\u00efve".encode("latin-1"))
    import lzma
    (tmp_path / "cut.jsonl.xz").write_bytes(lzma.compress(b'{"text": "x"}\n' * 1000)[:60])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:30])
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    for name in ("latin1.txt", "cut.jsonl.xz", "cut.jsonl.gz", "junk.jsonl.gz"):
        with pytest.raises(SystemExit, match=f"{name} cannot be read"):
            prepare.prepare([str(tmp_path / name)], str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--num_docs", "-5"], ["--num_docs", "0"], ["--val_fraction", "0"],
                                  ["--val_fraction", "1"], ["--val_fraction", "-0.1"], ["--num_proc", "-1"],
                                  ["--val_last", "0"]])
def test_bad_values_are_a_bad_command_line(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(tmp_path), "--out_dir", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and args[0] in capsys.readouterr().err


def dataset_files(d):
    return {f: (d / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}


def test_a_dataset_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A kill while the new set is staged leaves the old set; a kill while it is moved in leaves no
    meta.json vouching for a mixture, and the next reader completes the new set."""
    import tokenizer
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src)
    out = tmp_path / "out"
    prepare.prepare([str(src)], str(out), num_docs=20, val_fraction=0.25)
    old = dataset_files(out)
    real_replace = os.replace
    moved = []

    def killed_after_one(a, b):
        real_replace(a, b)
        moved.append(b)
        if str(b).endswith(".bin"):
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare.atomic.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(src)], str(out), num_docs=40, val_fraction=0.25)
    monkeypatch.setattr(prepare.atomic.os, "replace", real_replace)
    assert [os.path.basename(m) for m in moved if str(m).startswith(str(out) + os.sep + "t")] == ["train.bin"]
    assert not (out / "meta.json").exists()           # nothing vouches for new train.bin + old val.bin
    val = tokenizer.token_file(str(out / "val.bin"))   # a reader completes the set
    new = dataset_files(out)
    assert new["train.bin"] != old["train.bin"] and new["val.bin"] != old["val.bin"]
    assert json.loads(new["meta.json"])["documents"] == 40 and len(val) * 2 == len(new["val.bin"])
    assert [f for f in os.listdir(out) if f.startswith(".")] == []
    # killed while staging (the tokens half written): the complete set stays as it was
    monkeypatch.setattr(prepare.np, "fromiter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare([str(src)], str(out), num_docs=20, val_fraction=0.25)
    assert dataset_files(out) == new and [f for f in os.listdir(out) if f.startswith(".")] == []
    (out / "val.bin").write_bytes(old["val.bin"])      # a file swapped in by hand is caught
    with pytest.raises(ValueError, match="replaced after prepare.py wrote it"):
        tokenizer.token_file(str(out / "val.bin"))


def test_a_full_disk_is_an_error_that_changes_nothing(tmp_path, monkeypatch, capsys):
    import errno
    src = tmp_path / "in"
    src.mkdir()
    write_inputs(src)
    out = tmp_path / "out"
    prepare.prepare([str(src)], str(out), val_fraction=0.25)
    before = dataset_files(out)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(prepare.os, "posix_fallocate", full)
    assert prepare.main(["--input", str(src), "--out_dir", str(out), "--val_fraction", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "bytes needed" in err and "Traceback" not in err
    assert dataset_files(out) == before and [f for f in os.listdir(out) if f.startswith(".")] == []


def test_command_line_on_the_shared_sample(tmp_path):
    sample = SHARED / "data" / "openwebtext" / "owt10k_sample_docs.jsonl.xz"
    if not sample.exists():
        pytest.skip(f"OpenWebText sample not found at {sample}")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE))
    p = subprocess.run([sys.executable, "data/owt/prepare.py", "--input", str(sample), "--out_dir", str(tmp_path),
                        "--num_docs", "200"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "200 documents" in p.stdout
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert (ids == 50256).sum() + (np.fromfile(tmp_path / "val.bin", dtype=np.uint16) == 50256).sum() == 200


def test_val_last_holds_out_the_last_documents(tmp_path):
    """--val_last N: the last N documents in file order, no shuffle (the reference teacher's split)."""
    docs = [f"document number {i} " * (i + 1) for i in range(12)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = prepare.prepare([str(src)], str(tmp_path / "out"), val_last=3)
    assert (c["train_documents"], c["val_documents"]) == (9, 3)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    want_val = [t for d in docs[9:] for t in enc.encode_ordinary(d) + [50256]]
    want_train = [t for d in docs[:9] for t in enc.encode_ordinary(d) + [50256]]
    assert np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16).tolist() == want_val
    assert np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16).tolist() == want_train
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["val_last"] == 3
    for bad in (0, 12):
        with pytest.raises(SystemExit, match="--val_last must be between 1 and 11"):
            prepare.prepare([str(src)], str(tmp_path / "bad"), val_last=bad)


def children(pid):
    """Live processes whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
        except (OSError, IndexError):
            pass
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_tokenizer_workers_die_with_prepare(tmp_path, sig):
    """However prepare.py ends, its --num_proc workers end with it; Ctrl-C is status 130, one line."""
    import signal
    import time
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "kronecker", "factor", "matrix", "token"]
    with open(tmp_path / "big.jsonl", "w") as f:
        for _ in range(6000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 1500))}) + "\n")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE))
    p = subprocess.Popen([sys.executable, "data/owt/prepare.py", "--input", str(tmp_path / "big.jsonl"),
                          "--out_dir", str(tmp_path / "o"), "--num_proc", "2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # Ctrl-C as a shell delivers it: an ignored SIGINT inherited from this process
                         # would stay ignored across exec, and Python would then never raise KeyboardInterrupt
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(workers := children(p.pid)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2, "the workers never started"
    time.sleep(0.5)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers), f"orphaned workers after {sig}"
    assert p.returncode == {"SIGKILL": -9, "SIGTERM": -15, "SIGINT": 130}[sig]
    if sig == "SIGINT":
        assert err.strip().splitlines()[-1] == "prepare.py: interrupted" and "Traceback" not in err, err
    assert not (tmp_path / "o" / "train.bin").exists()
