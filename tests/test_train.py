"""train.py on CPU with a tiny teacher: the loss falls, resume is exact, saves are atomic, two gloo
processes match one, the multi-step schedule and every loss term run, bad configs are refused."""
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import checkpoint
import train
from data import get_batch, load_tokens
from conftest import ROOT, assert_same_runs, ctrl_c_at, tiny_gpt2_config

BASE = ["--preset=krony-81m", "--batch_size=4", "--block_size=16", "--gradient_accumulation_steps=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=2", "--eval_iters=3", "--log_interval=1",
        "--progress=False", "--device=cpu", "--ce_weight=1"]

TWO_STAGES = ('--stages=[{"iters": 2, "rules": [{"kinds": ["mlp.c_fc"], "layers": "odd", "b": [4, 2], "r": 2}]},'
              '{"iters": 2, "rules": [{"kinds": ["mlp.c_fc"], "layers": "all", "b": [4, 4], "r": 1}, '
              '{"kinds": ["wte"], "b": [1, 2]}]}]')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 teacher (GPT-2's vocabulary) and a predictable token stream."""
    from transformers import GPT2LMHeadModel
    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_gpt2_config(vocab_size=50257, n_positions=32, n_embd=16, n_head=2)).save_pretrained(d / "teacher")
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 300, size=37)
    (d / "data").mkdir()
    np.tile(motif, 400).astype(np.uint16).tofile(d / "data" / "train.bin")
    np.tile(motif, 40).astype(np.uint16).tofile(d / "data" / "val.bin")
    return d


def config(setup, out, *extra):
    cfg, _ = train.parse_config(train.TrainConfig, [f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}",
                                                    f"--out_dir={out}", *BASE, *extra])
    return cfg


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_falls(setup, tmp_path):
    s = train.train(config(setup, tmp_path, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=15"),
                    log=lambda *a: None)
    evals = [m for m in metrics(tmp_path) if "val_loss" in m]
    assert [m["iter"] for m in evals] == [0, 15, 30]
    assert len({m["teacher_val_loss"] for m in evals}) == 1      # the teacher on the same batches, once
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    steps = [m for m in metrics(tmp_path) if "loss" in m]
    assert steps[-1]["loss"] < steps[0]["loss"] and {"loss_ce", "loss_kd", "lr", "tokens_per_s"} <= set(steps[0])
    assert s["iter"] == 30
    student, meta = checkpoint.load_student(tmp_path / "ckpt")       # krony_to_gpt.py's input
    assert len(meta["factors"]) == 4
    sys.path.insert(0, str(ROOT / "scripts"))
    import plots
    png = plots.plot_runs([str(tmp_path)], str(tmp_path / "loss.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_needs_no_network(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    s = train.train(config(setup, tmp_path, "--max_iters=1", "--lr_decay_iters=1", "--eval_interval=1",
                           "--wandb_log=True", "--wandb_mode=offline"), log=lambda *a: None)
    assert s["iter"] == 1 and os.path.isdir(tmp_path / "wandb")


def test_resume_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    args = ("--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4")
    full = train.train(config(setup, tmp_path / "a", *args), log=lambda *a: None)
    real = train.get_batch
    monkeypatch.setattr(train, "get_batch", ctrl_c_at(train, 5, micro=1))    # Ctrl-C in the middle of step 5
    with pytest.raises(KeyboardInterrupt):                      # never returns as if it had finished
        train.train(config(setup, tmp_path / "b", *args), log=lambda *a: None)
    # the step under way completes, then the save: the checkpoint holds steps 0..5 and says so
    assert json.load(open(tmp_path / "b" / "ckpt" / "train_state.json"))["iter_num"] == 6
    monkeypatch.setattr(train, "get_batch", real)
    second = train.train(config(setup, tmp_path / "b", *args, "--init_from=resume"), log=lambda *a: None)
    assert second["iter"] == 8
    assert second["val"] == full["val"] and second["loss"] == full["loss"]
    a, _ = checkpoint.load_student(tmp_path / "a" / "ckpt")
    b, _ = checkpoint.load_student(tmp_path / "b" / "ckpt")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    untimed = lambda ms: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "ms_per_iter", "peak_mem_gb")} for m in ms]
    assert untimed(metrics(tmp_path / "a")) == untimed(metrics(tmp_path / "b"))   # the resumed log replaces, not repeats


