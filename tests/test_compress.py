"""Specs, presets and their published parameter counts, the budget solver, decomposition reports."""
import dataclasses
import json

import numpy as np

import pytest
import torch
from transformers import GPT2Config

import compress
import kron
import model
from conftest import tiny_gpt2_config
from kron_decompose import krony_spec
from model import GPT, GPTConfig

GPT2_SMALL = GPTConfig.from_hf(GPT2Config())       # 124M shapes, random weights, no download


def counts_of(spec, config=GPT2_SMALL):
    return model.count_params(compress.build_student(config, compress.resolve_spec(spec, config)))


def test_dense_gpt2_small_count():
    c = model.count_params(GPT(GPT2_SMALL))
    assert c["hf"] == 124_439_808 and c["nanogpt"] == 124_439_808 - 1024 * 768
    assert c["components"]["wte (tied head)"] == 50257 * 768


# (preset, counting convention, exact figure) -- background arithmetic of the published models
PUBLISHED = [
    ("krony-81m", "hf", 81_972_576),         # Krony-PT 81M, counted as Hugging Face counts
    ("krony-81m", "nanogpt", 81_186_144),    # the same model as nanoGPT prints it
    ("krony-96m", "hf", 96_128_304),         # Krony-PT 96M (their README's 95M omits wpe)
    ("krony-96m", "nanogpt", 95_341_872),
    ("krony-80m-2", "hf", 67_816_704 + 24 * 2 * (1024 * 256 + 9)),
    ("krony-92m-4", "hf", 67_816_704 + 24 * 4 * (1024 * 256 + 9) + 24 * 4),   # + per-term scalars
    ("tq-like", "hf", 119_933_764 - 50257 * 768),   # TQCompressedGPT-2 minus its untied dense head
]


@pytest.mark.parametrize("preset,convention,figure", PUBLISHED)
def test_preset_counts_equal_published_figures(preset, convention, figure):
    assert counts_of(compress.PRESETS[preset])[convention] == figure


@pytest.mark.parametrize("preset,convention,millions", [
    ("krony-81m", "nanogpt", 81), ("krony-96m", "hf", 96), ("krony-80m-2", "nanogpt", 80),
    ("krony-92m-4", "nanogpt", 92), ("tq-like", "hf", 81), ("kngpt2-like", "nanogpt", 83)])
def test_preset_counts_round_to_the_printed_names(preset, convention, millions):
    assert round(counts_of(compress.PRESETS[preset])[convention] / 1e6) == millions


def test_tq_like_keeps_the_tie_that_tqcompressor_dropped():
    c = counts_of(compress.PRESETS["tq-like"])
    # TQCompressedGPT-2's 119,933,764 = this model + a dense untied 50257x768 head
    assert c["hf"] + 50257 * 768 == 119_933_764
    assert "lm_head (untied)" not in c["components"]


def test_kronypt_positional_form_is_the_preset():
    for dims, preset in (((768, 768, 1), "krony-81m"), ((384, 3072, 1), "krony-96m")):
        a = compress.resolve_spec(krony_spec(*dims), GPT2_SMALL)
        b = compress.resolve_spec(compress.PRESETS[preset], GPT2_SMALL)
        assert a == b
    # c_fc in Conv1D orientation (768 x 3072) has first factor 384 x 3072, i.e. (3072, 384) here
    assert compress.resolve_spec(krony_spec(384, 3072, 1), GPT2_SMALL)["h.0.mlp.c_fc"].m1 == 3072


def test_spec_layers_and_split_attention():
    spec = {"rules": [{"kinds": ["attn.q", "attn.v"], "layers": [0, 2], "b": [2, 2], "r": 2},
                      {"kinds": "mlp.c_fc", "layers": "even", "a": [64, 32]},
                      {"kinds": ["mlp.c_proj"], "layers": "odd", "b": [1, 8], "init": "prune"}]}
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=64, n_inner=256, vocab_size=100, block_size=16)
    plan = compress.resolve_spec(spec, cfg)
    assert list(plan) == ["h.0.attn.q", "h.0.attn.v", "h.0.mlp.c_fc", "h.1.mlp.c_proj", "h.2.attn.q",
                          "h.2.attn.v", "h.2.mlp.c_fc", "h.3.mlp.c_proj"]
    assert plan["h.0.attn.q"] == compress.MatrixPlan(m1=32, n1=32, r=2, init="vl", scales=False)
    assert plan["h.3.mlp.c_proj"].init == "prune" and plan["h.3.mlp.c_proj"].n1 == 32
    assert all(e.init == "perm" for e in compress.resolve_spec(spec, cfg, init="perm").values())


