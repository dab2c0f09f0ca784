"""The GPT module: equal to transformers' GPT2LMHeadModel, factored matrices anywhere, exact exports."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import checkpoint
import krony_hf
import compress
import kron
import model
from conftest import tiny_gpt2_config
from model import GPT, GPTConfig, KronLinear


def logits_of(m, idx):
    with torch.no_grad():
        out = m(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def probe(vocab=96, T=20, seed=0):
    return torch.randint(0, vocab, (3, T), generator=torch.Generator().manual_seed(seed))


def test_from_pretrained_equals_transformers_tiny(tiny_hf_dir):
    m, hf_cfg = GPT.from_pretrained(tiny_hf_dir)
    ref = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    idx = probe()
    assert (logits_of(m.eval(), idx) - logits_of(ref, idx)).abs().max() < 1e-4
    assert m.config.n_embd == 24 and m.config.block_size == 32 and hf_cfg["vocab_size"] == 96


def test_from_pretrained_equals_transformers_teacher(teacher_dir):
    m, _ = GPT.from_pretrained(teacher_dir)
    ref = GPT2LMHeadModel.from_pretrained(teacher_dir).eval()
    idx = probe(50257, 256)
    assert (logits_of(m.eval(), idx) - logits_of(ref, idx)).abs().max() < 1e-4
    assert model.count_params(m) == model.count_params(ref) | {"bytes": model.count_params(m)["bytes"]}


def test_config_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPTConfig.from_hf(tiny_gpt2_config(scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported: GPT-2 .* or the Llama family"):
        GPTConfig.from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match="block_size must be a positive integer, got None"):
        GPTConfig.from_hf({"model_type": "llama"})                 # a Llama config without its sizes
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layer": 2, "n_layers": 3})
    with pytest.raises(ValueError, match="nothing-here: no such folder"):
        GPT.from_pretrained(str(tmp_path / "nothing-here"))


def test_a_damaged_teacher_is_refused_in_one_line(tiny_hf_dir, tmp_path):
    """Truncated weights, a tensor of another shape, and a config.json without n_layer (transformers
    then assumes 12 layers and fills 10 of them with random weights, with only a warning)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    cases = {}
    for name in ("cut", "reshaped", "no_n_layer"):
        cases[name] = tmp_path / name
        shutil.copytree(tiny_hf_dir, cases[name])
    open(cases["cut"] / "model.safetensors", "r+b").truncate(5000)
    sd = load_file(cases["reshaped"] / "model.safetensors")
    k = next(k for k in sd if k.endswith("mlp.c_fc.weight"))
    sd[k] = sd[k][:, :8].contiguous()
    save_file(sd, cases["reshaped"] / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((cases["no_n_layer"] / "config.json").read_text())
    assert cfg.pop("n_layer") != 12
    (cases["no_n_layer"] / "config.json").write_text(json.dumps(cfg))
    for name, message in (("cut", "weights are damaged"), ("reshaped", "tensors of other shapes"),
                          ("no_n_layer", "gives n_layer 12, its weights have 2; config.json does not set n_layer")):
        with pytest.raises(ValueError, match=message) as e:
            GPT.from_pretrained(str(cases[name]))
        assert "\n" not in str(e.value)


def test_split_qkv_and_factored_attention_are_exact(tiny_hf_dir):
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    m.eval()
    idx = probe()
    ref = logits_of(m, idx)
    m.transformer.h[0].attn.split_qkv()
    assert (logits_of(m, idx) - ref).abs().max() < 1e-5
    m.factor("h.1.attn.k", 12, 12, r=4, init="vl")       # 24x24 with B 2x2: r = 4 is the full Kronecker rank
    assert (logits_of(m, idx) - ref).abs().max() < 1e-4
    assert m.transformer.h[1].attn.c_attn is None and isinstance(m.transformer.h[1].attn.k, KronLinear)


def test_factored_embedding_stays_tied(tiny_hf_dir):
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    before = model.count_params(m)
    wte = m.factor("wte", 48, 6, r=2, init="vl")
    after = model.count_params(m)
    # one factored matrix both embeds and predicts: the dense table is gone from both places
    assert after["hf"] == before["hf"] - 96 * 24 + wte.A.numel() + wte.B.numel()
    names = dict(m.named_parameters())
    assert "transformer.wte.weight" not in names and "transformer.wte.A" in names
    idx = probe()
    W = wte.dense_weight()
    assert torch.allclose(m.embed(idx), W[idx], atol=1e-6)
    x = torch.randn(2, 5, 24)
    assert torch.allclose(m.transformer.wte(x), F.linear(x, W), atol=1e-5)


def test_fold_mlp_permutations_is_exact(tiny_hf_dir):
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    m.eval()
    torch.manual_seed(3)
    m.factor("h.0.mlp.c_fc", 24, 12, r=2, init="perm", kicks=0)
    m.factor("h.1.mlp.c_fc", 24, 12, r=2, init="perm", kicks=0)
    m.factor("h.1.mlp.c_proj", 12, 24, r=2, init="perm", kicks=0)
    for i in (0, 1):                             # make sure there is something to fold
        fc = m.transformer.h[i].mlp.c_fc
        fc.set_permutations(torch.randperm(96), fc.cols)
    idx = probe()
    ref = logits_of(m, idx)
    m.fold_mlp_permutations()
    assert all(blk.mlp.c_fc.rows is None for blk in m.transformer.h)
    assert (logits_of(m, idx) - ref).abs().max() < 1e-5


def test_check_compatible():
    a = GPTConfig(n_layer=2, n_head=2, n_embd=24, n_inner=96, vocab_size=96, block_size=32)
    model.check_compatible(a, GPTConfig(n_layer=4, n_head=4, n_embd=24, n_inner=48, vocab_size=96, block_size=64))
    with pytest.raises(ValueError, match="vocab_size"):
        model.check_compatible(a, GPTConfig(n_layer=2, n_head=2, n_embd=24, n_inner=96, vocab_size=97, block_size=32))
    with pytest.raises(ValueError, match="n_embd"):
        model.check_compatible(a, GPTConfig(n_layer=2, n_head=2, n_embd=32, n_inner=96, vocab_size=96, block_size=32))


@pytest.mark.parametrize("preset", list(compress.PRESETS))
def test_preset_round_trip_hf_gpt_hf(preset, request, tmp_path):
    """HF -> GPT -> factored by the preset -> dense HF export and compact export: the same logits
    (the Llama family's presets on a tiny LlamaForCausalLM)."""
    family = compress.PRESETS[preset]["models"]
    m, hf_cfg = GPT.from_pretrained(request.getfixturevalue("tiny_llama_dir" if family == "llama" else "tiny_hf_dir"))
    plan = compress.resolve_spec(compress.PRESETS[preset], m.config)
    compress.decompose(m, plan, progress=False)
    m.eval()
    idx = probe()
    ref = logits_of(m, idx)
    checkpoint.export_dense(m, tmp_path / "dense", hf_cfg)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert (logits_of(hf, idx) - ref).abs().max() < 1e-4
    cfg = checkpoint.student_config(m, plan, hf_cfg)
    checkpoint.export_compact(m, tmp_path / "compact", cfg)
    back, _ = checkpoint.load_student(tmp_path / "compact")
    assert (logits_of(back.eval(), idx) - ref).abs().max() < 1e-6
    krony_hf.register_with_transformers()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert (logits_of(auto, idx) - ref).abs().max() < 1e-6
    assert model.count_params(auto)["hf"] == model.count_params(m)["hf"]
    # compact equals dense, and is the smaller of the two on disk
    assert (logits_of(hf, idx) - logits_of(back.eval(), idx)).abs().max() < 1e-4
    assert checkpoint.dir_size(tmp_path / "compact") < checkpoint.dir_size(tmp_path / "dense")


def test_compact_generate_through_transformers(tiny_hf_dir, tmp_path):
    m, hf_cfg = GPT.from_pretrained(tiny_hf_dir)
    plan = compress.resolve_spec(compress.PRESETS["krony-81m"], m.config)
    compress.decompose(m, plan, progress=False)
    checkpoint.export_compact(m, tmp_path / "c", checkpoint.student_config(m, plan, hf_cfg))
    krony_hf.register_with_transformers()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    prompt = probe(T=5)[:1]
    out = auto.generate(prompt, max_new_tokens=6, do_sample=False)
    # greedy decoding by hand with the project's own model gives the same tokens
    ids = prompt
    for _ in range(6):
        nxt = logits_of(m.eval(), ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("kw", [dict(n_layer=3, n_embd=32, n_head=4),                 # distilgpt2-like depth
                                dict(n_layer=1, n_embd=40, n_head=5, n_inner=72),      # an explicit n_inner
                                dict(n_layer=2, n_embd=24, n_head=3, activation_function="gelu"),
                                dict(n_layer=2, n_embd=24, n_head=2, layer_norm_epsilon=1e-3, n_positions=48)])
def test_any_gpt2_family_config(kw, tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config(**kw)).eval()
    hf.save_pretrained(tmp_path)
    m, _ = GPT.from_pretrained(str(tmp_path))
    idx = probe(T=16)
    assert (logits_of(m.eval(), idx) - logits_of(hf, idx)).abs().max() < 1e-4
    assert m.config.n_inner == (kw.get("n_inner") or 4 * kw["n_embd"])
    assert model.count_params(m)["hf"] == hf.num_parameters()


def test_keep_layers_is_the_teacher_minus_the_dropped_blocks(tiny_hf_dir):
    """DistilGPT2's init: the shallower model computes exactly the teacher's embeddings, the kept
    blocks in order and the final norm and head."""
    t, _ = GPT.from_pretrained(tiny_hf_dir)
    s = t.keep_layers([1])
    assert s.config.n_layer == 1 and t.config.n_layer == 2
    idx = torch.randint(0, t.config.vocab_size, (2, 7))
    with torch.no_grad():
        x = t.embed(idx) + t.transformer.wpe(torch.arange(7))
        x = t.transformer.h[1](x)
        want = t.transformer.wte(t.transformer.ln_f(x))
        got = s(idx)[0]
    assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():                            # copies: training the student leaves the teacher alone
        s.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    assert not torch.equal(s.transformer.h[0].mlp.c_fc.weight, t.transformer.h[1].mlp.c_fc.weight)
    for bad in ([], [2], [0, 0], [True]):
        with pytest.raises(ValueError, match="distinct block indices"):
            t.keep_layers(bad)


def test_logits_are_float32_under_bf16_autocast(tiny_hf_dir):
    """Under autocast the matmuls of the blocks run in bfloat16, but the output head runs in float32:
    GPT-2's logits are large and negative, and in bfloat16 they would be off by up to ~0.25."""
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    m.eval().factor("wte", 96, 12, r=2)                          # a factored head too
    idx = probe()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(idx, return_hidden=True)
    assert out.logits.dtype == torch.float32 and out.hidden[-1].dtype == torch.float32
    with torch.no_grad():
        want = F.linear(m.transformer.ln_f(out.hidden[-1]), m.transformer.wte.dense_weight())
    assert torch.allclose(out.logits, want, rtol=1e-5, atol=1e-5)


def test_teacher_perplexity_under_bf16_autocast_is_within_half_a_percent(teacher_dir):
    import numpy as np
    import scoring
    from conftest import SHARED
    path = SHARED / "data" / "openwebtext" / "owt10k_val_karpathy-nanoGPT-263b800d.bin"
    if not path.exists():
        pytest.skip(f"{path} not found (set KRONY_SHARED to the shared/ folder)")
    ids = torch.from_numpy(np.fromfile(path, dtype=np.uint16)[:8 * 257].astype(np.int64)).view(8, 257)
    m, _ = GPT.from_pretrained(teacher_dir)
    m.eval()
    ppl = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits = scoring.make_forward(m, "cpu", dtype)(ids[:, :-1])
        assert logits.dtype == torch.float32
        ppl[dtype] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp().item()
    assert abs(ppl[torch.bfloat16] / ppl[torch.float32] - 1) < 0.005, ppl


def test_flops_count_the_factored_multiply_adds():
    """nanoGPT's 6N + 12 L C T per token for a training step, with N the matrices' multiply-adds: a
    dense GPT-2 small counts every weight of its matrices (the tied head once); a factored matrix
    counts its factored product in the order it computes."""
    cfg = GPTConfig()
    m = GPT(cfg)
    mats = cfg.vocab_size * cfg.n_embd + cfg.n_layer * (3 * 768 * 768 + 768 * 768 + 2 * 768 * 3072)
    assert m.flops_per_token(1024) == 6 * mats + 12 * cfg.n_layer * cfg.n_embd * 1024
    assert m.flops_per_token(1024, train=False) == m.flops_per_token(1024) // 3
    layer = m.factor("h.0.mlp.c_fc", 768, 768, r=1)                   # Krony-PT's 81M c_fc: B 4 x 1
    b_first, a_first = kron.kron_macs(768, 768, 4, 1, 1)
    layer.impl = "b"
    assert m.flops_per_token(1024) == 6 * (mats - 768 * 3072 + b_first) + 12 * cfg.n_layer * cfg.n_embd * 1024
    layer.impl = "dense"
    assert m.flops_per_token(1024) == 6 * mats + 12 * cfg.n_layer * cfg.n_embd * 1024
