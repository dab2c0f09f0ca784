"""The Llama family (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) through the same GPT:
logits equal to transformers' own, the dense export back to the original class, the compact export
generating as the dense one does, and every stage's command line on the reference Llama teacher."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import compress
from conftest import ROOT, SHARED, assert_same_runs, ctrl_c_at
from model import GPT, KVCache, count_params, matrix_kinds

LLAMA_TEACHER = SHARED / "teacher" / "owt-6x256-llama-bpe8k"
SAMPLE = SHARED / "data" / "openwebtext" / "owt10k_sample_docs.jsonl.xz"
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, initializer_range=0.3)   # logits of size ~10
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-untied-llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                                 dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
}


def hf_model(case, **extra):
    import transformers
    cfg_cls, model_cls, kw = CASES[case]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**SMALL, **kw, **extra)).eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def family_dir(request, tmp_path_factory):
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, d


def test_logits_equal_transformers_and_the_dense_export_is_the_original_class(family_dir, tmp_path):
    case, hf, d = family_dir
    model, hf_config = GPT.from_pretrained(str(d))
    assert model.config.arch == hf.config.model_type and model.config.kv_heads == 2
    idx = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, ours = hf(idx).logits, model(idx).logits
    assert theirs.abs().max() > 1                                # weights large enough for errors to show
    assert (theirs - ours).abs().max().item() < 1e-4
    assert count_params(model)["hf"] == hf.num_parameters()
    # factor one matrix of every kind, then the dense export: the source's class, the student's logits
    plan = {name: compress.MatrixPlan(*(2, 2) if name not in ("wte", "lm_head") else (1, 1), r=1)
            for name in model.matrix_names() if name.startswith(("h.0.", "wte", "lm_head"))}
    compress.decompose(model, plan, compare=(), progress=False)
    checkpoint.export_dense(model, str(tmp_path / "dense"), hf_config)
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        assert (back(idx).logits - model(idx).logits).abs().max().item() < 1e-4


def test_the_cache_and_left_padding_give_the_full_forwards_logits(family_dir):
    _, _, d = family_dir
    model, _ = GPT.from_pretrained(str(d))
    idx = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache()
        steps = [model(idx[:, :8], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits
                                                             for t in range(8, 20)]
        assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0                                          # row 0 left-padded by 5
        padded = model(idx, mask=mask).logits[0, 5:]
        alone = model(idx[:1, 5:]).logits[0]
        assert (padded - alone).abs().max().item() < 1e-4


@pytest.mark.parametrize("change, message", [
    (dict(sliding_window=16), "sliding window of 16 tokens"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_scaling type 'yarn'"),
    (dict(attention_bias=True), "attention_bias=True")], ids=["window", "yarn", "attention-bias"])
def test_what_is_not_implemented_is_refused(tmp_path, change, message):
    import transformers
    case = "mistral" if "sliding_window" in change else "llama-tied"
    cfg_cls, _, kw = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**SMALL, **dict(kw, **change))
    with pytest.raises(ValueError, match=message):
        from model import GPTConfig
        GPTConfig.from_hf(cfg)


def test_the_reference_llama_teacher_loads_exactly():
    if not (LLAMA_TEACHER / "model.safetensors").exists():
        pytest.skip(f"{LLAMA_TEACHER} not found (set KRONY_SHARED to the shared/ folder)")
    from transformers import AutoModelForCausalLM
    model, _ = GPT.from_pretrained(str(LLAMA_TEACHER))
    hf = AutoModelForCausalLM.from_pretrained(str(LLAMA_TEACHER)).eval()
    idx = torch.randint(0, 8192, (2, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx).logits).abs().max().item() < 1e-4
    assert count_params(model)["hf"] == 6_622_464
    assert matrix_kinds(model.config) == ("wte", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def run(*cmd, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_a_llama_preset_decomposes_the_reference_teacher_and_a_gpt2_one_is_refused(tmp_path):
    if not (LLAMA_TEACHER / "model.safetensors").exists():
        pytest.skip(f"{LLAMA_TEACHER} not found (set KRONY_SHARED to the shared/ folder)")
    out = run("kron_decompose.py", "--teacher", LLAMA_TEACHER, "--preset", "llama-mlp-b4", "--out", tmp_path / "k")
    assert "3,968,328 parameters, HF convention" in out              # 6,622,464 - 18 x (196,608 - 49,156)
    assert "h.5.mlp.down_proj" in out
    p = subprocess.run([sys.executable, "kron_decompose.py", "--teacher", str(LLAMA_TEACHER), "--preset", "krony-81m",
                        "--out", str(tmp_path / "g")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 1 and "takes the presets llama-mlp-b4" in p.stderr and not (tmp_path / "g").exists()


@pytest.mark.slow
def test_every_stage_on_the_reference_llama_teacher(tmp_path):
    """prepare -> kron_decompose (a spec naming every kind, whitened on calibration data) -> train
    (every loss term) -> both exports (the compact one generating as the dense one does, left-padded)
    -> perplexity_eval, as a user types them."""
    if not (LLAMA_TEACHER / "model.safetensors").exists() or not SAMPLE.exists():
        pytest.skip("the reference Llama teacher or the OWT sample is not in ../shared")
    data, init, runs = tmp_path / "data", tmp_path / "init", tmp_path / "run"
    run("data/owt/prepare.py", "--input", SAMPLE, "--out", data, "--val_last", 71, "--tokenizer", LLAMA_TEACHER)
    spec = tmp_path / "spec.json"
    kinds = list(matrix_kinds(GPT.from_pretrained(str(LLAMA_TEACHER))[0].config))
    spec.write_text(json.dumps({"rules": [dict(kinds=[k for k in kinds if k != "wte"], layers="odd", b=[2, 2], r=2,
                                               init="whiten"),
                                          dict(kinds=["wte"], b=[1, 2], r=1, init="whiten")]}))
    out = run("kron_decompose.py", "--teacher", LLAMA_TEACHER, "--spec", spec, "--dataset", data,
              "--calib_tokens", 2048, "--out", init)
    assert "h.1.mlp.gate_proj" in out and "h.1.attn.k_proj" in out
    run("train.py", "config/train_bpe8k.py", f"--teacher={LLAMA_TEACHER}", f"--init_from={init}", f"--dataset={data}",
        f"--out_dir={runs}", "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--eval_iters=1",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--preset=None", "--ce_weight=0.5",
        "--hidden_weight=0.5", "--attn_weight=0.5", "--progress=False")
    assert json.loads((runs / "ckpt" / "train_state.json").read_text())["iter_num"] == 2
    out = run("krony_to_gpt.py", runs / "ckpt", tmp_path / "hf")
    assert "dense LlamaForCausalLM" in out
    run("krony_to_gpt.py", runs / "ckpt", tmp_path / "compact", "--compact")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    code = f"""
