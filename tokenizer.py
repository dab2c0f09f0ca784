"""
Tokenizers behind one small interface: GPT-2's BPE through tiktoken (what nanoGPT and Krony-PT use),
or a model's own tokenizer through transformers (a folder's tokenizer.json / vocab.json, or a hub
name). Every place where text becomes tokens (data preparation, evaluation, sampling, export) gets
its tokenizer from `for_model` or `load`, so a GPT-2-family model that brings its own vocabulary is
tokenized with it.

A tokenizer is identified by its fingerprint: the hash of its vocabulary size, end-of-text id and
the ids it gives a fixed probe text (prose, digits, code, whitespace runs, accents, CJK, emoji).
Two tokenizers with the same fingerprint split text the same way (tiktoken's gpt2 and GPT-2's
Hugging Face files share one); token files record it, and training refuses a file whose fingerprint
is not the teacher's.
"""

import base64
import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import atomic

GPT2 = "gpt2"
GPT2_VOCAB = 50257
GPT2_EOT = 50256
# GPT-2's pre-tokenization pattern (openai/gpt-2 encoder.py; tiktoken's r50k_pat_str)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
FILES = ("tokenizer.json", "vocab.json")
PROBE = ("The quick brown fox jumps over the lazy dog. It's 3:14 p.m. on 2024-05-06; pi ~ 3.14159!\n\n"
         "  def f(x):\n\treturn x**2 + 1  # comment\n"
         "Caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m \u2014 \u201cquoted\u201d \u00a9 "
         "\u4f60\u597d\u4e16\u754c \U0001F600 <html>&amp;</html> 1234567890 @user #tag   \n")


@dataclass
class Tokenizer:
    """name: where it came from; encode: ordinary text to ids (no special tokens added);
    encode_batch: the same for a list; decode: ids to text; eot: the end-of-text id that separates
    documents; vocab_size: ids are below it; hf: the transformers tokenizer (None for tiktoken)."""
    name: str
    vocab_size: int
    eot: int
    encode: Callable[[str], list]
    encode_batch: Callable[[list], list]
    decode: Callable[[list], str]
    hf: Any = None
    tiktoken: Any = None

    def fingerprint(self):
        ids = self.encode(PROBE)
        return hashlib.sha256(json.dumps([self.vocab_size, self.eot, ids]).encode()).hexdigest()[:16]

    def info(self):
        """What token files and exports record about the tokenizer that made them."""
        return dict(name=self.name, vocab_size=self.vocab_size, eot=self.eot, fingerprint=self.fingerprint())

    def token_bytes(self, size=None):
        """The UTF-8 length in bytes of the text of each id (0 for special tokens such as the end of
        text, and for ids from vocab_size to `size`, a model's padding of its vocabulary), so that
        bits per byte of a scored stretch is its loss over the sum of these."""
        out = np.zeros(max(size or 0, self.vocab_size), dtype=np.int64)
        if self.tiktoken is not None:
            out[:self.eot] = [len(self.tiktoken.decode_single_token_bytes(i)) for i in range(self.eot)]
            return out
        special = set(self.hf.all_special_ids) | set(self.hf.added_tokens_decoder)
        from transformers.convert_slow_tokenizer import bytes_to_unicode      # GPT-2's byte alphabet
        alphabet = set(bytes_to_unicode().values())
        for i, p in enumerate(self.hf.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if i in special or p is None:
                continue        # byte-level BPE: one character of its alphabet per byte
            out[i] = len(p) if all(c in alphabet for c in p) else len(self.decode([i]).encode("utf-8"))
        return out


def gpt2():
    """GPT-2's BPE through tiktoken (TIKTOKEN_CACHE_DIR serves its files offline)."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise ValueError(f"tiktoken's gpt2 encoding is not available ({type(e).__name__}); offline, set "
                         f"TIKTOKEN_CACHE_DIR to a folder holding its files "
                         f"(../shared/data/gpt2_tokenizer/tiktoken_cache)")
    return Tokenizer(GPT2, enc.n_vocab, enc.eot_token, enc.encode_ordinary,
                     lambda texts: enc.encode_ordinary_batch(texts), enc.decode, tiktoken=enc)


def has_files(path):
    return bool(path) and os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in FILES)


def from_hf(tok, name):
    """Wrap a transformers tokenizer. Its backend (the `tokenizers` library) encodes without the
    length warnings and in parallel for batches; the end of text is its eos token."""
    eot = tok.eos_token_id
    if eot is None:
        raise ValueError(f"the tokenizer of {name} has no end-of-text (eos) token: documents cannot be separated")
    backend = tok.backend_tokenizer

    def encode_batch(texts):
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return Tokenizer(name, len(tok), eot, lambda t: backend.encode(t, add_special_tokens=False).ids, encode_batch,
                     lambda ids: tok.decode(ids), hf=tok)


def load(src=None):
    """GPT-2's (src None or "gpt2"), a folder with tokenizer files, or a hub name."""
    if src in (None, GPT2):
        return gpt2()
    if os.path.exists(src) and not has_files(src):
        raise ValueError(f"{src} holds no tokenizer (no {' or '.join(FILES)}); give a folder with a "
                         f"tokenizer's files or a hub name")
    from transformers import AutoTokenizer
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()   # a compact export's config.json is not GPT-2's: its warning is noise here
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)   # never run a folder's code
    except Exception as e:
        raise ValueError(f"no tokenizer could be loaded from {src} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})")
    finally:
        logging.set_verbosity(level)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer of {src} has no fast (tokenizers) backend")
    return from_hf(tok, src)


