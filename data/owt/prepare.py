"""
Tokenize OpenWebText (or any text) into nanoGPT's train.bin / val.bin: token ids (GPT-2's BPE by
default, or a model's own tokenizer with --tokenizer), every document followed by the tokenizer's
end-of-text token (GPT-2: 50256), a held-out validation split. The ids are uint16 when the
vocabulary fits (65,536 ids or fewer), else uint32; meta.json records the dtype, the largest id and
the tokenizer (name, vocabulary size, end-of-text id, fingerprint), and train.py refuses a token
file whose tokenizer is not its teacher's.

  python data/owt/prepare.py                                     the Hugging Face dataset (parquet)
  python data/owt/prepare.py --fraction 0.031                    TQCompressor's 3.1% slice
  python data/owt/prepare.py --input my_corpus/ --out data/mine --val_fraction 0.01
  python data/owt/prepare.py --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz \
      --out data/owt_teacher --val_last 71     the reference teacher's own split (its held-out docs)
  python data/owt/prepare.py --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz \
      --out data/owt_bpe8k --val_last 71 --tokenizer ../shared/teacher/owt-6x256-bpe8k
                                                 the same split in owt-6x256-bpe8k's own tokenizer

--input takes files or folders of .jsonl (a "text" field per line), .txt (one document per file),
.parquet (a "text" column), each optionally .gz / .xz / .bz2 compressed. The split is nanoGPT's:
datasets' train_test_split(test_size=val_fraction, seed=2357, shuffle=True), so the full dataset
gives nanoGPT's exact val.bin. --val_last N instead holds out the last N documents in file order:
the reference teacher (../shared/teacher/owt-mini-gpt2) trained on the first 1,355 of the 1,426
sample documents and held out the last 71 (71,286 tokens, its training.json's val_tokens).

The dataset (train.bin, val.bin, meta.json) is written into a staging folder inside --out and
moved in as one set, meta.json last (it records each file's size): a kill leaves the previous
dataset, or a set the next reader completes, never a mixture. Disk space is reserved before each
chunk of ids is written, so a full disk is a one-line error that removes what was staged. The
tokenizer workers (--num_proc) die with prepare.py however it ends; Ctrl-C exits 130.
"""

import argparse
import bz2
import contextlib
import ctypes
import functools
import gzip
import itertools
import json
import lzma
import multiprocessing
import os
import signal
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import atomic  # noqa: E402
import tokenizer  # noqa: E402
from configurator import open_fraction, positive_int, run_main  # noqa: E402

HF_PARQUET = "hf://datasets/Skylion007/openwebtext@refs/convert/parquet/plain_text/train/*.parquet"
EXTS = (".jsonl", ".json", ".txt", ".parquet")
BATCH = 1024            # documents per tokenizer task