import torch, krony_hf
from transformers import AutoModelForCausalLM, AutoTokenizer
krony_hf.register_with_transformers()
dense = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})
compact = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'compact')!r})
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r}, padding_side="left")
tok.pad_token = tok.pad_token or tok.eos_token
batch = tok(["The city of", "In a statement released on Monday, the"], return_tensors="pt", padding=True)
a = dense.generate(**batch, max_new_tokens=8, do_sample=False)
b = compact.generate(**batch, max_new_tokens=8, do_sample=False)
assert torch.equal(a, b), (a, b)
from transformers import pipeline
texts = [pipeline("text-generation", model=d)("The city of", max_new_tokens=8, do_sample=False)[0]["generated_text"]
         for d in ({str(tmp_path / 'hf')!r}, {str(tmp_path / 'compact')!r})]
assert texts[0] == texts[1] and texts[0].startswith("The city of"), texts
print("same tokens", type(dense).__name__)
"""
    assert "same tokens LlamaForCausalLM" in run("-c", code)
    out = run("perplexity_eval.py", tmp_path / "hf", "owt", "--owt_bin", data / "val.bin", "--max_tokens", 2048)
    assert "bits per byte" in out
    out = run("sample.py", tmp_path / "compact", "--start", "The city of", "--num_samples", 1, "--max_new_tokens", 8)
    assert out.count("The city of") == 1


def test_training_paths_on_a_llama_teacher(tmp_path, monkeypatch):
    """train.py's other paths with a Llama-family teacher: a two-stage schedule (the stage-two preset
    refactoring what stage one left), resume equal to an uninterrupted run, and from scratch (the
    factored shapes with random factors, residual projections o_proj and down_proj at GPT-2's
    1/sqrt(2 n_layer); a dense student of another width keeps the teacher's SwiGLU ratio)."""
    import numpy as np
    import train
    teacher = tmp_path / "teacher"
    hf_model("llama-tied").save_pretrained(teacher)                     # 2 blocks, hidden 64, SwiGLU 96
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4096), ("val", 1024)):
        rng.integers(0, 128, n).astype(np.uint16).tofile(tmp_path / "data" / f"{split}.bin")
    quiet = dict(log=lambda *a: None)

    def cfg(out, *extra):
        return train.parse_config(train.TrainConfig, [
            f"--teacher={teacher}", f"--dataset={tmp_path / 'data'}", f"--out_dir={tmp_path / out}", "--batch_size=2",
            "--block_size=32", "--gradient_accumulation_steps=1", "--eval_iters=1", "--eval_interval=2",
            "--warmup_iters=0", "--progress=False", "--device=cpu", "--ce_weight=0.5", *extra])[0]
    two = ('--stages=[{"iters": 2, "preset": "llama-mlp-b4"}, {"iters": 2, "preset": "llama-kngpt2-like"}]')
    full = train.train(cfg("a", two, "--preset=None", "--max_iters=4", "--lr_decay_iters=4"), **quiet)
    real = train.get_batch
    monkeypatch.setattr(train, "get_batch", ctrl_c_at(train, 2))          # Ctrl-C in stage two's first step
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg("b", two, "--preset=None", "--max_iters=4", "--lr_decay_iters=4"), **quiet)
    monkeypatch.setattr(train, "get_batch", real)
    again = train.train(cfg("b", two, "--preset=None", "--max_iters=4", "--lr_decay_iters=4", "--init_from=resume"),
                        **quiet)
    assert again["iter"] == 4 and again["loss"] == full["loss"] and again["val"] == full["val"]
    student, meta = checkpoint.load_student(tmp_path / "a" / "ckpt")
    assert meta["factors"]["h.1.attn.q_proj"].m1 == 32 and meta["factors"]["h.0.mlp.down_proj"].n1 == 24  # both stages
    train.train(cfg("s", "--preset=llama-mlp-b4", "--init_from=scratch", "--max_iters=1", "--lr_decay_iters=1"),
                **quiet)
    rnd, meta = checkpoint.load_student(tmp_path / "s" / "ckpt")
    up, down = rnd.get_matrix("h.0.mlp.up_proj").dense_weight(), rnd.get_matrix("h.0.mlp.down_proj").dense_weight()
    assert {e.init for e in meta["factors"].values()} == {"random"}
    ratio = down.std().item() / (up.std().item() / (2 * 2) ** 0.5)
    assert 0.7 < ratio < 1.4, ratio                                                   # scaled as a residual projection
    train.train(cfg("d", "--preset=None", "--init_from=scratch", "--n_embd=32", "--n_head=2", "--max_iters=1",
                    "--lr_decay_iters=1"), **quiet)
    dense, meta = checkpoint.load_student(tmp_path / "d" / "ckpt")
    assert (dense.config.arch, dense.config.n_embd, dense.config.n_inner) == ("llama", 32, 48) and not meta["factors"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_on_a_llama_teacher(tmp_path):
    """DDP across a two-stage schedule on a Llama-family teacher: the same losses as one process
    (the second stage's new factors registered with DDP), and the same final weights."""
    import numpy as np
    hf_model("llama-tied").save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4096), ("val", 1024)):
        rng.integers(0, 128, n).astype(np.uint16).tofile(tmp_path / "data" / f"{split}.bin")
    args = [f"--teacher={tmp_path / 'teacher'}", f"--dataset={tmp_path / 'data'}", "--batch_size=2", "--block_size=32",
            "--gradient_accumulation_steps=2", "--eval_iters=1", "--eval_interval=2", "--warmup_iters=0",
            "--progress=False", "--device=cpu", "--preset=None", "--max_iters=4", "--lr_decay_iters=4",
            '--stages=[{"iters": 2, "preset": "llama-mlp-b4"}, {"iters": 2, "preset": "llama-kngpt2-like"}]']
    run("train.py", *args, f"--out_dir={tmp_path / 'one'}")
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
        f"--out_dir={tmp_path / 'two'}")
    meta = assert_same_runs(tmp_path / "one", tmp_path / "two")
    assert "h.1.attn.o_proj" in meta["factors"]                              # the second stage ran