def config_eots(model, vocab_size):
    """The end-of-text ids a model folder's config.json names (eos_token_id, or a student's
    hf_config's) that lie in its vocabulary; [] where it names none (a hub name, a tiny test model
    with GPT-2's default 50256 beyond its vocabulary)."""
    path = os.path.join(model, "config.json") if model and os.path.isdir(model) else None
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        cfg = json.load(f)
    eos = cfg.get("eos_token_id", (cfg.get("hf_config") or {}).get("eos_token_id"))
    eos = eos if isinstance(eos, list) else [eos]
    return [e for e in eos if isinstance(e, int) and 0 <= e < vocab_size]


def recorded_teacher(model):
    """The teacher a student checkpoint or compact export names in its config.json, or None."""
    path = os.path.join(model, "config.json") if model and os.path.isdir(model) else None
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("teacher")


def for_model(model, vocab_size, given=None):
    """The tokenizer of a model (a folder or hub name): `given` if any, else the first of the model's
    folder and the teacher its config names that holds tokenizer files, else GPT-2's for a GPT-2
    vocabulary (50257 ids), else the hub's tokenizer of a hub name."""
    sources = [p for p in (model, recorded_teacher(model)) if p]
    local = [p for p in sources if has_files(p)]
    hub = [p for p in sources if not os.path.exists(p)]
    if given:
        tok = load(given)
    elif local:
        tok = load(local[0])
    elif vocab_size == GPT2_VOCAB:
        tok = gpt2()
    elif hub:
        tok = load(hub[0])
    else:
        raise ValueError(f"no tokenizer found for {model} (vocabulary of {vocab_size}, not GPT-2's {GPT2_VOCAB}): "
                         f"give --tokenizer DIR")
    if tok.vocab_size > vocab_size:           # a vocabulary padded beyond the tokenizer (GPT-2's x64) is fine
        raise ValueError(f"the tokenizer {tok.name} has {tok.vocab_size} ids, more than the model's vocabulary "
                         f"of {vocab_size}: it is not this model's tokenizer")
    eots = config_eots(model, vocab_size)
    if eots and tok.eot not in eots:
        raise ValueError(f"the tokenizer {tok.name} ends text with id {tok.eot}, the model {model} with "
                         f"{eots[0] if len(eots) == 1 else eots}: it is not this model's tokenizer")
    return tok


def hf_tokenizer(tok, block_size=None):
    """A transformers tokenizer for an export: the one loaded, or for tiktoken's GPT-2 encoding the
    same BPE converted (transformers' TikTokenConverter on its ranks; ids checked equal)."""
    if tok.hf is not None:
        return tok.hf
    from transformers import GPT2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    enc = tok.tiktoken
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "gpt2.tiktoken")
        with open(path, "w") as f:
            for i in range(enc.eot_token):
                f.write(f"{base64.b64encode(enc.decode_single_token_bytes(i)).decode()} {i}\n")
        backend = TikTokenConverter(vocab_file=path, pattern=GPT2_PATTERN,
                                    extra_special_tokens=["<|endoftext|>"]).converted()
    out = GPT2TokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", model_max_length=block_size or 1024)
    return out