def _open(path):
    for ext, opener in ((".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)):
        if path.endswith(ext):
            return opener(path, "rt", encoding="utf-8"), path[: -len(ext)]
    return open(path, encoding="utf-8"), path


def input_files(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names)
                          if n.split(".gz")[0].split(".xz")[0].split(".bz2")[0].endswith(EXTS)]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise SystemExit(f"prepare.py: error: --input {p} does not exist")
    if not files:
        raise SystemExit(f"prepare.py: error: no {'/'.join(EXTS)} files under {paths}")
    return files


def read_file(path):
    """The documents of one local file (strings, in order)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        docs = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        if any(not isinstance(t, str) for t in docs):
            raise SystemExit(f"prepare.py: error: {path}: a \"text\" value is not a string (null?)")
        return docs
    f, base = _open(path)
    docs = []
    with f:
        if base.endswith((".jsonl", ".json")):
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise SystemExit(f"prepare.py: error: {path} line {i + 1} is not a JSON object with a "
                                     f"\"text\" string")
                docs.append(text)
        elif base.endswith(".txt"):
            docs.append(f.read())
        else:
            raise SystemExit(f"prepare.py: error: {path}: unknown file type (use {', '.join(EXTS)})")
    return docs


def read_documents(files, limit=None):
    """Documents (strings) from local files, in order, at most `limit`. A file that cannot be
    decoded (not UTF-8, a broken archive) is a one-line error that names it."""
    import pyarrow
    docs = []
    for path in files:
        try:
            docs += read_file(path)
        except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError, zlib.error, pyarrow.ArrowException) as e:
            raise SystemExit(f"prepare.py: error: {path} cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'truncated'}): not UTF-8 text, or a damaged "
                             f"or truncated file")
        if limit and len(docs) >= limit:
            return docs[:limit]
    return docs


@functools.lru_cache(maxsize=4)
def load_tokenizer(src):
    """One tokenizer per process (a forked worker keeps the one its parent loaded)."""
    return tokenizer.load(src)


def tokenize_docs(texts, src=None):
    """The tokens of each document plus the end-of-text token (nanoGPT's process())."""
    tok = load_tokenizer(src)
    return [ids + [tok.eot] for ids in tok.encode_batch(texts)]


def tokenize_chunk(texts, src=None, dtype=np.uint16):
    """A batch of documents as one flat array of ids, and how many documents it held."""
    docs = tokenize_docs(texts, src)
    n = sum(len(d) for d in docs)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=n), len(texts)


def worker_init(parent):
    """A tokenizer worker dies with prepare.py, whatever kills it (SIGKILL included: Linux's
    PR_SET_PDEATHSIG, not only when it next reads the task pipe), and leaves Ctrl-C to the parent,
    which tears the pool down and exits 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prctl = getattr(ctypes.CDLL(None), "prctl", None)
    if prctl is not None:
        prctl(1, signal.SIGKILL)                    # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:                      # the parent died before prctl took hold
        os._exit(1)


@contextlib.contextmanager
def worker_pool(num_proc):
    """num_proc forked tokenizer processes (None for one: the work stays in this process), always
    gone when the block ends: closed after the last result, terminated on an error or Ctrl-C."""
    if num_proc <= 1:
        yield None
        return
    pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=worker_init, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def write_ids(dset, path, desc, src, dtype, pool):
    """Tokenize the documents of dset in order (by the pool's workers if there is one) and append
    their ids to path. Each chunk's space is reserved before it is written (posix_fallocate), so a
    full disk is an error naming the bytes needed. Returns (tokens, largest id)."""
    from tqdm import tqdm
    work = functools.partial(tokenize_chunk, src=src, dtype=dtype)
    batches = (b["text"] for b in dset.iter(batch_size=BATCH))
    chunks = pool.imap(work, batches) if pool is not None else map(work, batches)
    total, top, size = 0, 0, np.dtype(dtype).itemsize
    with open(path, "wb", buffering=0) as f, tqdm(total=len(dset), desc=f"tokenizing {desc}", unit="docs") as bar:
        for ids, docs in chunks:
            if len(ids):
                try:
                    os.posix_fallocate(f.fileno(), total * size, len(ids) * size)
                except OSError as e:
                    raise OSError(e.errno, f"{e.strerror}: {(total + len(ids)) * size:,} bytes needed", path)
                f.write(memoryview(ids))
                total, top = total + len(ids), max(top, int(ids.max()))
            bar.update(docs)
    return total, top


def prepare(inputs=None, out_dir="data/owt", num_docs=None, fraction=None, val_fraction=0.0005, seed=2357,
            num_proc=None, val_last=None, tokenizer_src=None):
    """Tokenize, split and write train.bin / val.bin. Returns {"train": tokens, "val": tokens, ...}."""
    import datasets
    try:
        tok = load_tokenizer(tokenizer_src)
    except ValueError as e:
        raise SystemExit(f"prepare.py: error: --tokenizer: {e}")
    if num_docs is not None and num_docs < 1:
        raise SystemExit(f"prepare.py: error: --num_docs must be a positive integer, got {num_docs}")
    if not 0 < val_fraction < 1:
        raise SystemExit(f"prepare.py: error: --val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if num_proc is not None and num_proc < 1:
        raise SystemExit(f"prepare.py: error: --num_proc must be a positive integer, got {num_proc}")
    if num_docs is not None and fraction is not None:
        raise SystemExit("prepare.py: error: give --num_docs or --fraction, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise SystemExit(f"prepare.py: error: --fraction must be in (0, 1], got {fraction}")
    if inputs:
        files = input_files(inputs)
        docs = read_documents(files, num_docs)
        if fraction is not None:
            docs = docs[: max(1, int(round(fraction * len(docs))))]
        ds = datasets.Dataset.from_dict({"text": docs})
        source = f"{len(files)} local file(s)"
    else:
        try:
            ds = datasets.load_dataset("parquet", data_files={"train": HF_PARQUET}, split="train")
        except Exception as e:
            raise SystemExit(f"prepare.py: error: OpenWebText could not be loaded from the hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); offline, pass --input FILES "
                             f"(e.g. ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz)")
        n = num_docs if num_docs is not None else (round(fraction * len(ds)) if fraction is not None else len(ds))
        ds = ds.select(range(min(n, len(ds))))
        source = "Skylion007/openwebtext (parquet)"
    if len(ds) < 2:
        raise SystemExit(f"prepare.py: error: {len(ds)} document(s): need at least 2 for a train/val split")
    if val_last is not None:
        if not 1 <= val_last < len(ds):
            raise SystemExit(f"prepare.py: error: --val_last must be between 1 and {len(ds) - 1} "
                             f"(there are {len(ds)} documents), got {val_last}")
        split = datasets.DatasetDict(train=ds.select(range(len(ds) - val_last)),
                                     val=ds.select(range(len(ds) - val_last, len(ds))))
    else:
        split = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        split["val"] = split.pop("test")
    num_proc = num_proc or max(1, min(8, (os.cpu_count() or 2) // 2))
    dtype = tokenizer.token_dtype(tok.vocab_size)
    counts = {"source": source, "documents": len(ds)}
    split_args = {"val_last": val_last} if val_last is not None else {"val_fraction": val_fraction, "seed": seed}
    top = 0
    with (atomic.atomic_files(out_dir, "meta.json") as stage,       # the three files appear together
          worker_pool(num_proc if len(ds) >= 1000 * num_proc else 1) as pool):
        for name in ("train", "val"):
            counts[name], m = write_ids(split[name], os.path.join(stage, f"{name}.bin"), name, tokenizer_src,
                                        dtype, pool)
            counts[name + "_documents"] = len(split[name])
            top = max(top, m)
        sizes = {f"{n}.bin": os.path.getsize(os.path.join(stage, f"{n}.bin")) for n in ("train", "val")}
        atomic.write_json(os.path.join(stage, "meta.json"), dict(
            counts, **split_args, tokenizer=tok.info(), dtype=np.dtype(dtype).name, max_id=top, bytes=sizes))
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", help="local files or folders (default: the Hugging Face dataset)")
    p.add_argument("--out", "--out_dir", dest="out", default="data/owt", help="where train.bin, val.bin and meta.json go")
    p.add_argument("--num_docs", type=positive_int, help="use only the first N documents")
    p.add_argument("--fraction", type=float, help="use only this fraction of the documents (first ones)")
    p.add_argument("--val_fraction", type=open_fraction, default=0.0005, help="held-out share (nanoGPT: 0.0005)")
    p.add_argument("--seed", type=int, default=2357, help="split seed (nanoGPT: 2357)")
    p.add_argument("--val_last", type=positive_int, help="hold out the last N documents instead (no shuffle)")
    p.add_argument("--num_proc", type=positive_int, help="tokenizer processes (default: half the cores, at most 8)")
    p.add_argument("--tokenizer", help="a folder with a tokenizer's files or a hub name (default: GPT-2's, "
                                       "through tiktoken)")
    args = p.parse_args(argv)
    return run_main("prepare.py", run, args)


def run(args):
    try:
        c = prepare(args.input, args.out, args.num_docs, args.fraction, args.val_fraction, args.seed,
                    args.num_proc, args.val_last, args.tokenizer)
    except OSError as e:                # a full disk, a folder that cannot be written: nothing was changed
        raise OSError(f"{e}; {args.out} was left as it was") from None
    print(f"{c['source']}: {c['documents']:,} documents -> train {c['train']:,} tokens "
          f"({c['train_documents']:,} docs), val {c['val']:,} tokens ({c['val_documents']:,} docs) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
