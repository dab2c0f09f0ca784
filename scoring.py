"""
Scoring protocols: the evaluation sets' rows (the Hugging Face datasets or local files in the layout
of ../shared/data), their tokenization (cached), the windows each protocol scores (kp, hf, harness)
and the scores, and any model form loaded for scoring. perplexity_eval.py is the command line;
docs/evaluation.md has the formulas.
"""

import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import torch

import atomic
import checkpoint
import tokenizer
from data import DataError

DATASETS = ("wiki103", "wiki2", "lambada", "owt")
PROTOCOLS = ("kp", "hf", "harness")

# Published figures, protocol kp (WikiText-103, WikiText-2, LAMBADA full text, perplexity), as the
# Krony-PT paper's table prints them (arXiv 2412.12351); the Krony-PT 81M row is from its README.
PUBLISHED_KP = {
    "GPT-2 124M": (29.16, 24.67, 45.28),
    "DistilGPT2": (44.53, 36.48, 76.00),
    "KnGPT2": (40.97, 32.81, 67.62),
    "TQCompressedGPT-2": (40.28, 32.25, 64.72),
    "Krony-PT 81M": (41.98, 34.99, 64.92),
}
# GPT-2 small under lm-evaluation-harness: lambada_openai accuracy and perplexity, wikitext word
# perplexity (harness documentation and leaderboards).
PUBLISHED_HARNESS = {"GPT-2 124M": {"lambada_acc": 0.3256, "lambada_ppl": 40.06, "wikitext_word_ppl": 37.4}}
# The Hugging Face perplexity guide: gpt2-large on raw WikiText-2 test, stride 1024 and 512.
PUBLISHED_HF = {"gpt2-large": {1024: 19.44, 512: 16.44}}


# -----------------------------------------------------------------------------
# data: rows exactly as the Hugging Face datasets hold them, from the hub or local files

# dataset -> (hub path, hub config, column, local file relative to --data_dir, kind of local file)
SOURCES = {
    "wikitext-103-v1": ("Salesforce/wikitext", "wikitext-103-v1", "text", "wikitext/wikitext-103-tokens/wiki.test.tokens", "wikitext"),
    "wikitext-2-v1": ("Salesforce/wikitext", "wikitext-2-v1", "text", "wikitext/wikitext-2-tokens/wiki.test.tokens", "wikitext"),
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "wikitext/wikitext-2-raw/wiki.test.raw", "wikitext"),
    "wikitext-docs": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "page",
                      "wikitext/source_wikitext_document_level/wikitext-2-raw-v1/test", "arrow"),
    "lambada-plain": ("cimec/lambada", None, "text", "lambada/lambada_test_plain_text.txt", "lines"),
    "lambada-openai": ("EleutherAI/lambada_openai", "default", "text", "lambada/lambada_test.jsonl", "jsonl"),
}


def data_dir_default():
    return os.environ.get("KRONY_DATA_DIR") or None


def _read_local(path, kind):
    if kind == "wikitext":
        # a WikiText file is the HF rows without their newlines; a blank row was written back as " "
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.endswith("\n"):
            raise DataError(f"{path} is malformed: a WikiText file ends with a newline")
        return [l + "\n" if l.strip() else "" for l in text.split("\n")[:-1]]
    if kind == "lines":
        with open(path, encoding="utf-8") as f:
            return [l.rstrip("\n") for l in f]
    if kind == "jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path} line {i + 1} is not a JSON object with a \"text\" field")
        return rows
    from datasets import load_from_disk
    return list(load_from_disk(path)["page"])


