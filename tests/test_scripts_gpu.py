"""scripts/gpu_check.py, scripts/bench_train.py and scripts/bench_infer.py kept working on a CPU: the
GPU check at toy sizes (--device cpu --quick) on a small random GPT-2, its training and inference
benchmarks and bf16-vs-fp32 steps."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    if not (SHARED / "data" / "wikitext").exists():
        pytest.skip(f"{SHARED / 'data'} not found (set KRONY_SHARED to the shared/ folder)")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128)).save_pretrained(tmp_path / "t")
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               TIKTOKEN_CACHE_DIR=str(SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"))
    p = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--teacher",
                        str(tmp_path / "t"), "--target_params", "2000000", "--out", str(tmp_path / "gc"),
                        "--data_dir", str(SHARED / "data"), "--only", "bench_train", "bench_infer", "teacher float32",
                        "teacher bfloat16"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (tmp_path / "gc" / "report.md").read_text()
    assert "## bench_train: ok" in report and "## teacher bfloat16: ok" in report
    for case in ("| dense |", "| krony-81m |", "| budget |"):               # every case, every column
        line = next(l for l in report.splitlines() if l.startswith(case))
        assert len(line.split("|")) == 10
    assert "(within 0.5%)" in report
    assert "## bench_infer: ok" in report
    for case in ("| teacher |", "| krony-81m dense |", "| krony-81m compact |", "| budget dense |", "| budget compact |"):
        line = next(l for l in report.splitlines() if l.startswith(case))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == 9 and cells[2].endswith(" MB") and float(cells[4].replace(",", "")) > 0
    assert "goal: krony-81m compact decodes at batch 1" in report
    assert "krony-81m compact: products chosen per tokens in a call (product x factor shapes): 1: " in report
    bad = subprocess.run([sys.executable, "scripts/gpu_check.py", "--only", "nothing"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "unknown steps" in bad.stderr