def save(tok, out_dir, block_size=None):
    """Write the tokenizer's Hugging Face files into out_dir, then load them back and check that they
    give the same ids (the fingerprint) and decode the probe text back to itself. The files pad on
    the left, with end-of-text when the tokenizer has no pad token of its own."""
    out = copy.deepcopy(hf_tokenizer(tok, block_size))
    # ready for batched generation: a decoder pads on the left, and GPT-2 has no pad token, so the
    # end-of-text token pads (attention_mask hides it); neither changes an id
    if out.pad_token is None and out.eos_token is not None:
        out.pad_token = out.eos_token
    out.padding_side = "left"
    out.save_pretrained(out_dir)
    back = load(out_dir)
    if back.fingerprint() != tok.fingerprint() or back.decode(back.encode(PROBE)) != PROBE:
        raise ValueError(f"the tokenizer written to {out_dir} does not reproduce {tok.name}'s ids")
    return back


# -----------------------------------------------------------------------------
# token files: nanoGPT's flat memmaps, with the meta.json that data/owt/prepare.py writes beside them


def token_dtype(vocab_size):
    """uint16 when every id fits (nanoGPT's format), else uint32."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def read_meta(path):
    """The meta.json beside a token file, or {} (nanoGPT's own prepare.py writes none: GPT-2, uint16).
    Older files name their tokenizer only as "tiktoken gpt2"."""
    folder = os.path.dirname(os.path.abspath(path))
    atomic.finish_files(folder, "meta.json")          # a prepare.py commit cut short by a kill
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        return {}
    with open(meta_path) as f:
        meta = json.load(f)
    if isinstance(meta.get("tokenizer"), str):
        meta["tokenizer"] = dict(name=GPT2, vocab_size=GPT2_VOCAB, eot=GPT2_EOT)
    return meta


def token_file(path):
    """A token file as a read-only memmap of the dtype its meta.json records (uint16 without one)."""
    name = read_meta(path).get("dtype", "uint16")
    if name not in ("uint16", "uint32"):
        raise ValueError(f"the meta.json beside {path} gives the dtype {name}; token files are uint16 or uint32")
    dtype = np.dtype(name)
    recorded = read_meta(path).get("bytes", {}).get(os.path.basename(path))
    if recorded is not None and recorded != os.path.getsize(path):
        raise ValueError(f"{path} is {os.path.getsize(path):,} bytes, but the meta.json written with it says "
                         f"{recorded:,}: the file was replaced after prepare.py wrote it; prepare the data again")
    if os.path.getsize(path) % dtype.itemsize:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes, not a whole number of {dtype.name} ids: "
                         f"not a token file of the dtype its meta.json records")
    return np.memmap(path, dtype=dtype, mode="r")


def gpt2_fingerprint():
    """GPT-2's fingerprint, or None where tiktoken cannot load it."""
    try:
        return gpt2().fingerprint()
    except ValueError:
        return None


def check_tokens(path, data, vocab_size, tok=None):
    """Refuse a token file made by another tokenizer than tok (by fingerprint, when both are known)
    or holding ids the model has no embedding for."""
    meta = read_meta(path)
    made = meta.get("tokenizer") or {}
    if tok is not None and made:
        theirs = made.get("fingerprint") or (gpt2_fingerprint() if made.get("name") == GPT2 else None)
        if theirs is not None and theirs != tok.fingerprint():
            raise ValueError(f"{path} was made by the tokenizer {made.get('name')} ({made.get('vocab_size')} ids), "
                             f"not by {tok.name} ({tok.vocab_size} ids), the model's: prepare the data again with "
                             f"`python data/owt/prepare.py --tokenizer {tok.name}`")
    top = meta.get("max_id")
    if top is None:
        top = int(max((int(data[i:i + 2 ** 24].max()) for i in range(0, len(data), 2 ** 24)), default=0))
    if top >= vocab_size:
        raise ValueError(f"{path} holds ids up to {top} (tokenizer {made.get('name', 'unknown')}), beyond the "
                         f"model's vocabulary of {vocab_size}: it was not made by the model's tokenizer")