def load_rows(source, data_dir=None):
    """The rows of one evaluation source: local files under data_dir if given, else the hub."""
    hub, config, column, rel, kind = SOURCES[source]
    if data_dir:
        path = os.path.join(data_dir, rel)
        if not os.path.exists(path):
            raise DataError(f"{source}: {path} not found (looked in --data_dir / KRONY_DATA_DIR {data_dir}); "
                            f"the layout is that of ../shared/data, or drop --data_dir to use the hub "
                            f"dataset {hub}{'/' + config if config else ''}")
        try:
            rows = _read_local(path, kind)
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"{source}: cannot read {path}: {e}")
    else:
        try:
            from datasets import load_dataset
            ds = load_dataset(hub, config, split="test") if config else load_dataset(hub, split="test")
            rows = list(ds[column])
        except Exception as e:
            raise DataError(f"{source}: the hub dataset {hub}{'/' + config if config else ''} could not be "
                            f"loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__}); offline, pass "
                            f"--data_dir DIR (or set KRONY_DATA_DIR) with the layout of ../shared/data, "
                            f"where it is {rel}")
    if not rows:
        raise DataError(f"{source}: no rows read")
    return rows


def cached_tokens(text, tok, cache_dir):
    """The tokens of text, cached in a file named by the tokenizer's fingerprint and the text's hash
    (tokenizing WikiText-103 takes longer than scoring it on a GPU). An entry holds the count and
    the SHA-256 of its ids before them; one that does not match them (truncated, damaged) is
    tokenized again and replaced, never scored."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{tok.fingerprint()}-{key}.tok") if cache_dir else None
    dtype = tokenizer.token_dtype(tok.vocab_size)
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            blob = f.read()
        n = int.from_bytes(blob[:8], "little")
        body = blob[40:]
        if len(body) == n * np.dtype(dtype).itemsize and hashlib.sha256(body).digest() == blob[8:40]:
            return np.frombuffer(body, dtype=dtype).astype(np.int64)
        print(f"note: the cache entry {path} is damaged; tokenizing again", file=sys.stderr)
    ids = np.array(tok.encode(text), dtype=np.int64)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        body = ids.astype(dtype).tobytes()
        with atomic.atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(len(ids).to_bytes(8, "little") + hashlib.sha256(body).digest() + body)
    return ids


# -----------------------------------------------------------------------------
# scoring windows: the one loop every protocol uses

def score_windows(forward, ids, windows, batch_size=8, device="cpu", bar=None):
    """Score windows over the token array ids. A window (begin, end, first) feeds
    ids[begin:end-1] to the model and scores the tokens at positions first..end-1, each predicted
    from everything before it in the window. Windows are batched (sorted by length, padded on the
    right, which a causal model never sees). Returns per window: (summed negative log-likelihood,
    number of scored tokens, whether every scored token was the greedy choice)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = [None] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: windows[i][1] - windows[i][0])
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        T = max(windows[i][1] - windows[i][0] - 1 for i in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for row, i in enumerate(chunk):
            b, e, first = windows[i]
            x[row, :e - b - 1] = torch.from_numpy(ids[b:e - 1])
            y[row, first - b - 1:e - b - 1] = torch.from_numpy(ids[first:e])
        x, y = x.to(device), y.to(device)
        logits = forward(x).float()
        # -log p(y) = logsumexp(logits) - logit[y]; torch's float32 cross_entropy on CPU is ~30 ulps off
        # over a 50k vocabulary (3e-5 nats), logsumexp ~1 ulp, and no log-softmax tensor is materialized.
        picked = logits.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        nll = torch.where(y >= 0, torch.logsumexp(logits, -1) - picked, 0.0)
        hit = (logits.argmax(-1) == y) | (y < 0)
        n = (y >= 0).sum(1)
        for row, i in enumerate(chunk):
            out[i] = (nll[row].sum().item(), int(n[row]), bool(hit[row].all()))
        if bar is not None:
            bar.update(int(n.sum()))
    return out


def kp_windows(n_tokens, L):
    """Krony-PT: windows of L tokens at stride L, labels = inputs, so each window scores its tokens
    after the first. A final window of one token has nothing to score (their loop gives NaN): dropped."""
    return [(b, min(b + L, n_tokens), b + 1) for b in range(0, n_tokens, L) if min(b + L, n_tokens) - b >= 2]


def hf_windows(n_tokens, L, stride):
    """The Hugging Face guide: windows of L tokens every `stride`; each scores only the tokens no
    earlier window scored, so every token after the first is scored once, with the most context."""
    if not 1 <= stride <= L:
        raise ValueError(f"stride must be between 1 and the context length {L}, got {stride}")
    wins, prev_end = [], 0
    for b in range(0, n_tokens, stride):
        e = min(b + L, n_tokens)
        first = max(prev_end, b + 1)
        if e > first:                  # the guide feeds ids[b:e]; its predictions are for b+1..e-1
            wins.append((b, e, first))
        prev_end = e
        if e == n_tokens:
            break
    return wins


def rolling_windows(n_doc, L, offset=0):
    """lm-evaluation-harness's rolling log-likelihood (context_len 1) over one document stored as
    [EOT] + tokens at `offset`: the first window predicts the first min(L, n) tokens from the EOT
    prefix; each later window predicts the next L tokens, its input the L tokens before each."""
    wins = [(offset, offset + min(L, n_doc) + 1, offset + 1)]
    done = min(L, n_doc)
    while done < n_doc:
        pred = min(n_doc - done, L)
        end = done + pred                          # in document tokens; +1 for the EOT prefix
        wins.append((offset + end - L, offset + end + 1, offset + done + 1))
        done += pred
    return wins


# -----------------------------------------------------------------------------
# protocols

def scored_bytes(ids, windows, token_bytes):
    """The UTF-8 bytes of the tokens the windows score (first..end-1 of each)."""
    cum = np.concatenate([[0], np.cumsum(token_bytes[np.asarray(ids, dtype=np.int64)])])
    return int(sum(cum[e] - cum[first] for _, e, first in windows))


def eval_kp(forward, ids, L, batch_size, device, token_bytes, bar=None):
    wins = kp_windows(len(ids), L)
    res = score_windows(forward, ids, wins, batch_size, device, bar)
    means = [s / n for s, n, _ in res]
    nll, n = sum(s for s, _, _ in res), sum(n for _, n, _ in res)
    nbytes = scored_bytes(ids, wins, token_bytes)
    return dict(ppl=math.exp(float(np.mean(means))), ppl_token_weighted=math.exp(nll / n),
                bits_per_byte=nll / nbytes / math.log(2), windows=len(res), tokens=int(len(ids)), scored=n,
                bytes=nbytes)


def eval_hf(forward, ids, L, stride, batch_size, device, token_bytes, bar=None):
    wins = hf_windows(len(ids), L, stride)
    res = score_windows(forward, ids, wins, batch_size, device, bar)
    nll, n = sum(s for s, _, _ in res), sum(n for _, n, _ in res)
    nbytes = scored_bytes(ids, wins, token_bytes)
    return dict(ppl=math.exp(nll / n), bits_per_byte=nll / nbytes / math.log(2), stride=stride, windows=len(res),
                tokens=int(len(ids)), scored=n, bytes=nbytes)


def lambada_windows(passages, L, tok, max_tokens=None):
    """lambada_openai as the harness scores it: context = passage minus its last space-separated
    word, continuation = " " + that word, tokenized as enc(passage) split at len(enc(context))."""
    ids, wins = [], []
    for p in passages:
        if max_tokens and len(ids) >= max_tokens:
            break
        ctx = p.rsplit(" ", 1)[0]
        whole = tok.encode(p)
        n_ctx = len(tok.encode(ctx))
        if not 0 < n_ctx < len(whole):
            raise DataError(f"a LAMBADA passage has no context or no last word: {p[:60]!r}")
        off = len(ids)
        ids += whole
        wins.append((off + max(0, len(whole) - L - 1), off + len(whole), off + n_ctx))
    return np.array(ids, dtype=np.int64), wins


def eval_lambada_harness(forward, passages, L, batch_size, device, tok, bar=None, max_tokens=None):
    ids, wins = lambada_windows(passages, L, tok, max_tokens)
    res = score_windows(forward, ids, wins, batch_size, device, bar)
    ll = [-s for s, _, _ in res]
    return dict(acc=float(np.mean([h for _, _, h in res])), ppl=math.exp(-float(np.mean(ll))),
                passages=len(res))


def wikitext_detokenizer(s):
    """lm-evaluation-harness's wikitext detokenizer (undoes WikiText's tokenization of the raw text)."""
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def eval_wikitext_harness(forward, pages, L, batch_size, device, tok, bar=None, max_tokens=None):
    """Word perplexity, byte perplexity and bits per byte: the log-likelihood of each detokenized
    document by rolling windows; words (split on whitespace) and UTF-8 bytes counted on the
    original document, as the harness does."""
    ids, wins, words, nbytes, docs = [], [], 0, 0, 0
    for page in pages:
        if max_tokens and len(ids) >= max_tokens:
            break
        docs += 1
        toks = tok.encode(wikitext_detokenizer(page))
        words += len(re.split(r"\s+", page))
        nbytes += len(page.encode("utf-8"))
        if not toks:
            continue
        wins += rolling_windows(len(toks), L, offset=len(ids))
        ids += [tok.eot] + toks
    res = score_windows(forward, np.array(ids, dtype=np.int64), wins, batch_size, device, bar)
    nll = sum(s for s, _, _ in res)
    return dict(word_ppl=math.exp(nll / words), byte_ppl=math.exp(nll / nbytes),
                bits_per_byte=nll / nbytes / math.log(2), documents=docs, words=words, bytes=nbytes)


# -----------------------------------------------------------------------------
# models

def load_model(name_or_dir, device="cpu"):
    """Any model form as this project's GPT, float32 weights: a student checkpoint or compact export
    (factors kept), a dense Hugging Face GPT-2 directory, or a hub name. Returns (model, description)."""
    from model import GPT
    if os.path.isdir(name_or_dir) and os.path.exists(os.path.join(name_or_dir, "config.json")):
        if checkpoint.read_config(name_or_dir).get("model_type") == checkpoint.FORMAT:
            model, _ = checkpoint.load_student(name_or_dir)
            kind = "student checkpoint / compact export"
        else:
            model, _ = GPT.from_pretrained(name_or_dir)
            kind = "Hugging Face GPT-2 directory"
    elif os.path.exists(name_or_dir):
        raise ValueError(f"{name_or_dir} is not a model directory (no config.json)")
    else:
        model, _ = GPT.from_pretrained(name_or_dir)
        kind = "hub model"
    return model.to(device).eval(), kind


def make_forward(model, device, dtype=torch.float32):
    """logits = forward(x) under inference mode; with dtype bfloat16 or float16, under autocast (the
    weights stay float32, and GPT.forward computes the logits in float32)."""
    amp = dtype != torch.float32

    def forward(x):
        with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, enabled=amp, dtype=dtype):
            return model(x).logits
    return forward


