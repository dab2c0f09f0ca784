"""The Llama family at real shapes on a CPU: a random-weight model with SmolLM2-135M's configuration
(hidden 576, SwiGLU 1536, 30 layers, 9 heads, 3 key-value heads, vocabulary 49,152, tied, context
8192; 134,515,008 parameters) through every command line (scripts/scale_walk.py): a Llama preset,
the budget solver at 65.8%, a whitened preset calibrated on 8,192 tokens, two distillation steps at
context 8192, both exports checked against the student's logits, and two windows of evaluation.
Tens of minutes on 2 cores: run with --scale (make scale); docs/SCALE.md has the measured figures."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.scale]


def test_smollm2_135m_every_stage_on_cpu(tmp_path):
    if not (SHARED / "teacher" / "owt-6x256-llama-bpe8k" / "tokenizer.json").exists():
        pytest.skip("the reference Llama teacher's tokenizer is not in ../shared")
    p = subprocess.run([sys.executable, "scripts/scale_walk.py", "smollm2-135m", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    walk = json.loads((tmp_path / "walk.json").read_text())["stages"]
    assert list(walk) == ["preset", "target", "whiten", "train", "dense", "compact", "evaluate"]
    assert "74,795,688 parameters, HF convention" in (tmp_path / "preset.log").read_text()    # MLPs at a quarter
    params = int((tmp_path / "target.log").read_text().rsplit("wrote", 1)[1].split("(")[1].split(" ")[0]
                 .replace(",", ""))
    assert 0.655 * 134_515_008 < params <= round(0.658 * 134_515_008)
    assert "calibrated" in (tmp_path / "whiten.log").read_text()
    steps = [json.loads(l) for l in open(tmp_path / "train" / "metrics.jsonl") if '"loss"' in l]
    assert [s["iter"] for s in steps] == [0, 1]
    for name in ("dense", "compact"):
        assert "verified: max abs logit difference" in (tmp_path / f"{name}.log").read_text()
    res = json.loads((tmp_path / "eval.json").read_text())["results"]["kp"]["owt"]
    assert res["windows"] == 2 and res["tokens"] == 2 * 8192 and res["scored"] == 2 * 8191   # two full windows