def test_sigterm_and_a_second_ctrl_c_during_the_save(setup, tmp_path, monkeypatch):
    """SIGTERM (a batch scheduler's stop) is Ctrl-C: the step completes, the checkpoint is saved,
    exit status 143. A second signal during that save does not cut it short; resume is exact."""
    args = ("--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3")
    full = train.train(config(setup, tmp_path / "a", *args), log=lambda *a: None)
    real_get, real_write = train.get_batch, checkpoint.write_student
    term = ctrl_c_at(train, 4, signal.SIGTERM, micro=1)
    sent = []

    def get_batch(data, block_size, batch_size, seed, it, m, device):
        sent.append(it == 4 and m == 1)
        return term(data, block_size, batch_size, seed, it, m, device)

    def impatient(model, directory, cfg):
        if any(sent):
            os.kill(os.getpid(), signal.SIGINT)         # Ctrl-C while the interrupt's save is under way
        real_write(model, directory, cfg)
    monkeypatch.setattr(train, "get_batch", get_batch)
    monkeypatch.setattr(checkpoint, "write_student", impatient)
    argv = [f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", f"--out_dir={tmp_path / 'b'}", *BASE, *args]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert train.main(argv) == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers     # restored
    assert json.load(open(tmp_path / "b" / "ckpt" / "train_state.json"))["iter_num"] == 5
    monkeypatch.setattr(train, "get_batch", real_get)
    monkeypatch.setattr(checkpoint, "write_student", real_write)
    again = train.train(config(setup, tmp_path / "b", *args, "--init_from=resume"), log=lambda *a: None)
    assert again["val"] == full["val"] and again["loss"] == full["loss"]


def test_two_fresh_runs_are_identical(setup, tmp_path, monkeypatch):
    """impl="auto" chooses each factored layer's implementation by timing, and the candidates differ
    in the last bits; the choices are kept per machine (impl_cache), so a second fresh run with the
    same seed computes exactly as the first, even when its own timings would choose otherwise."""
    import random
    import autotune
    args = ("--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", f"--impl_cache={tmp_path / 'impls.json'}")
    autotune.IMPL_CACHE.clear()
    first = train.train(config(setup, tmp_path / "a", *args), log=lambda *a: None)
    autotune.IMPL_CACHE.clear()                                # as in a new process
    noise = random.Random(0)
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: noise.random())   # timings that mean nothing
    second = train.train(config(setup, tmp_path / "b", *args), log=lambda *a: None)
    assert first == second
    a, _ = checkpoint.load_student(tmp_path / "a" / "ckpt")
    b, _ = checkpoint.load_student(tmp_path / "b" / "ckpt")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A run of 2 steps, to be copied and damaged."""
    d = tmp_path_factory.mktemp("finished")
    train.train(config(setup, d, "--max_iters=2", "--lr_decay_iters=8", "--eval_interval=2"), log=lambda *a: None)
    return d


def foreign_optimizer(ckpt):
    from safetensors.torch import load_file, save_file
    t = load_file(ckpt / "optimizer.safetensors")
    save_file({k: (v[..., :1].contiguous() if k.startswith("state.") and v.dim() else v) for k, v in t.items()},
              ckpt / "optimizer.safetensors")


@pytest.mark.parametrize("damage, message", [
    (lambda c: os.remove(c / "optimizer.safetensors"), "cannot be resumed"),
    (lambda c: open(c / "optimizer.safetensors", "r+b").truncate(100), "cannot be resumed"),
    (lambda c: os.remove(c / "train_state.json"), "cannot be resumed"),
    (lambda c: open(c / "train_state.json", "r+b").truncate(20), "cannot be resumed"),
    (foreign_optimizer, "does not fit the student"),
    (lambda c: (c.parent / "metrics.jsonl").write_text("{oops\n" + (c.parent / "metrics.jsonl").read_text()),
     "metrics.jsonl line 1 is not a metrics record")], ids=["no-optimizer", "cut-optimizer", "no-state",
                                                          "cut-state", "foreign-optimizer", "metrics"])
def test_a_damaged_run_is_refused_in_one_line(setup, finished, tmp_path, damage, message, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run / "ckpt")
    argv = [f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", f"--out_dir={run}", *BASE,
            "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=2", "--init_from=resume"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and str(run) in err
    checkpoint.load_student(run / "ckpt")                      # the weights are untouched


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_checkpoint(setup, finished, tmp_path, monkeypatch, capsys):
    import errno
    import shutil
    from safetensors import SafetensorError
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = (run / "ckpt" / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise SafetensorError(f"Error while serializing: IoError({os.strerror(errno.ENOSPC)})")
    monkeypatch.setattr(checkpoint, "save_file", full)
    argv = [f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", f"--out_dir={run}", *BASE,
            "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=2", "--init_from=resume"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "left as it was" in err and "Traceback" not in err
    assert (run / "ckpt" / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(run) if p.startswith(".")]


def test_a_metrics_record_cut_off_by_a_kill_is_dropped(setup, finished, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 2, "lo')
    s = train.train(config(setup, run, "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=2",
                           "--init_from=resume"), log=lambda *a: None)
    assert s["iter"] == 4 and all("iter" in m for m in metrics(run))


def test_resume_from_an_evaluation_checkpoint(setup, tmp_path):
    args = ("--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4")
    full = train.train(config(setup, tmp_path / "a", *args), log=lambda *a: None)
    train.train(config(setup, tmp_path / "b", "--max_iters=4", *args[1:]), log=lambda *a: None)
    again = train.train(config(setup, tmp_path / "b", *args, "--init_from=resume"), log=lambda *a: None)
    assert again["val"] == full["val"] and again["loss"] == full["loss"]
    untimed = lambda ms: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "ms_per_iter", "peak_mem_gb")} for m in ms]
    assert untimed(metrics(tmp_path / "a")) == untimed(metrics(tmp_path / "b"))


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    train.train(config(setup, tmp_path, "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=4"), log=lambda *a: None)
    real = checkpoint.write_student

    def dies(model, directory, cfg):
        real(model, directory, cfg)
        raise OSError("killed during the save")
    monkeypatch.setattr(checkpoint, "write_student", dies)
    with pytest.raises(OSError, match="killed"):
        train.train(config(setup, tmp_path, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4",
                           "--init_from=resume"), log=lambda *a: None)
    monkeypatch.setattr(checkpoint, "write_student", real)
    checkpoint.load_student(tmp_path / "ckpt")
    assert json.load(open(tmp_path / "ckpt" / "train_state.json"))["iter_num"] == 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    # killed between the two renames of a system without an atomic exchange: ckpt/ is missing and the
    # complete new version sits beside it; resume puts it back and goes on
    os.rename(tmp_path / "ckpt", tmp_path / ".ckpt.tmp-killed")
    s = train.train(config(setup, tmp_path, "--max_iters=6", "--lr_decay_iters=8", "--eval_interval=4",
                           "--init_from=resume"), log=lambda *a: None)
    assert s["iter"] == 6 and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_nan_stops_without_saving(setup, tmp_path, monkeypatch):
    train.train(config(setup, tmp_path, "--max_iters=2", "--lr_decay_iters=8", "--eval_interval=2"), log=lambda *a: None)
    before = open(tmp_path / "ckpt" / "model.safetensors", "rb").read()
    real = train.distill_loss
    monkeypatch.setattr(train, "distill_loss", lambda *a: (lambda l, p: (l * float("nan"), {k: v * float("nan") for k, v in p.items()}))(*real(*a)))
    with pytest.raises(train.TrainingError, match="the last good checkpoint"):
        train.train(config(setup, tmp_path, "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=2",
                           "--init_from=resume"), log=lambda *a: None)
    assert open(tmp_path / "ckpt" / "model.safetensors", "rb").read() == before


def test_a_diverging_run_never_saves_what_scores_nan(setup, tmp_path):
    """A learning rate of 1e9 with an evaluation (and, by default, a save) at every step: the run
    stops with an error, and the checkpoint left is one whose held-out loss is finite."""
    train.train(config(setup, tmp_path, "--max_iters=2", "--lr_decay_iters=8", "--eval_interval=2"), log=lambda *a: None)
    with pytest.raises(train.TrainingError, match="kept"):
        train.train(config(setup, tmp_path, "--max_iters=8", "--learning_rate=1e9", "--decay_lr=False",
                           "--eval_interval=1", "--init_from=resume", "--allow_config_change=True"), log=lambda *a: None)
    student, _ = checkpoint.load_student(tmp_path / "ckpt")
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
    x = torch.from_numpy(np.fromfile(setup / "data" / "val.bin", dtype=np.uint16)[:17].astype(np.int64))
    assert np.isfinite(student(x[None, :-1], x[None, 1:]).loss.item())


def test_multistep_and_every_loss_term(setup, tmp_path):
    s = train.train(config(setup, tmp_path, TWO_STAGES, "--preset=None", "--max_iters=4", "--lr_decay_iters=4",
                           "--eval_interval=2", "--hidden_weight=1", "--attn_weight=1", "--temperature=2"),
                    log=lambda *a: None)
    assert s["iter"] == 4
    _, meta = checkpoint.load_student(tmp_path / "ckpt")
    assert {n: (e.m1, e.n1, e.r) for n, e in meta["factors"].items()} == {
        "wte": (50257, 8, 1), "h.0.mlp.c_fc": (16, 4, 1), "h.1.mlp.c_fc": (16, 4, 1)}
    step = [m for m in metrics(tmp_path) if "loss" in m][-1]
    assert all(np.isfinite(step[f"loss_{k}"]) for k in ("ce", "kd", "hidden", "attn"))


def run_train(*args, env=None):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})))


@pytest.mark.slow
def test_config_errors_and_help(setup, tmp_path):
    p = run_train("--max_iter=5")
    assert p.returncode == 2 and "unknown key 'max_iter'" in p.stderr and "max_iters" in p.stderr
    p = run_train("--learning_rate=fast")
    assert p.returncode == 2 and "learning_rate must be float" in p.stderr
    p = run_train("-h")
    assert p.returncode == 0 and "--gradient_accumulation_steps=" in p.stdout and "--kd_weight=" in p.stdout
    p = run_train(f"--teacher={setup / 'teacher'}", f"--dataset={tmp_path / 'nothing'}", *BASE)
    assert p.returncode == 1 and "python data/owt/prepare.py" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "c.py"
    bad.write_text("import os\n")
    p = run_train(str(bad))
    assert p.returncode == 2 and "literal values only" in p.stderr


@pytest.mark.parametrize("bad, message", [("--grad_clip=-1", "grad_clip must be non-negative"),
                                          ("--warmup_iters=-5", "warmup_iters must be non-negative"),
                                          ("FILE:weight_decay = 1e999", "weight_decay must be a finite number"),
                                          ("--min_lr=-1e999", "min_lr must be a finite number"),
                                          ("--beta2=1", "beta2 must be in"),
                                          ("--device=tpu", "not one of auto, cpu, cuda"),
                                          ("--device=cuda:9", "CUDA device")])
def test_bad_values_are_refused_before_any_work(setup, tmp_path, capsys, bad, message):
    files = []
    if bad.startswith("FILE:"):
        (tmp_path / "c.py").write_text(bad[5:] + "\n")
        files, bad = [str(tmp_path / "c.py")], "--max_iters=2"
    argv = [*files, f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", f"--out_dir={tmp_path / 'run'}",
            *BASE, "--max_iters=2", bad]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_gloo_processes_match_one_across_stages(setup, tmp_path):
    """Multi-step compression under DDP: the second stage's new factors must be registered with DDP
    (re-wrapped), or each rank trains them on its own half of the batch: the run then fails its
    end-of-training check that every rank holds the same weights, and differs from one process."""
    args = [f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", *BASE, TWO_STAGES, "--preset=None",
            "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2"]
    one = run_train(*args, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args, f"--out_dir={tmp_path / 'two'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    meta = assert_same_runs(tmp_path / "one", tmp_path / "two")
    assert "wte" in meta["factors"]                                        # the second stage ran


def test_attention_distillation_alone(setup, tmp_path):
    """attn_weight > 0 with hidden_weight = 0 (it used to crash on the missing hidden states)."""
    s = train.train(config(setup, tmp_path, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2",
                           "--kd_weight=0", "--ce_weight=0", "--attn_weight=1"), log=lambda *a: None)
    assert s["iter"] == 2 and np.isfinite(s["loss"])
    step = [m for m in metrics(tmp_path) if "loss" in m][-1]
    assert set(k for k in step if k.startswith("loss_")) == {"loss_attn"}


def test_cross_entropy_only_when_weighted(setup, tmp_path, monkeypatch):
    """The full-vocabulary cross-entropy is computed once per position when ce_weight > 0 (through
    F.cross_entropy, or F.nll_loss on the KL's own log-softmax at T = 1), and not at all in training
    steps when ce_weight = 0 (the forward no longer gets the targets)."""
    import torch.nn.functional as F
    rows = []
    for name in ("cross_entropy", "nll_loss"):
        real = getattr(F, name)

        def counting(input, *a, _real=real, **kw):
            rows.append(input.reshape(-1, input.shape[-1]).shape[0])
            return _real(input, *a, **kw)
        monkeypatch.setattr(F, name, counting)
    per_step = 2 * 4 * 16                                  # accumulation x batch x block
    for ce, want in (("0", 0), ("1", per_step)):
        cfg = config(setup, tmp_path / ce, "--max_iters=1", "--lr_decay_iters=1", "--eval_interval=1000",
                     f"--ce_weight={ce}")
        run = train.setup(cfg, lambda *a: None)
        train.prepare(run)
        rows.clear()
        train.train_step(run, 0)
        assert sum(rows) == want, ce


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "config").glob("*.py") if p.name != "recipe_common.py"))
def test_every_shipped_config_validates(name):
    files = ([str(ROOT / "config" / "recipe_common.py")] if name.startswith("recipe_") else []) + [str(ROOT / "config" / name)]
    cfg, _ = train.parse_config(train.TrainConfig, files)
    train.validate(cfg)
    train.stages_of(cfg)
    if name == "train_gpt2.py":          # at most 1B tokens, and no more than one pass of its 10% slice
        tokens = cfg.max_iters * cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        assert tokens <= 0.1 * 9.04e9 and cfg.lr_decay_iters == cfg.max_iters


@pytest.mark.slow
def test_compile_after_the_implementations_are_fixed(setup, tmp_path):
    """compile=True: the implementations are chosen in an eager forward and backward (training) and
    a forward (eval), fixed, and only then compiled: the traced graph has no timing code (no graph
    breaks) and computes what eager does, forward and backward."""
    import torch._dynamo
    cfg = config(setup, tmp_path, "--max_iters=1", "--lr_decay_iters=1", "--compile=True", "--preset=kngpt2-like")
    run = train.setup(cfg, lambda *a: None)
    train.prepare(run)
    layers = [m for m in run.student.modules() if isinstance(m, train.model_lib.KronLinear)]
    assert layers and all(set(m.fixed) == {True, False} for m in layers)
    x, _ = get_batch(run.train_data, 16, 4, 0, 0, 0, "cpu")
    torch._dynamo.reset()
    assert torch._dynamo.explain(run.student)(x).graph_break_count == 0
    eager = run.student(x, return_hidden=True)
    (eager.logits.square().mean() + eager.hidden[-1].square().mean()).backward()
    want = {n: p.grad.clone() for n, p in run.student.named_parameters()}
    run.student.zero_grad()
    out = run.model(x, return_hidden=True)
    (out.logits.square().mean() + out.hidden[-1].square().mean()).backward()
    assert torch.allclose(out.logits, eager.logits, rtol=1e-4, atol=1e-5)
    for n, p in run.student.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-3, atol=1e-6), n


def test_scratch_keeps_the_factored_shapes_with_random_factors(setup, tmp_path):
    """init_from=scratch: the decomposed student's architecture, GPT-2's random init (residual
    projections scaled by 1/sqrt(2 n_layer)), nothing taken from the teacher's weights."""
    train.train(config(setup, tmp_path / "vl", "--max_iters=1", "--lr_decay_iters=1", "--eval_interval=1"),
                log=lambda *a: None)
    s = train.train(config(setup, tmp_path / "rnd", "--init_from=scratch", "--max_iters=1", "--lr_decay_iters=1",
                           "--eval_interval=1"), log=lambda *a: None)
    vl, meta_vl = checkpoint.load_student(tmp_path / "vl" / "ckpt")
    rnd, meta = checkpoint.load_student(tmp_path / "rnd" / "ckpt")
    shapes = lambda f: {n: replace(e, init="") for n, e in f.items()}
    assert shapes(meta["factors"]) == shapes(meta_vl["factors"]) and s["iter"] == 1
    assert {e.init for e in meta["factors"].values()} == {"random"}
    for name in meta["factors"]:
        a, b = rnd.get_matrix(name).dense_weight(), vl.get_matrix(name).dense_weight()
        assert (a - b).norm() > 0.5 * b.norm()                   # nothing of the teacher's weights
    L = rnd.config.n_layer
    fc, proj = rnd.get_matrix("h.0.mlp.c_fc").dense_weight(), rnd.get_matrix("h.0.mlp.c_proj").dense_weight()
    assert 0.01 < fc.std().item() < 0.04 and 0.5 < proj.std().item() / (fc.std().item() / np.sqrt(2 * L)) < 2


def test_scratch_dense_of_any_shape(setup, tmp_path):
    with pytest.raises(train.ConfigError, match="init_from=scratch and preset=None"):
        train.validate(config(setup, tmp_path, "--n_layer=1"))
    cfg = config(setup, tmp_path, "--init_from=scratch", "--preset=None", "--n_layer=1", "--n_embd=8",
                 "--n_head=2", "--max_iters=12", "--lr_decay_iters=12", "--eval_interval=12")
    train.train(cfg, log=lambda *a: None)
    student, meta = checkpoint.load_student(tmp_path / "ckpt")
    c = student.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_inner, c.vocab_size) == (1, 2, 8, 32, 50257) and not meta["factors"]
    evals = [m for m in metrics(tmp_path) if "val_loss" in m]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    with pytest.raises(ValueError, match="differ in n_embd"):          # hidden states need the teacher's width
        train.train(config(setup, tmp_path / "h", "--init_from=scratch", "--preset=None", "--n_embd=8",
                           "--hidden_weight=1", "--max_iters=1"), log=lambda *a: None)