# -----------------------------------------------------------------------------
# running a set of evaluations

def evaluate(model, datasets, protocol="kp", data_dir=None, stride=None, block_size=None, batch_size=8,
             device="cpu", max_tokens=None, owt_bin="data/owt/val.bin", cache_dir="data/eval_cache",
             progress=True, dtype=torch.float32, tok=None):
    """{dataset: metrics} for one protocol. max_tokens truncates every token stream (quick runs).
    tok: the model's tokenizer (default: GPT-2's, for a GPT-2 vocabulary)."""
    from tqdm import tqdm
    L = model.config.block_size if block_size is None else block_size
    if not 2 <= L <= model.config.block_size:
        raise ValueError(f"context length {L} is not between 2 and the model's block_size {model.config.block_size}")
    for k, v in (("batch_size", batch_size), ("max_tokens", max_tokens), ("stride", stride)):
        if v is not None and v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v}")
    tok = tok or tokenizer.for_model(None, model.config.vocab_size)
    token_bytes = tok.token_bytes(model.config.vocab_size)
    forward = make_forward(model, device, dtype)
    results = {}

    def stream(rows_source):
        text = "\n\n".join(load_rows(rows_source, data_dir))
        ids = cached_tokens(text, tok, cache_dir)
        return ids[:max_tokens] if max_tokens else ids

    for ds in datasets:
        twin = {"wiki103": "wiki2", "wiki2": "wiki103"}.get(ds)
        if protocol != "kp" and twin in results:       # the same raw articles: computed once
            results[ds] = dict(results[twin])
            continue
        bar = tqdm(desc=f"{protocol} {ds}", unit="tok", disable=not progress, leave=False)
        if protocol == "kp":
            if ds == "owt":
                ids = owt_tokens(owt_bin, tok, model.config.vocab_size, max_tokens)
            else:
                ids = stream({"wiki103": "wikitext-103-v1", "wiki2": "wikitext-2-v1", "lambada": "lambada-plain"}[ds])
            bar.total = len(ids)
            results[ds] = eval_kp(forward, ids, L, batch_size, device, token_bytes, bar)
        elif protocol == "hf":
            ids = owt_tokens(owt_bin, tok, model.config.vocab_size, max_tokens) if ds == "owt" else \
                stream("wikitext-2-raw-v1") if ds in ("wiki2", "wiki103") else None
            if ids is None:
                results[ds] = dict(note="protocol hf is defined for WikiText and OpenWebText only")
                continue
            bar.total = len(ids)
            results[ds] = eval_hf(forward, ids, L, stride or L, batch_size, device, token_bytes, bar)
            results[ds]["note"] = "raw WikiText-2 test, which is also the raw WikiText-103 test (same articles)"
        else:
            if ds == "lambada":
                passages = load_rows("lambada-openai", data_dir)
                results[ds] = eval_lambada_harness(forward, passages, L, batch_size, device, tok, bar, max_tokens)
            elif ds in ("wiki2", "wiki103"):
                pages = load_rows("wikitext-docs", data_dir)
                results[ds] = eval_wikitext_harness(forward, pages, L, batch_size, device, tok, bar, max_tokens)
                results[ds]["note"] = "wikitext-2-raw-v1 documents, the same test articles as WikiText-103"
            else:
                results[ds] = dict(note="protocol harness is defined for LAMBADA and WikiText only")
        bar.close()
    return results


