"""GPT-2 at its real shapes on a CPU: a random-weight GPT-2 small (124,439,808 parameters, 1024
context, 50257-way logits; GPT2LMHeadModel(GPT2Config()), no hub) through every stage a GPT-2 user
runs, as the command lines they type: decomposition by a preset and by the budget solver, two
distillation steps at block_size 1024, dense and compact export (each checked against the student's
logits), and two windows of evaluation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SHARED

pytestmark = pytest.mark.slow


def run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TIKTOKEN_CACHE_DIR=str(SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(d / "teacher")
    rng = np.random.default_rng(0)
    (d / "data").mkdir()
    rng.integers(0, 50257, 8192).astype(np.uint16).tofile(d / "data" / "train.bin")
    rng.integers(0, 50257, 4096).astype(np.uint16).tofile(d / "data" / "val.bin")
    return d


def test_gpt2_small_every_stage_on_cpu(gpt2, tmp_path):
    teacher = str(gpt2 / "teacher")
    out = run("kron_decompose.py", "--teacher", teacher, "--preset", "krony-81m", "--out", str(tmp_path / "k81"))
    assert "81,972,576 parameters, HF convention" in out                     # Krony-PT's 81M
    out = run("kron_decompose.py", "--teacher", teacher, "--target_params", "81912576", "--out", str(tmp_path / "kb"))
    params = int(out.rsplit("wrote", 1)[1].split("(")[1].split(" ")[0].replace(",", ""))
    assert 81_800_000 < params <= 81_912_576                                  # DistilGPT2's size, not over
    run("train.py", f"--init_from={tmp_path / 'kb'}", f"--teacher={teacher}", f"--dataset={gpt2 / 'data'}",
        f"--out_dir={tmp_path / 'run'}", "--block_size=1024", "--batch_size=1", "--gradient_accumulation_steps=1",
        "--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=0", "--eval_interval=2", "--eval_iters=1",
        "--log_interval=1", "--kd_weight=1", "--ce_weight=1", "--device=cpu", "--progress=False")
    steps = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in l]
    assert [s["iter"] for s in steps] == [0, 1] and all(np.isfinite(s["loss"]) for s in steps)
    tok = str(SHARED / "data" / "gpt2_tokenizer" / "hf")
    for name, extra in (("dense", []), ("compact", ["--compact"])):
        out = run("krony_to_gpt.py", str(tmp_path / "run" / "ckpt"), str(tmp_path / name), "--tokenizer", tok, *extra)
        assert "verified: max abs logit difference" in out
    data = SHARED / "data"
    if not (data / "wikitext").exists():
        pytest.skip(f"{data} has no WikiText (set KRONY_SHARED to the shared/ folder)")
    out = run("perplexity_eval.py", str(tmp_path / "compact"), "wiki2", "--data_dir", str(data),
              "--max_tokens", "2048", "--batch_size", "1", "--json", str(tmp_path / "eval.json"))
    res = json.load(open(tmp_path / "eval.json"))["results"]["kp"]["wiki2"]
    assert res["windows"] == 2 and 1 < res["ppl"] < 1e6
