"""Student checkpoints: safetensors + JSON only, exact round trips, and every refusal."""
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import atomic
import checkpoint
import compress
from checkpoint import CheckpointError
from model import GPT


@pytest.fixture(scope="module")
def student(tiny_hf_dir):
    """A tiny student with every kind of factored layer: permutations, scales, split q/k/v, wte."""
    m, hf_cfg = GPT.from_pretrained(tiny_hf_dir)
    spec = {"rules": [{"kinds": ["wte"], "b": [2, 2], "r": 2},
                      {"kinds": ["attn.q"], "layers": [1], "b": [2, 2], "r": 2, "scales": True},
                      {"kinds": ["mlp.c_fc", "mlp.c_proj"], "layers": [0], "b": [2, 2], "r": 2, "init": "perm"}]}
    plan = compress.resolve_spec(spec, m.config)
    compress.decompose(m, plan, progress=False)
    return m.eval(), plan, hf_cfg


def probe_logits(m):
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return m(idx)[0]


def test_round_trip_is_exact_and_pickle_free(student, tmp_path):
    m, plan, hf_cfg = student
    out = tmp_path / "ckpt"
    checkpoint.save_student(m, out, plan, hf_cfg, teacher="tiny")
    assert sorted(os.listdir(out)) == [atomic.MARKER, "config.json", "model.safetensors"]
    back, cfg = checkpoint.load_student(out)
    assert torch.equal(probe_logits(back.eval()), probe_logits(m))
    assert cfg["teacher"] == "tiny" and cfg["factors"]["h.0.mlp.c_proj"].cols is True
    sd = load_file(out / "model.safetensors")
    assert "transformer.h.1.attn.q.scales" in sd and "transformer.h.0.mlp.c_proj.cols" in sd
    assert not any(k.endswith(("row_inv", "col_inv")) for k in sd)     # derived, not stored


def test_a_checkpoint_from_before_the_scales_rename_loads(student, tmp_path):
    """Per-term scales were saved as "....s"; such a checkpoint loads to the same model."""
    m, plan, hf_cfg = student
    out = tmp_path / "ckpt"
    checkpoint.save_student(m, out, plan, hf_cfg)
    sd = load_file(out / "model.safetensors")
    old = {(k[:-len("scales")] + "s" if k.endswith(".scales") else k): v for k, v in sd.items()}
    assert len([k for k in old if k.endswith(".s")]) == len([k for k in sd if k.endswith(".scales")]) > 0
    save_file(old, out / "model.safetensors", metadata={"format": "pt"})
    back, _ = checkpoint.load_student(out)
    assert torch.equal(probe_logits(back.eval()), probe_logits(m))
    fresh = compress.build_student(back.config, compress.check_plan(
        {k: e.asdict() for k, e in compress.plan_of(m, plan).items()}, back.config))
    fresh.load_state_dict(old)                       # the layer itself takes the old name too
    assert torch.equal(probe_logits(fresh.eval()), probe_logits(m))


def corrupt(tmp_path, student, edit):
    m, plan, hf_cfg = student
    out = tmp_path / "ckpt"
    checkpoint.save_student(m, out, plan, hf_cfg)
    edit(out)
    return out


def edit_tensors(fn):
    def edit(out):
        sd = load_file(out / "model.safetensors")
        fn(sd)
        save_file(sd, out / "model.safetensors")
    return edit


