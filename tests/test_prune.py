"""Minitron-style width pruning (prune.py): the scores, the kept sub-networks, the budget search and
the plain GPT2LMHeadModel it exports, on the reference teacher and GPT-2 tokens of real text."""
import numpy as np
import pytest
import torch

import checkpoint
import prune
from conftest import SHARED
from model import GPT, count_params

OWT_VAL = SHARED / "data" / "openwebtext" / "owt10k_val_karpathy-nanoGPT-263b800d.bin"


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    model, hf = GPT.from_pretrained(teacher_dir)
    model.requires_grad_(False)
    return model, hf


@pytest.fixture(scope="module")
def tokens():
    if not OWT_VAL.exists():
        pytest.skip(f"{OWT_VAL} not found (set KRONY_SHARED to the shared/ folder)")
    return np.memmap(OWT_VAL, dtype=np.uint16, mode="r")[:200_000]


def full(model):
    """Scores that keep everything in place (descending by index, so topk keeps all)."""
    c = model.config
    return dict(emb=-torch.arange(c.n_embd, dtype=torch.float64),
                heads=-torch.arange(c.n_head, dtype=torch.float64).repeat(c.n_layer, 1),
                neurons=-torch.arange(c.n_inner, dtype=torch.float64).repeat(c.n_layer, 1))


def test_keeping_every_width_is_the_teacher(teacher):
    model, _ = teacher
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    same = prune.keep_width(model, full(model), model.config.n_embd, model.config.n_inner)
    torch.testing.assert_close(same(x).logits, model(x).logits, rtol=0, atol=0)


def test_pruned_neurons_are_the_teacher_without_their_columns(teacher):
    """MLP width alone: the pruned model computes what the teacher computes with the dropped neurons'
    c_proj columns zeroed (those neurons then write nothing)."""
    model, _ = teacher
    c = model.config
    scores = dict(full(model), neurons=torch.rand(c.n_layer, c.n_inner, dtype=torch.float64,
                                                  generator=torch.Generator().manual_seed(0)))
    keep = c.n_inner // 4
    small = prune.keep_width(model, scores, c.n_embd, keep)
    ref = GPT(c)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for l, block in enumerate(ref.transformer.h):
            drop = torch.topk(scores["neurons"][l], c.n_inner - keep, largest=False).indices
            block.mlp.c_proj.weight[:, drop] = 0
    x = torch.randint(0, c.vocab_size, (2, 32))
    torch.testing.assert_close(small(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert small.config.n_inner == keep and small.transformer.h[0].mlp.c_fc.weight.shape == (keep, c.n_embd)


def test_importance_ranks_a_silenced_neuron_and_head_last(teacher, tokens):
    model, _ = teacher
    m = GPT(model.config)
    m.load_state_dict(model.state_dict())
    hs = m.config.n_embd // m.config.n_head
    with torch.no_grad():
        m.transformer.h[1].mlp.c_fc.weight[7] = 0
        m.transformer.h[1].mlp.c_fc.bias[7] = 0              # GELU(0) = 0: neuron 7 never fires
        v = slice(2 * m.config.n_embd + 1 * hs, 2 * m.config.n_embd + 2 * hs)
        m.transformer.h[2].attn.c_attn.weight[v] = 0          # head 1's values are zero: its output too
        m.transformer.h[2].attn.c_attn.bias[v] = 0
    s = prune.importance(m, tokens, n_tokens=1024)
    assert s["neurons"][1, 7] == 0 and (s["neurons"][1, torch.arange(m.config.n_inner) != 7] > 0).all()
    assert s["heads"][2, 1] == 0 and (s["heads"][2, [0, 2, 3]] > 0).all()
    assert s["emb"].shape == (m.config.n_embd,) and (s["emb"] > 0).all()
    assert torch.equal(s["emb"], prune.importance(m, tokens, n_tokens=1024)["emb"])     # seeded: the same


def test_every_width_fits_its_budget_and_is_the_widest_mlp_that_does(teacher):
    model, _ = teacher
    target = round(0.95 * count_params(model)["hf"])        # the embedding is most of this teacher
    cands = prune.widths(model.config, target)
    assert [d for d, _ in cands] == list(range(model.config.n_embd, 0, -32))
    for d, f in cands:
        m = prune.keep_width(model, full(model), d, f)
        n = count_params(m)["hf"]
        assert n <= target and m.config.n_head == d // (model.config.n_embd // model.config.n_head)
        if f < model.config.n_inner:
            wider = prune.keep_width(model, full(model), d, f + prune.NEURON_STEP)
            assert count_params(wider)["hf"] > target


def test_prune_to_keeps_the_lowest_calibration_loss_and_exports_a_plain_gpt2(teacher, tokens, tmp_path):
    from transformers import GPT2LMHeadModel
    model, hf = teacher
    target = round(0.5 * count_params(model)["hf"])
    lines = []
    small = prune.prune_to(model, target, tokens, log=lines.append, n_tokens=1024)
    losses = [float(l.split("calibration loss ")[1].split()[0]) for l in lines if l.startswith("width")]
    assert len(losses) == len(prune.widths(model.config, target)) > 1
    assert abs(prune.calibration_loss(small, tokens, n_tokens=1024) - min(losses)) < 1e-4
    assert count_params(small)["hf"] <= target
    checkpoint.save_student(small, tmp_path / "ckpt", {}, hf)
    loaded, _ = checkpoint.load_student(tmp_path / "ckpt")
    checkpoint.export_dense(loaded, tmp_path / "dense", hf)
    out = GPT2LMHeadModel.from_pretrained(tmp_path / "dense")
    assert type(out) is GPT2LMHeadModel and out.config.n_embd == small.config.n_embd
    assert (out.config.n_inner or 4 * out.config.n_embd) == small.config.n_inner
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, small(x).logits, rtol=1e-4, atol=1e-4)


def test_a_llama_model_or_a_factored_one_is_refused(tiny_llama_dir, teacher):
    llama, _ = GPT.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="GPT-2's block"):
        prune.importance(llama, np.zeros(100, dtype=np.uint16))
    with pytest.raises(ValueError, match="multiple of the head size"):
        prune.keep_width(teacher[0], full(teacher[0]), 100, 64)