def score_suite(model, tok, wanted, data_dir, owt_bin, device, max_tokens=None, owt_tokens=None):
    """The scores a recipe is judged by (demo.py's table, scripts/compare.py's rows): `wanted` is a
    list of (dataset, protocol) pairs, OWT cut to owt_tokens and every other stream to max_tokens
    (None: all of it). Returns {"dataset protocol": metrics}."""
    model = model.to(device).eval()
    kw = dict(data_dir=data_dir, device=device, progress=False, tok=tok, owt_bin=owt_bin)
    out = {}
    for protocol in dict.fromkeys(p for _, p in wanted):
        names = [d for d, p in wanted if p == protocol]
        for group, cut in (([d for d in names if d == "owt"], owt_tokens), ([d for d in names if d != "owt"], max_tokens)):
            if group:
                res = evaluate(model, group, protocol, max_tokens=cut, **kw)
                out.update({f"{d} {protocol}": res[d] for d in group})
    return out


def owt_tokens(path, tok, vocab_size, max_tokens=None):
    """Held-out OpenWebText tokens, refused if another tokenizer than the model's made them."""
    if not os.path.exists(path):
        raise DataError(f"owt: {path} not found; create it with `python data/owt/prepare.py` (with the model's "
                        f"--tokenizer) or pass --owt_bin FILE (a GPT-2 token file, e.g. "
                        f"../shared/data/openwebtext/owt10k_val_karpathy-nanoGPT-263b800d.bin)")
    try:
        ids = tokenizer.token_file(path)
        ids = ids[:max_tokens] if max_tokens else ids
        tokenizer.check_tokens(path, ids, vocab_size, tok)
    except ValueError as e:
        raise DataError(f"owt: {e}")
    return np.asarray(ids, dtype=np.int64)