def edit_config(fn):
    def edit(out):
        cfg = json.loads((out / "config.json").read_text())
        fn(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return edit


def truncate(out):
    p = out / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("edit,message", [
    (truncate, "truncated or corrupt"),
    (lambda out: (out / "model.safetensors").unlink(), "has no model.safetensors"),
    (edit_tensors(lambda sd: sd.pop("transformer.h.0.mlp.c_fc.A")), "missing tensors"),
    (edit_tensors(lambda sd: sd.update(extra=torch.zeros(1))), "unexpected tensors"),
    (edit_tensors(lambda sd: sd.update({"transformer.wte.A": torch.zeros(2, 4, 12)})), "wrong shapes"),
    (edit_tensors(lambda sd: sd.update({"transformer.h.0.mlp.c_proj.cols": torch.zeros(96, dtype=torch.long)})),
     "must be a permutation"),
    (edit_config(lambda c: c["factors"]["h.0.mlp.c_fc"].update(m1=24)), "wrong shapes"),
    (edit_config(lambda c: c["factors"]["h.0.mlp.c_fc"].update(m1=7)), "does not divide"),
    (edit_config(lambda c: c["factors"].update({"h.9.mlp.c_fc": c["factors"]["wte"]})), "not a matrix"),
    (edit_config(lambda c: c["gpt"].update(n_embd=32)), "wrong shapes|does not divide"),
    (edit_config(lambda c: c.update(model_type="gpt2")), "not a student checkpoint"),
    (edit_config(lambda c: c.update(format_version=99)), "format_version"),
    (lambda out: (out / "config.json").write_text("{oops"), "not valid JSON"),
    (lambda out: (out / "config.json").unlink(), "no config.json"),
])
def test_bad_checkpoints_are_refused(tmp_path, student, edit, message):
    out = corrupt(tmp_path, student, edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_student(out)


def test_plain_gpt2_directory_is_refused_with_a_hint(tiny_hf_dir):
    with pytest.raises(CheckpointError, match="GPT.from_pretrained"):
        checkpoint.load_student(tiny_hf_dir)


def test_failed_write_leaves_the_old_directory_intact(student, tmp_path):
    m, plan, hf_cfg = student
    out = tmp_path / "ckpt"
    checkpoint.save_student(m, out, plan, hf_cfg, note="first")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_dir(out, "student") as tmp:
            (open(os.path.join(tmp, "model.safetensors"), "wb")).write(b"partial")
            raise RuntimeError("disk full")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []        # no temporary left behind
    checkpoint.save_student(m, out, plan, hf_cfg, note="second")           # a complete write replaces it
    assert checkpoint.read_config(out)["note"] == "second"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_replacement_cut_between_its_renames_is_recovered(student, tmp_path, monkeypatch, exchange):
    """The swap is one atomic exchange where the system has it, so the directory never disappears;
    without it, a kill between the two renames (previous version parked, new one complete beside it)
    is repaired by the next writer, and killed writers' temporaries are cleaned up."""
    m, plan, hf_cfg = student
    out = tmp_path / "ckpt"
    checkpoint.save_student(m, out, plan, hf_cfg, note="first")
    if exchange:
        seen = []
        real = atomic.exchange
        monkeypatch.setattr(atomic, "exchange", lambda a, b: seen.append(real(a, b)) or seen[-1])
        checkpoint.save_student(m, out, plan, hf_cfg, note="second")
        if seen != [True]:
            pytest.skip("no atomic exchange on this system")
        assert checkpoint.read_config(out)["note"] == "second"
        assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
        return
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real_rename = os.rename

    def killed_after_first(src, dst):           # the first rename happens, then the writer dies
        real_rename(src, dst)
        if dst.endswith("x"):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_student(m, out, plan, hf_cfg, note="second")
    monkeypatch.setattr(os, "rename", real_rename)
    (tmp_path / ".ckpt.tmp-killed").mkdir()              # a save killed half-way, never completed
    assert not out.exists() and len([p for p in os.listdir(tmp_path) if p.startswith(".")]) == 3
    atomic.recover(out)
    assert checkpoint.read_config(out)["note"] == "second"              # the complete new version
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    checkpoint.save_student(m, out, plan, hf_cfg, note="third")


def test_foreign_directories_are_not_replaced(student, tmp_path):
    m, plan, hf_cfg = student
    other = tmp_path / "papers"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="something this toolkit did not write"):
        checkpoint.save_student(m, other, plan, hf_cfg)
    assert (other / "thesis.tex").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.save_student(m, tmp_path / "afile", plan, hf_cfg)


def test_only_our_own_output_of_the_same_kind_is_replaced(student, tiny_hf_dir, tmp_path):
    """A folder with a config.json is not thereby replaceable: a teacher copy, the command's own input,
    an export or a training run's checkpoint each stay as they are when a student is written over them."""
    import shutil
    m, plan, hf_cfg = student
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_hf_dir, teacher)
    before = {f: (teacher / f).read_bytes() for f in os.listdir(teacher)}
    with pytest.raises(CheckpointError, match="something this toolkit did not write"):
        checkpoint.save_student(m, teacher, plan, hf_cfg)
    with pytest.raises(CheckpointError, match="is an input of this command"):
        checkpoint.save_student(m, tmp_path / "new", plan, hf_cfg, inputs=(str(tmp_path / "new"),))
    assert {f: (teacher / f).read_bytes() for f in os.listdir(teacher)} == before
    checkpoint.export_dense(m, tmp_path / "export", hf_cfg)
    with pytest.raises(CheckpointError, match="holds a Hugging Face export, not a student checkpoint"):
        checkpoint.save_student(m, tmp_path / "export", plan, hf_cfg)
    with atomic.atomic_dir(tmp_path / "run", "run") as tmp:
        (open(os.path.join(tmp, "optimizer.safetensors"), "wb")).write(b"state")
    with pytest.raises(CheckpointError, match="holds a training run's checkpoint"):
        checkpoint.save_student(m, tmp_path / "run", plan, hf_cfg)
    assert (tmp_path / "run" / "optimizer.safetensors").read_bytes() == b"state"
    checkpoint.export_dense(m, tmp_path / "export", hf_cfg)                  # the same kind: replaced
    os.remove(tmp_path / "run" / atomic.MARKER)                         # written before the marker
    checkpoint.save_student(m, tmp_path / "old", plan, hf_cfg)
    os.remove(tmp_path / "old" / atomic.MARKER)
    checkpoint.save_student(m, tmp_path / "old", plan, hf_cfg)              # a student's config: a student
    with pytest.raises(CheckpointError, match="something this toolkit did not write"):
        checkpoint.save_student(m, tmp_path / "run", plan, hf_cfg)         # no config, no marker


