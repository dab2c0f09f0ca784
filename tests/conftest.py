import os
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the tests never use the Hugging Face hub: a lookup (a tokenizer by hub name) must fail fast, not retry
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("KRONY_SHARED", ROOT.parent / "shared"))
TEACHER = SHARED / "teacher" / "owt-mini-gpt2"
# GPT-2's BPE offline (tiktoken reads its files from this cache, never the network)
if (SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"))


@pytest.fixture
def teacher_state():
    """The reference teacher's tensors (safetensors), or a skip that says why."""
    path = TEACHER / "model.safetensors"
    if not path.exists():
        pytest.skip(f"reference teacher not found at {path} (set KRONY_SHARED to the shared/ folder)")
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="session")
def teacher_dir():
    """The reference teacher's Hugging Face directory, or a skip that says why."""
    if not (TEACHER / "model.safetensors").exists():
        pytest.skip(f"reference teacher not found at {TEACHER} (set KRONY_SHARED to the shared/ folder)")
    return str(TEACHER)


@pytest.fixture(scope="session")
def tokenizer_dir():
    path = SHARED / "data" / "gpt2_tokenizer" / "hf"
    if not (path / "vocab.json").exists():
        pytest.skip(f"GPT-2 tokenizer files not found at {path} (set KRONY_SHARED to the shared/ folder)")
    return str(path)


def tiny_gpt2_config(**kw):
    """A GPT-2 config small enough for every preset's shapes (n_embd 24 divides by 2, 3, 4)."""
    from transformers import GPT2Config
    d = dict(n_layer=2, n_head=2, n_embd=24, n_positions=32, vocab_size=96)
    d.update(kw)
    return GPT2Config(**d)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny GPT2LMHeadModel saved as a Hugging Face directory (no hub)."""
    import torch
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(tiny_gpt2_config()).save_pretrained(path)
    return str(path)


def ctrl_c_at(train, at, signum=signal.SIGINT, micro=0):
    """train.get_batch that sends this process a real Ctrl-C (or `signum`) when micro-batch `micro`
    of iteration `at` is drawn, in the middle of that step."""
    real = train.get_batch

    def get_batch(data, block_size, batch_size, seed, it, m, device):
        if it == at and m == micro:
            os.kill(os.getpid(), signum)
        return real(data, block_size, batch_size, seed, it, m, device)
    return get_batch


def assert_same_runs(one, two):
    """Two train.py runs (e.g. one process and two DDP ranks) logged the same losses to 1e-4 and
    saved the same weights to 1e-4 relative. Returns the second run's checkpoint metadata."""
    import json
    import torch
    import checkpoint
    a, b = ([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (one, two))
    assert [m["iter"] for m in a] == [m["iter"] for m in b]                # rank 0 alone wrote metrics
    for x, y in zip(a, b):
        for k in ("loss", "val_loss", "train_loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-4), (x["iter"], k)
    sa, _ = checkpoint.load_student(os.path.join(one, "ckpt"))
    sb, meta = checkpoint.load_student(os.path.join(two, "ckpt"))
    for (k, x), (_, y) in zip(sa.state_dict().items(), sb.state_dict().items()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), k
    return meta


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny LlamaForCausalLM (2 blocks, hidden 24, SwiGLU 64, 2 heads, 1 key-value head,
    vocabulary 96, tied) saved as a Hugging Face directory: every Llama preset's shapes tile it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=96, max_position_embeddings=32,
                                 tie_word_embeddings=True)).save_pretrained(path)
    return str(path)


def pytest_addoption(parser):
    parser.addoption("--scale", action="store_true",
                     help="also run the tests marked scale: the larger families' real shapes through every command "
                          "line, tens of minutes each on 2 CPU cores (make scale)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--scale"):
        return
    skip = pytest.mark.skip(reason="a walk at real shapes: run with --scale (make scale)")
    for item in items:
        if "scale" in item.keywords:
            item.add_marker(skip)