def format_results(name, protocol, results, published=True):
    """The results as text; published: add the published GPT-2-family figures (per GPT-2 token,
    so only for a model with GPT-2's tokenizer)."""
    lines = []
    if protocol == "kp":
        cols = [d for d in ("wiki103", "wiki2", "lambada", "owt") if d in results]
        head = f"{'model':<32}" + "".join(f"{c:>12}" for c in cols)
        lines += ["protocol kp: perplexity = exp(mean of per-window mean losses); "
                  "token-weighted variant below it", head]
        lines.append(f"{name[:32]:<32}" + "".join(f"{results[c]['ppl']:>12.2f}" for c in cols))
        lines.append(f"{'  token-weighted':<32}" + "".join(f"{results[c]['ppl_token_weighted']:>12.2f}" for c in cols))
        lines.append(f"{'  difference':<32}" + "".join(
            f"{results[c]['ppl'] / results[c]['ppl_token_weighted'] - 1:>+12.2%}" for c in cols))
        lines.append(f"{'  bits per byte':<32}" + "".join(f"{results[c]['bits_per_byte']:>12.4f}" for c in cols))
        for ref, vals in PUBLISHED_KP.items() if published else ():
            pub = dict(zip(("wiki103", "wiki2", "lambada"), vals))
            lines.append(f"{ref + ' (published)':<32}" + "".join(f"{pub[c]:>12.2f}" if c in pub else f"{'':>12}" for c in cols))
    elif protocol == "hf":
        for d, r in results.items():
            lines.append(f"protocol hf, {d}: " + (f"perplexity {r['ppl']:.2f}, bits per byte {r['bits_per_byte']:.4f} "
                                                 f"(stride {r['stride']}, {r['scored']:,} tokens scored)"
                                                 if "ppl" in r else r["note"]))
        if published:
            lines.append(f"published (HF guide, raw WikiText-2): gpt2-large {PUBLISHED_HF['gpt2-large'][1024]} at "
                         f"stride 1024, {PUBLISHED_HF['gpt2-large'][512]} at stride 512")
    else:
        pub = PUBLISHED_HARNESS["GPT-2 124M"]
        for d, r in results.items():
            if "acc" in r:
                lines.append(f"protocol harness, lambada_openai: accuracy {r['acc']:.4f}, perplexity {r['ppl']:.2f} "
                             f"({r['passages']:,} passages); GPT-2 124M published {pub['lambada_acc']}, {pub['lambada_ppl']}")
            elif "word_ppl" in r:
                lines.append(f"protocol harness, wikitext ({d}): word perplexity {r['word_ppl']:.2f}, byte perplexity "
                             f"{r['byte_ppl']:.4f}, bits per byte {r['bits_per_byte']:.4f} ({r['documents']} documents); "
                             f"GPT-2 124M published word perplexity {pub['wikitext_word_ppl']}")
            else:
                lines.append(f"protocol harness, {d}: {r['note']}")
    return "\n".join(lines)


def held_out(model, tokens, token_bytes):
    """(loss in nats per token, bits per byte) of model over the kp windows of held-out tokens: the
    figure the init and budget comparisons rank by."""
    res = eval_kp(make_forward(model.eval(), "cpu"), tokens, model.config.block_size, 8, "cpu", token_bytes)
    return math.log(res["ppl_token_weighted"]), res["bits_per_byte"]