def test_whiten_init_calibrates_on_the_training_split(setup, tmp_path):
    """Stage 0's whiten factors are those of calibrating the teacher on calib_tokens of train.bin
    (seeded, so the same); a later whiten stage calibrates the student as trained so far."""
    import compress
    from model import GPT
    stages = ('--stages=[{"iters": 2, "rules": [{"kinds": ["mlp.c_fc"], "b": [4, 2], "init": "whiten"}]},'
              '{"iters": 2, "rules": [{"kinds": ["mlp.c_proj"], "b": [2, 4], "init": "whiten"}]}]')
    cfg = config(setup, tmp_path, stages, "--preset=None", "--calib_tokens=64", "--max_iters=4", "--lr_decay_iters=4")
    tokens = load_tokens(str(setup / "data"), "train")
    _, student, plan, _ = train.load_models(cfg, lambda *a: None, True, tokens)
    teacher, _ = GPT.from_pretrained(str(setup / "teacher"))
    covs = compress.calibrate(teacher, tokens, list(plan), n_tokens=64, progress=False)
    compress.decompose(teacher, plan, compare=(), progress=False, covs=covs)
    for name in plan:
        assert torch.allclose(student.get_matrix(name).A, teacher.get_matrix(name).A, atol=1e-6), name
    with pytest.raises(train.ConfigError, match="needs the training tokens"):
        train.load_models(cfg, lambda *a: None, True)
    out = tmp_path / "two"
    train.train(config(setup, out, stages, "--preset=None", "--max_iters=4", "--lr_decay_iters=4",
                       "--calib_tokens=64", "--eval_interval=2"), log=lambda *a: None)
    _, meta = checkpoint.load_student(out / "ckpt")
    assert sorted(meta["factors"]) == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert all(e.init == "whiten" for e in meta["factors"].values())


