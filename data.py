"""
Token files and batches: the uint16/uint32 id memmaps prepare.py writes (train.bin, val.bin), checked
against the tokenizer of the model they feed, and the random windows training draws from them.
"""

import os

import numpy as np
import torch

import tokenizer


class DataError(ValueError):
    """A token file that is missing, too short, or not the model's tokenizer's."""


def load_tokens(dataset, split):
    """The ids of dataset/split.bin as a read-only memmap (tokenizer.token_file checks meta.json)."""
    path = os.path.join(dataset, f"{split}.bin")
    if not os.path.exists(path):
        raise DataError(f"{path} not found; create it with `python data/owt/prepare.py --out {dataset}` "
                        f"(offline: add --input ../shared/data/openwebtext/owt10k_sample_docs.jsonl.xz)")
    return tokenizer.token_file(path)


def check_data(dataset, data, vocab_size, model_src, log):
    """The token files must be the teacher's tokenizer's (model_src: the teacher, or the student
    checkpoint that names it) and hold no id beyond the vocabulary."""
    paths = [os.path.join(dataset, f"{split}.bin") for split in ("train", "val")]
    tok = None
    if any(tokenizer.read_meta(p).get("tokenizer") for p in paths):     # else nothing to compare with
        try:
            tok = tokenizer.for_model(model_src, vocab_size)
        except ValueError as e:
            log(f"note: the teacher's tokenizer could not be loaded ({e}); only the token ids' range is checked")
    for path, d in zip(paths, data):
        tokenizer.check_tokens(path, d, vocab_size, tok)


def get_batch(data, block_size, batch_size, seed, it, micro, device):
    """batch_size random windows (x, y = x shifted by one) of block_size tokens. The draw depends on
    (seed, it, micro) only, so a resumed run or another rank count sees the same batches."""
    if len(data) <= block_size + 1:
        raise DataError(f"a token file of {len(data)} tokens is too short for block_size {block_size}")
    g = torch.Generator().manual_seed(hash((seed, it, micro)) & 0x7FFFFFFFFFFFFFFF)
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def calibration_windows(tokens, T, n_tokens, batch_size, seed):
    """Batches of windows (B, T) int64 that cover n_tokens tokens of `tokens` (ceil(n_tokens / T)
    windows at seeded random offsets): what calibration statistics are measured on."""
    if len(tokens) <= T:
        raise DataError(f"calibration needs more than {T} tokens, the token file has {len(tokens)}")
    n_seq = -(-n_tokens // T)
    starts = np.random.default_rng(seed).integers(0, len(tokens) - T, size=n_seq)
    for i in range(0, n_seq, batch_size):
        yield np.stack([np.asarray(tokens[s:s + T], dtype=np.int64) for s in starts[i:i + batch_size]])