@pytest.mark.parametrize("spec,message", [
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1], "rank": 2}]}, "unknown keys"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1], "a": [192, 768]}]}, "exactly one of"),
    ({"rules": [{"kinds": ["mlp.fc"], "b": [4, 1]}]}, "kinds must be"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1], "layers": [12]}]}, "out of range"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [5, 1]}]}, "does not tile"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "a": [1000, 768]}]}, "mlp.c_fc"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1]}, {"kinds": ["mlp.c_fc"], "b": [2, 1], "layers": [3]}]},
     "already factored"),
    ({"rules": [{"kinds": ["attn.c_attn"], "b": [3, 1]}, {"kinds": ["attn.q"], "b": [2, 1]}]}, "cannot both"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1], "init": "svd"}]}, "init must be"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1], "r": 0}]}, "positive integer"),
    ({"rules": [{"kinds": ["mlp.c_fc"], "a": [768, 768], "r": 100000}]}, "exceeds the Kronecker rank ceiling .* = 4 "),
    ({"rules": []}, "non-empty"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        compress.resolve_spec(spec, GPT2_SMALL)


def test_load_spec(tmp_path):
    assert compress.load_spec("krony-81m") is compress.PRESETS["krony-81m"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"rules": [{"kinds": ["mlp.c_fc"], "b": [4, 1]}]}))
    assert compress.load_spec(str(p))["rules"][0]["b"] == [4, 1]
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        compress.load_spec(str(p))
    with pytest.raises(ValueError, match="neither a preset"):
        compress.load_spec(str(tmp_path / "missing.json"))


def test_decompose_report_errors_are_the_measured_ones(tiny_hf_dir):
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    dense = {n: m.get_matrix(n).weight.detach().clone() for n in m.matrix_names()}
    plan = compress.resolve_spec({"rules": [{"kinds": ["mlp.c_fc", "mlp.c_proj"], "b": [4, 2], "r": 2}]}, m.config)
    rows = compress.decompose(m, plan, progress=False)
    for row in rows:
        W, (m1, n1) = dense[row["name"]], row["a"]
        tail = kron.kron_tail_energy(W, m1, n1, row["r"])
        assert row["errors"]["vl"] == pytest.approx(tail ** 0.5 / W.norm().item(), rel=1e-5)
        assert row["params"] == row["r"] * (m1 * n1 + row["b"][0] * row["b"][1]) + W.shape[0]   # + bias
        assert set(row["errors"]) == {"vl", "prune"}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config(n_layer=3))
    return GPT.from_hf_state_dict(hf.state_dict(), GPTConfig.from_hf(hf.config))


@pytest.mark.parametrize("objective", compress.OBJECTIVES)
def test_budget_never_exceeds_target_and_lands_close(tiny_model, objective):
    import copy
    base = model.count_params(tiny_model)["hf"]
    matrices = sum(tiny_model.get_matrix(n).weight.numel() for n in tiny_model.matrix_names())
    tokens = np.random.default_rng(0).integers(0, tiny_model.config.vocab_size, 2048).astype(np.uint16)
    covs = compress.calibrate(tiny_model, tokens, tiny_model.matrix_names(), n_tokens=256, progress=False)
    for frac in (0.05, 0.2, 0.4, 0.6):
        target = base - int(frac * matrices)
        m = copy.deepcopy(tiny_model)
        plan = compress.solve_budget(m, target, objective=objective, progress=False, log=lambda *a: None,
                                     covs=covs)
        for name, e in plan.items():
            m.factor(name, e.m1, e.n1, e.r, init="random")
        got = model.count_params(m)["hf"]
        assert got <= target, (frac, got, target)
        # a matrix can only shrink by 1.5x or more, and this model has 13 of them: coarse steps
        assert target - got < 0.06 * base, (frac, got, target)