def test_a_fresh_run_never_replaces_a_run(setup, tmp_path):
    """A fresh run into a folder that holds a run is refused before any work, the run left whole;
    --overwrite=True starts over; a folder's ckpt/ that is not a run's checkpoint is refused even then."""
    train.train(config(setup, tmp_path / "a", "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"),
                log=lambda *a: None)
    before = {f: open(tmp_path / "a" / "ckpt" / f, "rb").read() for f in os.listdir(tmp_path / "a" / "ckpt")}
    lines = metrics(tmp_path / "a")
    with pytest.raises(checkpoint.CheckpointError, match="already holds a training run.*--init_from=resume.*--overwrite"):
        train.train(config(setup, tmp_path / "a", "--max_iters=2", "--lr_decay_iters=2"), log=lambda *a: None)
    assert {f: open(tmp_path / "a" / "ckpt" / f, "rb").read() for f in os.listdir(tmp_path / "a" / "ckpt")} == before
    assert metrics(tmp_path / "a") == lines
    s = train.train(config(setup, tmp_path / "a", "--max_iters=1", "--lr_decay_iters=1", "--eval_interval=1",
                           "--overwrite=True"), log=lambda *a: None)
    assert s["iter"] == 1 and max(m["iter"] for m in metrics(tmp_path / "a")) == 1
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    (tmp_path / "b" / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError, match="did not write"):
        train.train(config(setup, tmp_path / "b", "--max_iters=1", "--overwrite=True"), log=lambda *a: None)
    assert (tmp_path / "b" / "ckpt" / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_run_only_at_its_first_save(setup, tmp_path, monkeypatch):
    """--overwrite=True keeps the old run whole (checkpoint and metrics) until the new run's first
    save: a new run stopped before it leaves the old one resumable as it was; one that saves leaves
    only its own records (none of the old run's, its iteration 0 included)."""
    out = tmp_path / "a"
    train.train(config(setup, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2"), log=lambda *a: None)
    old_ckpt = {f: (out / "ckpt" / f).read_bytes() for f in os.listdir(out / "ckpt")}
    old_lines = metrics(out)
    monkeypatch.setattr(train, "get_batch", ctrl_c_at(train, 1))       # stopped during the new run's step 1...

    def killed_on_save(*a, **k):                                        # ...and killed before its save
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_run", killed_on_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(config(setup, out, "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--seed=7",
                           "--overwrite=True"), log=lambda *a: None)
    monkeypatch.undo()
    assert {f: (out / "ckpt" / f).read_bytes() for f in os.listdir(out / "ckpt")} == old_ckpt
    assert metrics(out) == old_lines
    s = train.train(config(setup, out, "--max_iters=6", "--lr_decay_iters=4", "--eval_interval=2",
                           "--init_from=resume"), log=lambda *a: None)
    assert s["iter"] == 6 and [m["iter"] for m in metrics(out) if "val_loss" in m] == [0, 2, 4, 6]
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    train.train(config(setup, out, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--seed=7",
                       "--overwrite=True"), log=lambda *a: None)
    new = metrics(out)
    assert [m["iter"] for m in new if "val_loss" in m] == [0, 2] and new[0]["val_loss"] != old_lines[0]["val_loss"]


def test_a_first_save_whose_metrics_move_was_cut_short_is_completed(setup, tmp_path, monkeypatch):
    out = tmp_path / "a"
    train.train(config(setup, out, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"), log=lambda *a: None)
    real_replace = os.replace

    def killed_before_the_move(src, dst):
        if str(dst).endswith("metrics.jsonl") and ".metrics-" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_before_the_move)
    with pytest.raises(KeyboardInterrupt):
        train.train(config(setup, out, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--seed=7",
                           "--overwrite=True"), log=lambda *a: None)
    monkeypatch.undo()
    run_id = json.load(open(out / "ckpt" / "train_state.json"))["run_id"]
    assert (out / f".metrics-{run_id}.jsonl").exists()              # the new checkpoint, the old metrics
    train.train(config(setup, out, "--max_iters=3", "--lr_decay_iters=2", "--eval_interval=2", "--seed=7",
                       "--init_from=resume"), log=lambda *a: None)
    assert [m["iter"] for m in metrics(out) if "val_loss" in m] == [0, 2, 3]
    assert all(m.get("train_loss", 0) >= 0 for m in metrics(out)) and not list(out.glob(".metrics-*"))


def test_resume_with_another_configuration_is_refused_unless_asked(setup, tmp_path):
    out = tmp_path / "a"
    train.train(config(setup, out, "--max_iters=2", "--lr_decay_iters=4", "--eval_interval=2"), log=lambda *a: None)
    before = (out / "ckpt" / "model.safetensors").read_bytes()
    for change in ("--batch_size=2", "--block_size=8", "--learning_rate=1e-3", "--seed=1", "--kd_weight=0.5",
                   f"--dataset={tmp_path}"):
        with pytest.raises(train.TrainingError, match=f"another configuration.*{change[2:].split('=')[0]} .*-> "):
            train.train(config(setup, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume", change),
                        log=lambda *a: None)
    assert (out / "ckpt" / "model.safetensors").read_bytes() == before
    train.train(config(setup, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume",
                       "--log_interval=5"), log=lambda *a: None)        # reporting and max_iters may change
    train.train(config(setup, out, "--max_iters=6", "--lr_decay_iters=4", "--eval_interval=2", "--init_from=resume",
                       "--learning_rate=1e-3", "--allow_config_change=True"), log=lambda *a: None)
    hist = json.load(open(out / "ckpt" / "train_state.json"))["configs"]
    assert [h["from_iter"] for h in hist] == [0, 2, 4]
    assert [h["config"]["learning_rate"] for h in hist] == [3e-3, 3e-3, 1e-3]


@pytest.mark.slow
def test_one_process_writes_a_run_folder(setup, tmp_path):
    """A second train.py into a folder in use (a fresh run or a resume) is refused, naming the
    process; once that process is gone, killed or not, the folder is free."""
    out = tmp_path / "a"
    train.train(config(setup, out, "--max_iters=2", "--lr_decay_iters=4", "--eval_interval=2"), log=lambda *a: None)
    holder = subprocess.Popen([sys.executable, "-c", "import atomic, sys, time\n"
                               f"with atomic.folder_lock({str(out)!r}, 'train.py'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (["--init_from=resume"], ["--overwrite=True"]):
            p = run_train(f"--teacher={setup / 'teacher'}", f"--dataset={setup / 'data'}", f"--out_dir={out}", *BASE,
                          "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", *extra)
            assert p.returncode == 1 and f"in use by process {holder.pid} (train.py)" in p.stderr, p.stderr
    finally:
        holder.kill()
        holder.wait()
    s = train.train(config(setup, out, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2",
                           "--init_from=resume"), log=lambda *a: None)
    assert s["iter"] == 4 and not (out / ".lock").exists()


def test_the_teacher_defaults_to_the_checkpoints_and_another_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"teacher": str(teacher)}))
    cfg = train.TrainConfig(init_from=str(ck))
    assert train.teacher_of(cfg, {}) == str(teacher)
    same = os.path.relpath(teacher)                  # the same folder, typed relative to here
    assert train.teacher_of(replace(cfg, teacher=same), {}) == same
    with pytest.raises(train.TrainingError, match=f"made from the teacher {teacher}, not gpt2"):
        train.teacher_of(replace(cfg, teacher="gpt2"), {})
    assert train.teacher_of(replace(cfg, teacher="gpt2", allow_teacher_change=True), {}) == "gpt2"
    assert train.teacher_of(train.TrainConfig(), {}) == "gpt2"
    resumed = train.TrainConfig(init_from="resume")                # a resume: the run's own teacher
    assert train.teacher_of(resumed, {"config": {"teacher": str(teacher)}}) == str(teacher)


def test_every_config_is_checked_when_made():
    """TrainConfig checks itself: a value made by dataclasses.replace in a script is refused there."""
    with pytest.raises(train.ConfigError, match="batch_size must be at least 1"):
        replace(train.TrainConfig(), batch_size=0)
    with pytest.raises(train.ConfigError, match="beta2 must be in"):
        train.TrainConfig(beta2=1.0)
