"""The main job (demo.py) end to end, and scripts/compare.py on one row, each on the reference
teacher with a very short budget: the commands users run, as subprocesses."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SHARED, TEACHER

SAMPLE = SHARED / "data" / "openwebtext" / "owt10k_sample_docs.jsonl.xz"
TIKTOKEN_CACHE = SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"
BPE8K = SHARED / "teacher" / "owt-6x256-bpe8k"


@pytest.fixture(scope="module")
def env():
    for path in (TEACHER / "model.safetensors", SAMPLE, SHARED / "data" / "wikitext", TIKTOKEN_CACHE):
        if not path.exists():
            pytest.skip(f"{path} not found: the main job needs ../shared (set KRONY_SHARED to the shared/ folder)")
    return dict(os.environ, HF_HUB_OFFLINE="1", TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE))


@pytest.fixture(scope="module")
def teacher_split(tmp_path_factory, env):
    """The reference teacher's own split of the OWT sample (data/owt/prepare.py --val_last 71)."""
    out = tmp_path_factory.mktemp("owt_teacher")
    p = subprocess.run([sys.executable, "data/owt/prepare.py", "--input", str(SAMPLE), "--out_dir", str(out),
                        "--val_last", "71"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "train 1,584,118 tokens (1,355 docs), val 71,286 tokens (71 docs)" in p.stdout   # training.json's counts
    return out


@pytest.fixture(scope="module")
def bpe8k_split(tmp_path_factory, env):
    """The GPT-2-shaped reference teacher's split in its own tokenizer: its training.json's counts."""
    if not (BPE8K / "tokenizer.json").exists():
        pytest.skip(f"{BPE8K} not found (set KRONY_SHARED to the shared/ folder)")
    out = tmp_path_factory.mktemp("owt_bpe8k")
    p = subprocess.run([sys.executable, "data/owt/prepare.py", "--input", str(SAMPLE), "--out_dir", str(out),
                        "--val_last", "71", "--tokenizer", str(BPE8K)], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    training = json.loads((BPE8K / "training.json").read_text())
    assert f"train {training['train_tokens']:,} tokens (1,355 docs), val {training['val_tokens']:,} tokens (71 docs)" \
        in p.stdout
    return out


def table_rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        if line.startswith(("teacher (", "student (")):
            name, rest = line.split(")", 1)
            nums = [float(x.replace(",", "").rstrip("%")) for x in rest.split()]
            rows[name.split(" ")[0]] = nums
    return rows


@pytest.mark.slow
def test_demo_quick_runs_every_stage_offline(tmp_path, env, bpe8k_split, teacher_split):
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out), "--dataset", str(bpe8k_split)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "using the reference teacher" in p.stdout and "owt-6x256-bpe8k" in p.stdout   # says which teacher
    rows = table_rows(p.stdout)
    assert set(rows) == {"teacher", "student"} and len(p.stdout.split("\nstudent (")) == 3   # before and after
    # params, WikiText-103, WikiText-2, LAMBADA, OWT, OWT bpb, LAMBADA acc
    assert len(rows["teacher"]) == len(rows["student"]) == 7
    t_params, s_params = rows["teacher"][0], rows["student"][0]
    assert s_params < t_params and abs(s_params / t_params - 0.658) < 0.001
    for r in rows.values():
        assert all(math.isfinite(v) and v > 1 for v in r[1:5]) and 0 < r[5] < 10
        assert 0 <= r[6] <= 100
    assert f"outputs in {out}" in p.stdout
    for f in ("results.json", "loss.png", "reconstruction.png", "hf/config.json", "hf/model.safetensors",
              "hf/tokenizer.json", "hf_compact/config.json", "hf_compact/tokenizer.json", "train/ckpt/config.json",
              "init/config.json"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert res["reference_teacher"] and res["iters"] == 2 and res["tokenizer"]["vocab_size"] == 8192
    assert len(res["rows"]) == 3
    before, after = res["reconstruction_before"], res["reconstruction_after"]
    assert before and set(before) == set(after)
    assert all(0 < v < 1 for v in before.values())
    assert before != after                                      # training moved the factors
    evals = [json.loads(l) for l in open(out / "train" / "metrics.jsonl") if "val_loss" in l]
    assert evals[0]["iter"] == 0 and all(e["teacher_val_loss"] == evals[0]["teacher_val_loss"] for e in evals)
    # data made by another tokenizer (GPT-2's) is refused before anything runs
    p = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(tmp_path / "o2"), "--dataset",
                        str(teacher_split)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "made by the tokenizer gpt2" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o2" / "init").exists()


@pytest.mark.slow
def test_demo_refuses_a_teacher_it_cannot_load(tmp_path, env):
    p = subprocess.run([sys.executable, "demo.py", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "cannot load the teacher" in p.stderr
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.slow
def test_compare_runs_one_row_on_a_tiny_budget(tmp_path, env, teacher_split):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "scripts/compare.py", "--rows", "best", "scratch-dense", "--budgets", "1", "--seeds", "1337",
           "--max_iters", "2", "--owt_tokens", "2048", "--max_tokens", "1024", "--teacher", str(TEACHER),
           "--dataset", str(teacher_split), "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    run, scratch = sorted(res["runs"], key=lambda r: r["n"])
    assert scratch["row"] == "scratch-dense" and scratch["factored"] == 0 and scratch["params"] <= scratch["target"]
    assert scratch["n_layer"] <= 4 and math.isfinite(scratch["owt_bpb"])
    assert run["row"] == "best" and run["budget"] == 1 and run["tokens"] == 2 * 2048
    assert run["params"] <= run["target"] == round(0.658 * res["teacher"]["params"]) and run["reached"]
    assert run["target"] - run["params"] < 0.001 * run["target"]
    assert all(math.isfinite(run[k]) and run[k] > 1 for k in ("owt", "wiki2_kp", "wiki2_hf", "lambada_kp"))
    table = (out / "table.md").read_text()
    assert "| 0 | teacher (no training)" in table and "| 7 | this project" in table and "| 12 | from scratch" in table
    assert "OWT val bits/byte" in table
    assert (out / "ppl_vs_params.png").exists()
    stamp = (out / "best-b1-s1337" / "result.json").stat().st_mtime
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0
    assert (out / "best-b1-s1337" / "result.json").stat().st_mtime == stamp    # a finished run is not redone


def test_compare_scores_the_frontier_rows_starting_points(tmp_path, env, teacher_split):
    """--max_iters 0: each row's starting point scored without training (the frontier's training-free
    excess loss); the structure each plan uses is named in the results and the table."""
    out = tmp_path / "cmp"
    base = [sys.executable, "scripts/compare.py", "--seeds", "1337", "--max_iters", "0",
            "--owt_tokens", "2048", "--max_tokens", "1024", "--teacher", str(TEACHER), "--dataset", str(teacher_split),
            "--out", str(out)]
    for rows, budget in ((["minitron", "svdllm-uniform", "distilgpt2"], "35"), (["kron-only"], "2")):
        # Kronecker only at half the blocks: this teacher's embedding (50257 = 29 x 1733 rows) has few
        # Kronecker shapes, and their whitened fits take minutes
        p = subprocess.run(base + ["--rows", *rows, "--budgets", budget], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = {r["row"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    teacher = json.loads((out / "results.json").read_text())["teacher"]
    assert set(res) == {"minitron", "svdllm-uniform", "kron-only", "distilgpt2"}
    assert all(r["iters"] == 0 and r["tokens"] == 0 and math.isfinite(r["owt_bpb"]) for r in res.values())
    m = res["minitron"]
    # the widest embedding that fits: 64 channels would hold (50257 + 256) x 64 = 3.2M > the 2.5M target
    assert m["factored"] == 0 and m["n_embd"] == 32 and m["n_inner"] == 512 and m["reached"]
    assert res["svdllm-uniform"]["structure"] == "low rank" and res["svdllm-uniform"]["reached"]
    assert res["kron-only"]["structure"] == "Kronecker" and res["kron-only"]["reached"]
    assert res["distilgpt2"]["n_layer"] == 1 and not res["distilgpt2"]["reached"]      # the embedding alone is over
    assert all(r["owt_bpb"] > teacher["owt_bpb"] for r in res.values())                 # compression costs loss
    table = (out / "table.md").read_text()
    assert "(plan: Kronecker)" in table and "(plan: low rank)" in table and "| 15 | Minitron-style" in table
    assert (out / "frontier.png").exists()
    p = subprocess.run(base + ["--rows", "scratch-dense", "--budgets", "35"], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode != 0 and "no starting point to score without training" in p.stderr
    assert "Traceback" not in p.stderr


def test_the_dense_from_scratch_row_is_the_largest_that_fits(teacher_dir):
    sys.path.insert(0, str(ROOT / "scripts"))
    import compare
    from model import GPT, count_params
    teacher, _ = GPT.from_pretrained(teacher_dir)
    c = teacher.config
    target = compare.budget_target(teacher, 2)[0]
    shape = compare.dense_shape(teacher, target)
    from dataclasses import replace
    built = count_params(GPT(replace(c, n_inner=4 * shape["n_embd"], **shape)))["hf"]
    assert built == compare.dense_params(c, shape["n_layer"], shape["n_embd"]) <= target
    head = c.n_embd // c.n_head
    assert shape["n_embd"] % head == 0 and shape["n_embd"] // shape["n_head"] == head
    wider = compare.dense_params(c, shape["n_layer"], shape["n_embd"] + head)
    assert shape["n_embd"] == c.n_embd or wider > target


def ctrl_c_when(cmd, env, seen):
    """Run cmd in its own process group and press Ctrl-C (SIGINT to the whole group, as a terminal
    does) once seen() is true, i.e. once training is under way. Returns (exit status, stdout)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while not seen(lines) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, "".join(lines)[-3000:]          # still running: training had not finished
    os.killpg(p.pid, signal.SIGINT)
    rc = p.wait(timeout=600)
    reader.join(timeout=10)
    return rc, "".join(lines)


@pytest.mark.slow
def test_an_interrupted_training_stops_the_pipeline(tmp_path, env, bpe8k_split, teacher_split):
    """Ctrl-C during training: the checkpoint is saved, but the job stops with exit status 130;
    nothing is exported or scored as if the run had finished, and compare.py caches no result."""
    out = tmp_path / "demo"
    rc, text = ctrl_c_when([sys.executable, "demo.py", "--quick", "--max_iters", "12", "--out", str(out), "--dataset",
                            str(bpe8k_split)], env, lambda lines: any(l.startswith("iter 0:") for l in lines))
    assert rc == 130, text[-3000:]
    assert (out / "train" / "ckpt" / "config.json").exists(), text[-3000:]          # saved where it stopped
    assert not (out / "hf").exists() and not (out / "results.json").exists()
    cmp = tmp_path / "cmp"
    log = cmp / "best-b1-s1337" / "train.log"
    rc, text = ctrl_c_when([sys.executable, "scripts/compare.py", "--teacher", str(TEACHER), "--rows", "best",
                            "--budgets", "1", "--seeds", "1337", "--max_iters", "12", "--owt_tokens", "2048",
                            "--max_tokens", "1024", "--dataset", str(teacher_split), "--out", str(cmp)], env,
                           lambda lines: log.exists() and "iter 0:" in log.read_text())
    assert rc == 130, text[-3000:]
    assert (cmp / "best-b1-s1337" / "ckpt" / "config.json").exists()
    assert not (cmp / "best-b1-s1337" / "result.json").exists()
