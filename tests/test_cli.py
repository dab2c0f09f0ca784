"""kron_decompose.py and krony_to_gpt.py, run as a user runs them."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow          # every test here starts command lines (seconds each, importing torch)


def run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")       # a hub name must fail fast, not retry the network
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_all(commands):
    """Independent command lines, three at a time (each spends seconds importing torch), in order."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda c: run(*c), commands))


def test_list_table_has_kronypt_81m_shape():
    p = run("kron_decompose.py", "--list", "3072", "768", "--r", "1")
    assert p.returncode == 0, p.stderr
    assert "396 factorizations of a 3072 x 768 matrix" in p.stdout
    line = [l for l in p.stdout.splitlines() if l.split()[:7] == ["768", "x", "768", "4", "x", "1", "1"]]
    assert len(line) == 1 and "589,828" in line[0] and "4.0x" in line[0]


def test_list_budget_and_json():
    p = run("kron_decompose.py", "--list", "3072", "768", "--r", "2", "--budget", "600000", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert rows and all(r["params"] <= 600_000 and r["r"] == 2 for r in rows)
    assert all(r["m1"] * r["m2"] == 3072 and r["n1"] * r["n2"] == 768 for r in rows)
    full = json.loads(run("kron_decompose.py", "--list", "3072", "768", "--r", "2", "--json").stdout)
    assert len(rows) == sum(r["params"] <= 600_000 for r in full) < len(full)


def test_r_filters_the_list_only_and_json_to_a_file(tmp_path):
    by_r = run("kron_decompose.py", "--list", "768", "768", "--r", "3", "--json")
    assert by_r.returncode == 0
    assert {row["r"] for row in json.loads(by_r.stdout)} == {3}
    p = run("kron_decompose.py", "--list", "768", "768", "--r", "3", "--json", str(tmp_path / "rows.json"))
    assert p.returncode == 0 and p.stdout == ""
    assert json.loads((tmp_path / "rows.json").read_text()) == json.loads(by_r.stdout)


def test_every_script_reports_a_failure_in_one_line(tmp_path):
    """A teacher or model that is not there: status 1 and one `error:` line, never a traceback."""
    nowhere = str(tmp_path / "nowhere")
    data = str(tmp_path / "data")
    commands = (("kron_decompose.py", "--preset", "krony-81m", "--teacher", nowhere, "--out", data),
                ("krony_to_gpt.py", nowhere, "--out", data),
                ("sample.py", nowhere), ("perplexity_eval.py", nowhere, "wiki2"),
                ("scripts/bench_eval.py", nowhere),
                ("scripts/budget_objectives.py", "--teacher", nowhere, "--dataset", data),
                ("scripts/whiten_damp.py", "--teacher", nowhere, "--dataset", data),
                ("scripts/init_compare.py", "--teacher", nowhere, "--dataset", data, "--config",
                 "config/recipe_common.py", "--out", data),
                ("scripts/plot_run.py", nowhere))
    for (script, *_), p in zip(commands, run_all(commands)):
        assert p.returncode == 1, (script, p.stderr)
        err = p.stderr.strip().splitlines()
        assert "Traceback" not in p.stderr and err[-1].startswith(f"{os.path.basename(script)}: error: "), (script, err)


def test_special_files_are_refused_not_read(tmp_path):
    """A prompt, config or spec file that is /dev/zero would be read until memory runs out."""
    for script, args, status in (("sample.py", ["nowhere", "--start", "FILE:/dev/zero"], 1),
                                 ("train.py", ["/dev/zero"], 2),
                                 ("kron_decompose.py", ["--teacher", "nowhere", "--spec", "/dev/zero", "--out",
                                                        str(tmp_path / "o")], 1)):
        p = run(script, *args)
        assert p.returncode == status and "/dev/zero is not a regular file" in p.stderr, (script, p.stderr)
        assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr


def test_krony_to_gpt_takes_out_too():
    p = run("krony_to_gpt.py", "checks/a", "x", "--out", "y")
    assert p.returncode == 2 and "two output folders" in p.stderr
    p = run("krony_to_gpt.py", "checks/a")
    assert p.returncode == 2 and "OUT_DIR or --out" in p.stderr


def test_bad_arguments_give_one_line_errors():
    bad = (["768", "768", "0"], ["--list", "3072", "-5"], ["--list", "3072", "7x"],
           ["--list", "3072", "768", "--r", "0"], ["768", "768"], [], ["--preset", "krony-81m", "--device", "tpu"],
           ["--list", "768", "768", "--factors", "2"], ["--preset", "krony-81m", "--r", "2"],
           ["768", "768", "1", "--budget", "1000"])
    for args, p in zip(bad, run_all([("kron_decompose.py", *args) for args in bad])):
        assert p.returncode == 2, args
        assert "Traceback" not in p.stderr and "error:" in p.stderr, (args, p.stderr)
    # every argument is checked before any work (demo.py once decomposed for minutes first)
    commands = (("demo.py", "--max_iters", "-1"), ("demo.py", "--max_tokens", "0"),
                ("demo.py", "--device", "cuda:3"), ("sample.py", "gpt2", "--device", "tpu"))
    for (script, *args), p in zip(commands, run_all(commands)):
        assert p.returncode == 2 and args[-2] in p.stderr and "Traceback" not in p.stderr, (script, args, p.stderr)


def test_kronypt_form_decompose_export_dense_and_compact(teacher_dir, tokenizer_dir, tmp_path):
    """kron_decompose.py DIM1 DIM2 N (Krony-PT's form, scaled to the 128-wide teacher), then both exports."""
    ck = tmp_path / "ckpt"
    p = run("kron_decompose.py", "128", "128", "1", "--teacher", teacher_dir, "--out", str(ck))
    assert p.returncode == 0, p.stderr
    assert "h.3.mlp.c_proj" in p.stdout and "err vl" in p.stdout and "err prune" in p.stdout
    cfg = json.loads((ck / "config.json").read_text())
    # c_fc (Conv1D 128 x 512) with first factor 128 x 128: (512, 128) = (128, 128) (x) (4, 1) as nn.Linear
    assert cfg["factors"]["h.0.mlp.c_fc"]["m1"] == 128 and cfg["factors"]["h.0.mlp.c_proj"]["n1"] == 128
    assert f"wrote {ck}" in p.stdout
    from model import count_params
    import checkpoint
    student, _ = checkpoint.load_student(ck)
    assert f"{count_params(student)['hf']:,} parameters" in p.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer
    dense, compact = tmp_path / "dense", tmp_path / "compact"
    p = run("krony_to_gpt.py", str(ck), str(dense), "--tokenizer", tokenizer_dir)
    assert p.returncode == 0, p.stderr
    assert "verified: max abs logit difference" in p.stdout
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= set(os.listdir(dense))
    hf = AutoModelForCausalLM.from_pretrained(dense).eval()
    tok = AutoTokenizer.from_pretrained(dense)
    ids = tok("The history of the city", return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    with torch.no_grad():
        assert (hf(ids).logits - student.eval()(ids)[0]).abs().max() < 1e-4

    p = run("krony_to_gpt.py", str(ck), str(compact), "--compact", "--tokenizer", tokenizer_dir)
    assert p.returncode == 0, p.stderr
    back, _ = checkpoint.load_student(compact)
    with torch.no_grad():
        assert torch.equal(back.eval()(ids)[0], student(ids)[0])
    assert checkpoint.dir_size(compact) < checkpoint.dir_size(dense)


def test_preset_and_budget_forms(teacher_dir, tmp_path):
    p = run("kron_decompose.py", "--teacher", teacher_dir, "--preset", "krony-96m", "--init", "prune",
            "--out", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {e["init"] for e in cfg["factors"].values()} == {"prune"} and len(cfg["factors"]) == 8
    p = run("kron_decompose.py", "--teacher", teacher_dir, "--target_params", "7000000", "--kinds",
            "mlp.c_fc,mlp.c_proj", "--out", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr
    assert "budget: target 7,000,000" in p.stdout and "price lam" in p.stdout
    import checkpoint
    from model import count_params
    assert count_params(checkpoint.load_student(tmp_path / "b")[0])["hf"] <= 7_000_000


def test_decompose_and_export_refusals(teacher_dir, tmp_path):
    cases = ((("768", "768", "1", "--teacher", str(tmp_path / "missing")), 1, "missing: no such folder"),
             (("768", "768", "1", "--teacher", "no_such_name"), 1, "cannot load GPT-2 checkpoint 'no_such_name'"),
             (("768", "768", "1", "--teacher", teacher_dir), 1, "does not divide"),    # 768 does not fit 128 wide
             (("128", "128", "100000", "--teacher", teacher_dir), 1, "exceeds the Kronecker rank ceiling"),  # once OOM
             (("128", "128", "1", "--preset", "krony-81m"), 2, "only one of"),
             (("--teacher", teacher_dir, "--target_params", "1000", "--kinds", "mlp.c_fc"), 1, "below the smallest"))
    for (args, status, message), p in zip(cases, run_all([("kron_decompose.py", *c[0]) for c in cases])):
        assert p.returncode == status and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    # a bad checkpoint: refused, and the existing output directory is left as it was
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "krony_gpt2", "format_version": 1, "gpt": {}}))
    p = run("krony_to_gpt.py", str(bad), str(out))
    assert p.returncode == 1 and "does not describe a valid student" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "{}"
    # outputs never replace the command's inputs, nor folders this toolkit did not write
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    before = {f: (teacher / f).read_bytes() for f in os.listdir(teacher)}
    p = run("kron_decompose.py", "128", "128", "1", "--teacher", str(teacher), "--out", str(teacher))
    assert p.returncode == 1 and "is an input of this command" in p.stderr and "Traceback" not in p.stderr
    p = run("kron_decompose.py", "128", "128", "1", "--teacher", teacher_dir, "--out", str(teacher))
    assert p.returncode == 1 and "something this toolkit did not write" in p.stderr
    assert {f: (teacher / f).read_bytes() for f in os.listdir(teacher)} == before
    ck = tmp_path / "ck"
    assert run("kron_decompose.py", "128", "128", "1", "--teacher", teacher_dir, "--out", str(ck)).returncode == 0
    p = run("krony_to_gpt.py", str(ck), str(ck))
    assert p.returncode == 1 and "is an input of this command" in p.stderr
    assert checkpoint_loads(ck)
    # nor a folder that holds an input (its swap would delete the input), nor one inside an input
    nest = tmp_path / "nest"
    assert run("krony_to_gpt.py", str(ck), str(nest)).returncode == 0
    shutil.copytree(ck, nest / "ckpt")
    held = {f: (nest / "ckpt" / f).read_bytes() for f in os.listdir(nest / "ckpt")}
    for src, dst in ((nest / "ckpt", nest), (ck, ck / "export"), (nest / "ckpt", tmp_path / "." / "nest" / "..")):
        p = run("krony_to_gpt.py", str(src), str(dst))
        assert p.returncode == 1 and "which is an input of this command" in p.stderr and "Traceback" not in p.stderr
    assert {f: (nest / "ckpt" / f).read_bytes() for f in os.listdir(nest / "ckpt")} == held
    assert not (ck / "export").exists() and checkpoint_loads(ck)


def checkpoint_loads(path):
    import checkpoint
    return checkpoint.load_student(path)[0] is not None


def test_sample_from_every_model_form(teacher_dir, tokenizer_dir, tmp_path):
    """sample.py on a Hugging Face folder, a student checkpoint and its compact export: greedy text is
    the same from both forms of one student, a seed reproduces sampled text, and bad flags are
    refused in one line."""
    from conftest import SHARED
    env_tok = str(SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", env_tok)
    p = run("kron_decompose.py", "--teacher", teacher_dir, "--preset", "krony-81m", "--out", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr
    p = run("krony_to_gpt.py", str(tmp_path / "s"), str(tmp_path / "compact"), "--tokenizer", tokenizer_dir, "--compact")
    assert p.returncode == 0, p.stderr
    greedy = {}
    for form in ("s", "compact"):
        p = run("sample.py", str(tmp_path / form), "--start", "The city of", "--num_samples", "2",
                "--max_new_tokens", "8", "--temperature", "0", "--device", "cpu")
        assert p.returncode == 0, p.stderr
        texts = p.stdout.split("---------------\n")[:2]
        assert texts[0] == texts[1] and texts[0].startswith("The city of") and len(texts[0]) > len("The city of")
        greedy[form] = texts[0]
    assert greedy["s"] == greedy["compact"]
    sampled = [run("sample.py", teacher_dir, "--num_samples", "2", "--max_new_tokens", "6", "--seed", "7").stdout
               for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].count("---------------") == 2
    p = run("sample.py", teacher_dir, "--top_k", "0")
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", str(tmp_path / "nowhere"))
    assert p.returncode == 1 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_whiten_init_calibrates_on_data(teacher_dir, tmp_path):
    """--init whiten calibrates on --data's train split and records it; no data is a one-line error."""
    import numpy as np
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4096), ("val", 512)):
        rng.integers(0, 50257, n).astype(np.uint16).tofile(data / f"{split}.bin")
    p = run("kron_decompose.py", "--teacher", teacher_dir, "--preset", "krony-81m", "--init", "whiten",
            "--dataset", str(data), "--calib_tokens", "512", "--out", str(tmp_path / "w"))
    assert p.returncode == 0, p.stderr
    assert "calibrated 8 matrices on 512 tokens" in p.stdout and "out whiten" in p.stdout
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["calibration"] == {"dataset": str(data), "split": "train", "tokens": 512, "seed": 1337}
    assert {e["init"] for e in cfg["factors"].values()} == {"whiten"}
    p = run("kron_decompose.py", "--teacher", teacher_dir, "--preset", "krony-81m", "--init", "whiten",
            "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    assert p.returncode == 1 and "--dataset:" in p.stderr and "prepare.py" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x").exists()