def test_budget_choice_is_optimal_on_a_small_instance():
    """Two matrices, every combination enumerated: the solver's total tail energy is the optimum."""
    import itertools
    torch.manual_seed(1)
    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, n_inner=32, vocab_size=10, block_size=4))
    with torch.no_grad():                   # a matrix with Kronecker structure plus noise
        m.transformer.h[0].mlp.c_fc.weight.copy_(torch.kron(torch.randn(8, 4), torch.randn(4, 2)) + 0.1 * torch.randn(32, 8))
    base = model.count_params(m)["hf"]
    kinds = ("mlp.c_fc", "mlp.c_proj")
    options = {}
    for n in ("h.0.mlp.c_fc", "h.0.mlp.c_proj"):
        W = m.get_matrix(n).weight
        opts, _ = compress.candidate_options(W)
        options[n] = [dict(params=W.numel(), tail=0.0)] + opts
    for target in (base - 100, base - 300, base - 400):
        budget = target - (base - 2 * 256)
        best = min((a["tail"] + b["tail"] for a, b in itertools.product(*options.values())
                    if a["params"] + b["params"] <= budget), default=None)
        plan = compress.solve_budget(m, target, kinds=kinds, progress=False, log=lambda *a: None)
        got = sum(kron.kron_tail_energy(m.get_matrix(n).weight, e.m1, e.n1, e.r) for n, e in plan.items())
        assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


def test_budget_refuses_impossible_targets(tiny_model):
    with pytest.raises(ValueError, match="below the smallest model"):
        compress.solve_budget(tiny_model, 1000, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="objective"):
        compress.solve_budget(tiny_model, 10**6, objective="loss", progress=False, log=lambda *a: None)


def test_budget_on_teacher_prints_its_choice(teacher_dir):
    m, _ = GPT.from_pretrained(teacher_dir)
    lines = []
    target = model.count_params(m)["hf"] - 200_000
    plan = compress.solve_budget(m, target, kinds=("mlp.c_fc", "mlp.c_proj"), progress=False, log=lines.append)
    assert plan and all(n.endswith(("mlp.c_fc", "mlp.c_proj")) for n in plan)
    text = "\n".join(lines)
    assert "price lam" in text and f"target {target:,}" in text
    compress.decompose(m, plan, compare=(), progress=False)
    assert target - 0.005 * target < model.count_params(m)["hf"] <= target


