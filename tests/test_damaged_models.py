"""Models that must be refused at load, in one line naming what is wrong, before anything is
allocated or scored: non-finite weights or config values, a config.json whose sizes its weights do
not have (a damaged n_layer would hang or exhaust memory), a pickle instead of safetensors."""
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import checkpoint
import compress
import krony_hf
from conftest import ROOT
from model import GPT


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def poke_tensor(folder, key_end, value):
    sd = load_file(str(folder / "model.safetensors"))
    key = next(k for k in sd if k.endswith(key_end))
    sd[key].view(-1)[3] = value
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return key


def set_config(folder, path, value):
    cfg = json.load(open(folder / "config.json"))
    d = cfg
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def compact(tiny_hf_dir, tmp_path_factory):
    m, hf_cfg = GPT.from_pretrained(tiny_hf_dir)
    plan = compress.resolve_spec(compress.PRESETS["krony-81m"], m.config)
    compress.decompose(m, plan, progress=False)
    out = tmp_path_factory.mktemp("compact") / "c"
    checkpoint.export_compact(m, out, checkpoint.student_config(m, plan, hf_cfg))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_teacher_with_a_non_finite_weight_is_refused(tiny_hf_dir, tmp_path, value):
    bad = copy(tiny_hf_dir, tmp_path / "t")
    key = poke_tensor(bad, "h.1.mlp.c_fc.weight", value)
    with pytest.raises(ValueError, match=f"tensor {key} holds non-finite values"):
        GPT.from_pretrained(str(bad))
    p = subprocess.run([sys.executable, "perplexity_eval.py", str(bad), "wiki2", "--max_tokens", "64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "non-finite" in p.stderr and "Traceback" not in p.stderr and "ppl" not in p.stdout


def test_a_non_finite_config_value_is_refused(tiny_hf_dir, compact, tmp_path):
    bad = copy(tiny_hf_dir, tmp_path / "t")
    (bad / "config.json").write_text((bad / "config.json").read_text().replace('"layer_norm_epsilon": 1e-05',
                                                                               '"layer_norm_epsilon": NaN'))
    with pytest.raises(ValueError, match="layer_norm_epsilon is nan"):
        GPT.from_pretrained(str(bad))
    student = copy(compact, tmp_path / "s")
    set_config(student, ["gpt", "layer_norm_epsilon"], float("inf"))
    with pytest.raises(checkpoint.CheckpointError, match="gpt.layer_norm_epsilon is inf"):
        checkpoint.load_student(student)


def test_a_student_with_a_non_finite_factor_is_refused(compact, tmp_path):
    bad = copy(compact, tmp_path / "s")
    key = poke_tensor(bad, "mlp.c_fc.A", float("inf"))
    with pytest.raises(ValueError, match=f"tensor {key} holds non-finite"):
        checkpoint.load_student(bad)
    krony_hf.register_with_transformers()
    with pytest.raises(ValueError, match="non-finite"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("n_layer", 10 ** 9), ("n_embd", 24 * 10 ** 5), ("n_positions", 10 ** 9)])
def test_a_config_larger_than_its_weights_is_refused_before_allocating(tiny_hf_dir, tmp_path, key, value):
    bad = copy(tiny_hf_dir, tmp_path / "t")
    set_config(bad, [key], value)
    t0 = time.time()
    with pytest.raises(ValueError, match="its weights have"):
        GPT.from_pretrained(str(bad))
    assert time.time() - t0 < 30
    p = subprocess.run([sys.executable, "kron_decompose.py", "--teacher", str(bad), "--preset", "krony-81m",
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "its weights have" in p.stderr and not (tmp_path / "o").exists()


def test_a_compact_export_larger_than_its_weights_is_refused_before_allocating(compact, tmp_path):
    bad = copy(compact, tmp_path / "s")
    set_config(bad, ["gpt", "n_layer"], 10 ** 6)
    with pytest.raises(checkpoint.CheckpointError, match="n_layer 1000000, its weights have 2"):
        checkpoint.load_student(bad)
    krony_hf.register_with_transformers()
    with pytest.raises(ValueError, match="n_layer 1000000, its weights have 2"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_a_pickle_checkpoint_is_not_loaded(tiny_hf_dir, tmp_path):
    bad = copy(tiny_hf_dir, tmp_path / "t")
    sd = load_file(str(bad / "model.safetensors"))
    torch.save(sd, bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(str(bad))
    msg = str(e.value)
    assert "pickle" in msg and "safetensors" in msg and "weights_only" not in msg
