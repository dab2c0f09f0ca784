"""Generation as it is deployed: the KV cache, left-padded batches, and the compact export through
transformers (generate, pipeline) against the dense export of the same student."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import checkpoint
import krony_hf
import compress
import tokenizer
from model import GPT, GPTConfig, KVCache


def small_student(factored):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=24, vocab_size=80))
    if factored:
        for name, (m1, n1) in {"wte": (20, 8), "h.0.attn.c_attn": (48, 8), "h.1.mlp.c_fc": (32, 16)}.items():
            m.factor(name, m1, n1, r=2)
    return m.eval()


@pytest.mark.parametrize("factored", [False, True])
def test_cache_equals_recomputation(factored):
    m = small_student(factored)
    idx = torch.randint(0, 80, (3, 20))
    with torch.no_grad():
        full = m(idx).logits
        cache = KVCache()
        steps = [m(idx[:, :9], cache=cache).logits] + [m(idx[:, t:t + 1], cache=cache).logits for t in range(9, 20)]
        assert cache.get_seq_length() == 20
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        cache = KVCache()                   # chunks of several tokens after a prefix: the causal mask is offset
        steps = [m(idx[:, a:b], cache=cache).logits for a, b in ((0, 5), (5, 13), (13, 20))]
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        with pytest.raises(ValueError, match="exceeds block_size"):
            m(idx[:, :5], cache=cache)


@pytest.mark.parametrize("factored", [False, True])
def test_left_padding_changes_nothing_for_the_tokens(factored):
    m = small_student(factored)
    idx = torch.randint(0, 80, (3, 16))
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    mask[2, :11] = 0
    with torch.no_grad():
        padded = m(idx, mask=mask).logits
        assert torch.isfinite(padded).all()
        for b in range(3):
            start = int((mask[b] == 0).sum())
            alone = m(idx[b:b + 1, start:]).logits[0]
            assert (padded[b, start:] - alone).abs().max() < 1e-5
        cache = KVCache()                   # and incrementally, the mask growing with the sequence
        steps = [m(idx[:, :10], cache=cache, mask=mask[:, :10]).logits]
        steps += [m(idx[:, t:t + 1], cache=cache, mask=mask[:, :t + 1]).logits for t in range(10, 16)]
        real = mask.bool()
        assert (torch.cat(steps, 1) - padded)[real].abs().max() < 1e-5


def test_generate_with_the_cache_equals_rerunning_the_prefix():
    """Past block_size too, where each step reruns the last block_size tokens."""
    m = small_student(True)
    prompt = torch.randint(0, 80, (2, 6))
    out = m.generate(prompt, 30, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(30):
            nxt = m(ids[:, -m.config.block_size:]).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, nxt), 1)
    assert out.shape == (2, 36) and torch.equal(out, ids)


@pytest.fixture(scope="module")
def exports(teacher_dir, tokenizer_dir, tmp_path_factory):
    """The reference teacher compressed by the krony-81m preset, exported both ways with GPT-2's
    tokenizer."""
    m, hf_cfg = GPT.from_pretrained(teacher_dir)
    plan = compress.resolve_spec(compress.PRESETS["krony-81m"], m.config)
    compress.decompose(m, plan, progress=False)
    out = tmp_path_factory.mktemp("exports")
    tok = tokenizer.load(tokenizer_dir)
    checkpoint.export_compact(m, out / "compact", checkpoint.student_config(m, plan, hf_cfg), tok)
    checkpoint.export_dense(m, out / "dense", hf_cfg, tok)
    krony_hf.register_with_transformers()
    return m.eval(), out


def padded_batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :8] = 0
    return ids.masked_fill(mask == 0, 50256), mask


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(do_sample=True, top_k=40, temperature=0.8)])
def test_padded_generate_compact_equals_dense(exports, kw):
    _, out = exports
    ids, mask = padded_batch(1000)
    got = []
    for path in (out / "compact", out / "dense"):
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(7)
        got.append(hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=50256, **kw))
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert got[0].shape == (3, 21) and torch.equal(got[0], got[1])


def test_compact_wrapper_contract(exports):
    m, out = exports
    hf = AutoModelForCausalLM.from_pretrained(out / "compact").eval()
    emb = hf.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3, 50256]])
    assert emb.weight.shape == (50257, 128)
    assert torch.allclose(emb(ids), m.embed(ids)) and torch.allclose(emb.weight[ids], m.embed(ids), atol=1e-6)
    res = hf(ids, use_cache=True)
    assert res.past_key_values.get_seq_length() == 4
    nxt = hf(torch.tensor([[5]]), past_key_values=res.past_key_values)
    assert (nxt.logits[0, -1] - m(torch.tensor([[1, 2, 3, 50256, 5]])).logits[0, -1]).abs().max() < 1e-4
    fresh = AutoModelForCausalLM.from_config(hf.config)          # GPT-2's init, factors included
    kron = [mod for mod in fresh.modules() if type(mod).__name__ == "KronLinear"]
    for f in ("A", "B"):      # KronLinear.reset_parameters: factor entries of std (0.02^2 / r)^(1/4), pooled
        entries = torch.cat([(getattr(k, f) / (0.02 ** 2 / k.r) ** 0.25).flatten() for k in kron])
        assert entries.numel() > 30 and 0.7 < float(entries.std()) < 1.3, (f, float(entries.std()))
    assert torch.isfinite(fresh(ids).logits).all()


def test_compact_with_a_missing_tensor_is_refused(exports, tmp_path):
    _, out = exports
    import shutil
    shutil.copytree(out / "compact", tmp_path / "c")
    sd = load_file(str(tmp_path / "c" / "model.safetensors"))
    sd.pop(next(k for k in sd if k.endswith("mlp.c_fc.B")))
    save_file(sd, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("which", ["compact", "dense"])
def test_text_generation_pipeline(exports, which):
    from transformers import pipeline
    m, out = exports
    pipe = pipeline("text-generation", model=str(out / which))
    text = "The city council met on Tuesday"
    res = pipe([text, "Hello"], max_new_tokens=8, do_sample=False, batch_size=2)
    tok = tokenizer.load(str(out / which))
    ids = torch.tensor([tok.encode(text)])
    want = m.generate(ids, 8, temperature=0)
    assert res[0][0]["generated_text"] == tok.decode(want[0].tolist())