def test_lowrank_family_is_truncated_svd():
    """A_k m x 1, B_k 1 x n: the r-term Van Loan fit is the rank-r truncated SVD (Eckart-Young),
    and the candidates' tails are the SVD tails."""
    torch.manual_seed(3)
    W = torch.randn(24, 10, dtype=torch.float64)
    opts, total = compress.candidate_options(W, max_r=100, family="lowrank")
    assert {(o["m1"], o["n1"]) for o in opts} == {(24, 1)}
    s = torch.linalg.svdvals(W)
    for o in opts:
        assert o["params"] == o["r"] * (24 + 10)
        assert o["tail"] == pytest.approx(float((s[o["r"]:] ** 2).sum()), rel=1e-9)
    assert max(o["r"] for o in opts) == int(24 * 10 / (1.5 * 34))      # the 1.5x minimum compression
    A, B = kron.nearest_kronecker(W, 24, 1, 3)
    U, S, Vh = torch.linalg.svd(W)
    assert torch.allclose(kron.kron_dense(A, B), (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-10)
    with pytest.raises(ValueError, match="family"):
        compress.candidate_options(W, family="tucker")


def test_lowrank_budget_uses_only_rank_factors(tiny_model):
    base = model.count_params(tiny_model)["hf"]
    plan = compress.solve_budget(tiny_model, base - 2000, max_r=64, family="lowrank", progress=False,
                                 log=lambda *a: None)
    assert plan
    for name, e in plan.items():
        m, n = compress.matrix_shape(tiny_model.config, name)
        assert (e.m1, e.n1) == (m, 1)


def test_budget_closest_takes_the_smallest_model(tiny_model):
    """unreachable="closest": a target below what the kinds allow gives the smallest model they
    allow (every matrix at its smallest factorization), and says so."""
    import copy
    lines = []
    kinds = ("mlp.c_fc", "mlp.c_proj")
    plan = compress.solve_budget(tiny_model, 1000, kinds=kinds, progress=False, log=lines.append,
                                 unreachable="closest")
    assert any("taking that smallest model" in l for l in lines)
    assert len(plan) == 2 * tiny_model.config.n_layer
    m = copy.deepcopy(tiny_model)
    for name, e in plan.items():
        m.factor(name, e.m1, e.n1, e.r, init="random")
        opts, _ = compress.candidate_options(tiny_model.get_matrix(name).weight)
        assert model.count_params(m.get_matrix(name))["hf"] - m.get_matrix(name).bias.numel() == \
            min(o["params"] for o in opts)
    with pytest.raises(ValueError, match="unreachable"):
        compress.solve_budget(tiny_model, 1000, progress=False, log=lambda *a: None, unreachable="maybe")


# ---- calibration and the data-aware init


def test_calibrate_measures_each_matrix_input(tiny_hf_dir):
    """One window (a T + 1 token file has a single offset), read twice: C is the mean of x x^T over
    its positions, for c_attn's input ln_1(x), the head's input ln_f(h) and c_proj's GELU output."""
    import torch.nn.functional as F
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    T = m.config.block_size
    tokens = np.random.default_rng(0).integers(0, m.config.vocab_size, T + 1).astype(np.uint16)
    names = ["wte", "h.0.attn.c_attn", "h.1.attn.q", "h.1.mlp.c_proj"]
    covs = compress.calibrate(m, tokens, names, n_tokens=2 * T, progress=False)
    with torch.no_grad():
        out = m(torch.from_numpy(tokens[:T].astype(np.int64))[None], return_hidden=True)
        h = out.hidden
        blk = m.transformer.h[1]
        mid = h[1] + blk.attn(blk.ln_1(h[1]))
        inputs = {"wte": m.transformer.ln_f(h[-1]), "h.0.attn.c_attn": m.transformer.h[0].ln_1(h[0]),
                  "h.1.attn.q": blk.ln_1(h[1]),
                  "h.1.mlp.c_proj": F.gelu(blk.mlp.c_fc(blk.ln_2(mid)), approximate="tanh")}
    for name, x in inputs.items():
        x = x[0].double()
        assert covs[name].dtype == torch.float64
        assert torch.allclose(covs[name], x.t() @ x / T, rtol=1e-5, atol=1e-8), name
    with pytest.raises(ValueError, match="positive integer"):
        compress.calibrate(m, tokens, names, n_tokens=0)
    with pytest.raises(ValueError, match="more than"):
        compress.calibrate(m, tokens[:T], names, n_tokens=T)


def test_whiten_init_fits_outputs_better_than_van_loan(tiny_hf_dir):
    """The whiten init needs calibration; with it every matrix's output error on the calibration
    inputs is below Van Loan's and pruning's, and so is the model's: its logits on that text are
    closer to the dense model's."""
    import copy
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    tokens = np.random.default_rng(1).integers(0, m.config.vocab_size, 4096).astype(np.uint16)
    spec = {"rules": [{"kinds": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"], "b": [2, 2], "init": "whiten"}]}
    plan = compress.resolve_spec(spec, m.config)
    assert compress.needs_calibration(plan) == list(plan)
    with pytest.raises(ValueError, match="needs the inputs' second moments"):
        compress.decompose(copy.deepcopy(m), plan, progress=False)
    covs = compress.calibrate(m, tokens, list(plan), n_tokens=1024, progress=False)
    x = torch.from_numpy(tokens[:1024].astype(np.int64)).view(32, 32)
    with torch.no_grad():
        dense = m(x).logits
    gaps = {}
    for init in ("vl", "whiten"):
        s = copy.deepcopy(m)
        rows = compress.decompose(s, {k: dataclasses.replace(e, init=init) for k, e in plan.items()},
                                  compare=("vl", "prune", "whiten"), progress=False, covs=covs)
        with torch.no_grad():
            gaps[init] = (s(x).logits - dense).norm().item()
    for row in rows:
        assert set(row["out_errors"]) == {"vl", "prune", "whiten"}
        assert row["out_errors"]["whiten"] < min(row["out_errors"]["vl"], row["out_errors"]["prune"])
    assert gaps["whiten"] < gaps["vl"]
    assert "out whiten" in compress.format_report(rows)


def test_whiten_embedding_takes_its_own_ridge(tiny_hf_dir):
    """The tied embedding's whiten fit uses WHITEN_DAMP_WTE (its C covers the head, not the lookup),
    the other matrices WHITEN_DAMP; the two ridges give different factors here."""
    import copy
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    tokens = np.random.default_rng(2).integers(0, m.config.vocab_size, 4096).astype(np.uint16)
    plan = {"wte": compress.MatrixPlan(m.config.vocab_size, m.config.n_embd // 2, 1, "whiten")}
    covs = compress.calibrate(m, tokens, ["wte"], n_tokens=1024, progress=False)
    W = m.transformer.wte.weight.detach()
    s = copy.deepcopy(m)
    compress.decompose(s, plan, compare=(), progress=False, covs=covs)
    e = plan["wte"]
    A, B = kron.whitened_kronecker(W, e.m1, e.n1, 1, covs["wte"], damp=compress.WHITEN_DAMP_WTE)
    A2, B2 = kron.whitened_kronecker(W, e.m1, e.n1, 1, covs["wte"], damp=compress.WHITEN_DAMP)
    got = kron.kron_dense(s.transformer.wte.A.detach(), s.transformer.wte.B.detach())
    assert torch.allclose(got, kron.kron_dense(A, B), atol=1e-6)
    assert (kron.kron_dense(A2, B2) - kron.kron_dense(A, B)).abs().max() > 1e-4


def test_output_objective_weighs_tails_by_input_energy(tiny_model):
    """Scaling one matrix's inputs by 10 makes its errors 100x dearer under the output objective: the
    solver then keeps that matrix more exact; the tail objective does not see inputs at all."""
    tokens = np.random.default_rng(0).integers(0, tiny_model.config.vocab_size, 2048).astype(np.uint16)
    names = tiny_model.matrix_names()
    covs = compress.calibrate(tiny_model, tokens, names, n_tokens=256, progress=False)
    target = model.count_params(tiny_model)["hf"] - 3000
    with pytest.raises(ValueError, match="needs the input second moment"):
        compress.solve_budget(tiny_model, target, objective="output", progress=False, log=lambda *a: None)

    def params_of(plan, name):
        e, (m, n) = plan.get(name), tiny_model.get_matrix(name).weight.shape
        return m * n if e is None else e.r * (e.m1 * e.n1 + (m // e.m1) * (n // e.n1))

    quiet_plan = compress.solve_budget(tiny_model, target, objective="output", covs=covs, progress=False,
                                       log=lambda *a: None)
    name = max(quiet_plan, key=lambda k: tiny_model.get_matrix(k).weight.numel() - params_of(quiet_plan, k))
    loud = dict(covs, **{name: covs[name] * 100})
    loud_plan = compress.solve_budget(tiny_model, target, objective="output", covs=loud, progress=False,
                                      log=lambda *a: None)
    assert params_of(loud_plan, name) > params_of(quiet_plan, name)


def test_a_plan_names_its_structure():
    """A m x 1 (x) B 1 x n and A 1 x n (x) B m x 1 are rank-r products; the demo's table says which."""
    from model import GPTConfig
    c = GPTConfig(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=128, block_size=32)
    low = {"h.0.mlp.c_fc": compress.MatrixPlan(256, 1, 4), "wte": compress.MatrixPlan(1, 64, 3)}
    kron_ = {"h.1.mlp.c_fc": compress.MatrixPlan(16, 8, 2), "h.1.attn.c_attn": compress.MatrixPlan(3, 64, 1)}
    assert compress.structure(c, low) == "low rank" and compress.structure(c, kron_) == "Kronecker"
    assert compress.structure(c, {**low, **kron_}) == "mixed: 2 Kronecker, 2 low rank"
    assert compress.structure(c, {}) == "dense"


# The reference Llama teacher's shapes (owt-6x256-llama-bpe8k): 6 blocks, hidden 256, SwiGLU 768,
# 8 heads of 32, 2 key-value heads, vocabulary 8192, tied; 6,622,464 parameters.
LLAMA_REF = GPTConfig(arch="llama", n_layer=6, n_head=8, n_kv_head=2, n_embd=256, n_inner=768, vocab_size=8192,
                      block_size=256, activation_function="silu", tie_word_embeddings=True)


def test_llama_presets_count_what_their_shapes_say():
    assert model.count_params(GPT(LLAMA_REF))["hf"] == 6_622_464
    mlp = 768 * 256                                    # each of gate, up, down
    quarter = 192 * 256 + 4                            # A (f/4) x n, B 4x1 (down: A n x f/4, B 1x4)
    assert counts_of(compress.PRESETS["llama-mlp-b4"], LLAMA_REF)["hf"] == 6_622_464 - 18 * (mlp - quarter)
    # odd blocks' MLP, A 192x128 (x) B 4x2, r = 4; the embedding A 8192x64 (x) B 1x4
    tq = 6_622_464 - 9 * (mlp - 4 * (192 * 128 + 8)) - (8192 * 256 - (8192 * 64 + 4))
    assert counts_of(compress.PRESETS["llama-tq-like"], LLAMA_REF)["hf"] == tq
    halved = {"q": 256 * 256, "k": 64 * 256, "v": 64 * 256, "o": 256 * 256, "gate": mlp, "up": mlp, "down": mlp}
    kn = 6_622_464 - 3 * sum(w - (w // 2 + 2) for w in halved.values()) - (8192 * 256 - (8192 * 128 + 2))
    assert counts_of(compress.PRESETS["llama-kngpt2-like"], LLAMA_REF)["hf"] == kn


def test_a_preset_of_the_other_family_is_refused_by_name():
    with pytest.raises(ValueError, match="gpt2 family.*takes the presets llama-mlp-b4, llama-tq-like"):
        compress.resolve_spec(compress.PRESETS["krony-81m"], LLAMA_REF)
    with pytest.raises(ValueError, match="llama family.*takes the presets krony-81m"):
        compress.resolve_spec(compress.PRESETS["llama-mlp-b4"], GPT2_SMALL)
    assert compress.presets_for(LLAMA_REF) == ["llama-mlp-b4", "llama-tq-like", "llama-kngpt2-like"]
    assert "tq-like" in compress.presets_for(GPT2_SMALL) and "llama-tq-like" not in compress.presets_for(GPT2_SMALL)


# ---- compress.best_fit: one matrix, a parameter count, the best structure


def _cov(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(4 * n, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
         ) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    return X.t() @ X / X.shape[0]


def energy(W, cov):
    return float((W * W).sum()) if cov is None else float(((W @ cov) * W).sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_best_fit_finds_the_structure_a_matrix_has(weighted):
    g = torch.Generator().manual_seed(0)
    cov = _cov(48) if weighted else None
    low = torch.randn(32, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 48, generator=g, dtype=torch.float64)
    kr = kron.kron_dense(torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
                         torch.randn(2, 8, 8, generator=g, dtype=torch.float64))    # full rank, 176 numbers
    low2 = low[:, :2] @ low[:2]
    for W, budget, family in ((low, 3 * 80, "lowrank"), (kr, 176, "kron"), (low2 + kr, 2 * 80 + 176, "hybrid")):
        f = compress.best_fit(W, budget, cov)
        assert f.family == family and f.params <= budget and f.dense().shape == W.shape
        # exact for one structure; the hybrid's alternating fit converges linearly (4 rounds)
        assert compress.fit_error(W, f, cov) < (1e-3 if family == "hybrid" else 1e-10) * energy(W, cov)
    # on the Kronecker matrix, low rank at the same size is far off: the choice matters
    lr = compress.fit_hybrid(kr, 176 // 80, (4, 6, 0), cov)
    assert lr.family == "lowrank" and compress.fit_error(kr, lr, cov) > 0.1 * energy(kr, cov)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_hybrid_is_never_worse_than_its_low_rank_start(weighted):
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cov = _cov(64, 2) if weighted else None
    alone = compress.fit_hybrid(W, 6, (8, 16, 0), cov, damp=0.0)
    hyb = compress.fit_hybrid(W, 6, (8, 16, 2), cov)
    assert alone.family == "lowrank" and hyb.family == "hybrid" and hyb.params == alone.params + 2 * (128 + 24)
    assert compress.fit_error(W, hyb, cov) <= compress.fit_error(W, alone, cov)
    # the low rank part with no Kronecker parameters is the best rank-6 fit (Eckart-Young / SVD-LLM)
    ref = compress.fit_error(W, compress.Fit("lowrank", [kron.whitened_kronecker(W, 48, 1, 6, cov)], ""), cov)
    assert compress.fit_error(W, alone, cov) == pytest.approx(ref, rel=1e-9)
    # a matrix of rank 6 exactly: the Kronecker part has nothing left to take
    W6 = W[:, :6] @ W[:6]
    assert compress.fit_error(W6, compress.fit_hybrid(W6, 6, (8, 16, 2), cov), cov) < 1e-12 * energy(W6, cov)


def test_best_fit_refuses_a_budget_below_one_term():
    with pytest.raises(ValueError, match="below one rank-1 term"):
        compress.best_fit(torch.randn(8, 8), 15)