def test_export_that_fails_its_check_leaves_the_old_one(student, tmp_path):
    m, plan, hf_cfg = student
    out = tmp_path / "export"
    checkpoint.export_compact(m, out, checkpoint.student_config(m, plan, hf_cfg))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def check(d):
        assert os.path.exists(os.path.join(d, "model.safetensors"))        # the new export, complete
        raise CheckpointError("does not reproduce the student")

    with pytest.raises(CheckpointError, match="does not reproduce"):
        checkpoint.export_compact(m, out, checkpoint.student_config(m, plan, hf_cfg), check=check)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_export_is_held_to_float32_rounding_not_an_absolute_bound(tmp_path, monkeypatch):
    """owt-6x256-bpe8k at krony-81m: the float32 student is 1.2e-4 from its own float64 self, so a
    correct dense export (1.9e-4 away) failed a fixed 1e-4 bound. The bound is now 4x that rounding;
    an export that is really off (one weight moved by 1e-2) is still refused and nothing is written."""
    import krony_to_gpt
    from conftest import SHARED
    bpe8k = SHARED / "teacher" / "owt-6x256-bpe8k"
    if not (bpe8k / "model.safetensors").exists():
        pytest.skip(f"reference teacher not found at {bpe8k}")
    m, hf_cfg = GPT.from_pretrained(str(bpe8k))
    plan = compress.resolve_spec(compress.load_spec("krony-81m"), m.config)
    compress.decompose(m, plan, progress=False)
    checkpoint.save_student(m, tmp_path / "ck", plan, hf_cfg, teacher=str(bpe8k))
    diff, _, _, _ = krony_to_gpt.convert(str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert diff["rounding"] > 0 and diff["diff"] < diff["tolerance"] == max(krony_to_gpt.TOLERANCE, 4 * diff["rounding"])
    real = GPT.to_hf_state_dict

    def off(self):
        sd = real(self)
        sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"] + 1e-2
        return sd
    monkeypatch.setattr(GPT, "to_hf_state_dict", off)
    with pytest.raises(CheckpointError, match="does not reproduce the student"):
        krony_to_gpt.convert(str(tmp_path / "ck"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_writers_remove_only_their_own_or_dead_writers_temporaries(student, tmp_path):
    """Names that are glob patterns match themselves only, and a live writer's temporary of the
    same output is left alone; a dead writer's is removed."""
    m, plan, hf_cfg = student
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        keep = [tmp_path / f".run1.tmp-{dead.pid}-a", tmp_path / f".other.tmp-{dead.pid}-b",
                tmp_path / f".run[1].tmp-{live.pid}-c", tmp_path / f".*.tmp-{live.pid}-d"]
        gone = [tmp_path / f".run[1].tmp-{dead.pid}-e", tmp_path / f".*.old-{dead.pid}-f"]
        for p in keep + gone:
            p.mkdir()
        checkpoint.save_student(m, tmp_path / "run[1]", plan, hf_cfg)
        checkpoint.save_student(m, tmp_path / "*", plan, hf_cfg)
        assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
        assert checkpoint.read_config(tmp_path / "*")["factors"] and checkpoint.read_config(tmp_path / "run[1]")
    finally:
        live.kill()
        live.wait()


def test_an_output_holding_or_inside_an_input_is_refused(student, tmp_path):
    m, plan, hf_cfg = student
    ck = tmp_path / "out" / "ckpt"
    checkpoint.save_student(m, ck, plan, hf_cfg)
    for out in (tmp_path / "out", tmp_path, ck / "sub", ck):
        with pytest.raises(CheckpointError, match="which is an input of this command"):
            checkpoint.save_student(m, out, plan, hf_cfg, inputs=(str(ck),))
    assert checkpoint.load_student(ck)[0] is not None and os.listdir(tmp_path) == ["out"]
    atomic.check_replaceable(tmp_path / "elsewhere", "student", inputs=(str(ck), "gpt2"))  # a hub name: not on disk
