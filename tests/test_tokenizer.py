"""A model with its own tokenizer, end to end: a byte-level BPE trained here (the `tokenizers`
library) and a tiny GPT-2 on it go through prepare, train, export, evaluate and sample with that
tokenizer; token files made by another tokenizer, or holding ids beyond the vocabulary, are refused
with messages that name both; GPT-2's tiktoken encoding exports as Hugging Face files that give
the same ids."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import tokenizer
import train
from data import load_tokens
from conftest import ROOT, SHARED

sys.path.insert(0, str(ROOT / "data" / "owt"))
import prepare  # noqa: E402

TIKTOKEN_CACHE = SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"
WORDS = ("the of and to in is was for on that with as by at from his he it an are were which this be or has "
         "had caf\u00e9 na\u00efve \u00fcber 1999 2024").split()


def documents(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))).capitalize() + "." for _ in range(n)]


def train_tokenizer(docs, vocab_size):
    """A byte-level BPE (GPT-2's scheme) with <|endoftext|> as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return GPT2TokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A teacher folder (random tiny GPT-2, vocabulary 300) with its own tokenizer's files, the
    documents as jsonl, a data folder in the layout of ../shared/data, and a second tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel
    d = tmp_path_factory.mktemp("own")
    docs = documents(240)
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    hf = train_tokenizer(docs, 300)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=len(hf),
                               bos_token_id=hf.eos_token_id, eos_token_id=hf.eos_token_id)).save_pretrained(d / "teacher")
    hf.save_pretrained(d / "teacher")
    train_tokenizer(documents(240, seed=1), 280).save_pretrained(d / "other_tok")
    w = d / "data" / "wikitext" / "wikitext-2-tokens" / "wiki.test.tokens"
    w.parent.mkdir(parents=True)
    w.write_text("\n".join(documents(12, seed=2)) + "\n", encoding="utf-8")
    return d


def test_prepare_writes_the_tokenizers_ids_and_records_it(own, tmp_path):
    c = prepare.prepare([str(own / "docs.jsonl")], str(tmp_path), val_last=20, tokenizer_src=str(own / "teacher"))
    tok = tokenizer.load(str(own / "teacher"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == tok.info() and meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 300
    docs = [json.loads(l)["text"] for l in open(own / "docs.jsonl")]
    val = tokenizer.token_file(str(tmp_path / "val.bin"))
    expect = [i for t in docs[-20:] for i in tok.encode(t) + [tok.eot]]
    assert val.tolist() == expect and c["val"] == len(expect) and meta["max_id"] < 300
    assert tok.decode(val[:len(tok.encode(docs[-20])) + 1].tolist()) == docs[-20] + "<|endoftext|>"


def test_prepare_train_export_evaluate_sample_with_its_own_tokenizer(own, tmp_path, capsys):
    data = tmp_path / "data"
    prepare.prepare([str(own / "docs.jsonl")], str(data), val_last=20, tokenizer_src=str(own / "teacher"))
    cfg, _ = train.parse_config(train.TrainConfig, [
        f"--teacher={own / 'teacher'}", f"--dataset={data}", f"--out_dir={tmp_path / 'run'}", "--preset=krony-81m",
        "--batch_size=2", "--block_size=16", "--gradient_accumulation_steps=1", "--max_iters=3", "--lr_decay_iters=3",
        "--warmup_iters=1", "--eval_interval=3", "--eval_iters=2", "--progress=False", "--device=cpu"])
    assert train.train(cfg, log=lambda *a: None)["iter"] == 3
    import krony_to_gpt
    import perplexity_eval
    import sample
    import scoring
    teacher_tok = tokenizer.load(str(own / "teacher"))
    for form, extra in (("dense", []), ("compact", ["--compact"])):
        assert krony_to_gpt.main([str(tmp_path / "run" / "ckpt"), str(tmp_path / form), *extra]) == 0
        assert tokenizer.load(str(tmp_path / form)).fingerprint() == teacher_tok.fingerprint()
    assert perplexity_eval.main([str(tmp_path / "dense"), "wiki2", "owt", "--data_dir", str(own / "data"),
                                 "--owt_bin", str(data / "val.bin"), "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    text = "\n\n".join(scoring.load_rows("wikitext-2-v1", str(own / "data")))
    assert out["tokenizer"]["fingerprint"] == teacher_tok.fingerprint()
    assert "(published)" not in capsys.readouterr().out         # GPT-2 per-token figures: another vocabulary
    assert out["results"]["kp"]["wiki2"]["tokens"] == len(teacher_tok.encode(text))
    assert out["results"]["kp"]["owt"]["tokens"] == len(tokenizer.token_file(str(data / "val.bin")))
    assert all(0 < r["bits_per_byte"] < 20 for r in out["results"]["kp"].values())
    model, _ = scoring.load_model(str(tmp_path / "compact"))
    texts = sample.sample(model, tokenizer.for_model(str(tmp_path / "compact"), 300), "The of", 1, 5, 1.0, 10, 0,
                          "cpu", torch.float32)
    assert texts[0].startswith("The of") and len(texts[0]) > len("The of")


def test_training_refuses_another_tokenizers_tokens(own, tmp_path):
    prepare.prepare([str(own / "docs.jsonl")], str(tmp_path / "data"), val_last=20,
                    tokenizer_src=str(own / "other_tok"))
    cfg, _ = train.parse_config(train.TrainConfig, [
        f"--teacher={own / 'teacher'}", f"--dataset={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}",
        "--batch_size=2", "--block_size=16", "--max_iters=1", "--progress=False", "--device=cpu"])
    with pytest.raises(ValueError, match=f"made by the tokenizer {own / 'other_tok'} .280 ids., not by "
                                         f"{own / 'teacher'} .300 ids."):
        train.train(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "ckpt").exists()
    import scoring
    with pytest.raises(scoring.DataError, match="made by the tokenizer"):
        scoring.owt_tokens(str(tmp_path / "data" / "val.bin"), tokenizer.load(str(own / "teacher")), 300)


def test_ids_beyond_the_vocabulary_refused(own, tmp_path):
    """A nanoGPT token file without meta.json: its ids are checked against the vocabulary."""
    (tmp_path / "data").mkdir()
    for split in ("train", "val"):
        np.arange(400, dtype=np.uint16).tofile(tmp_path / "data" / f"{split}.bin")
    cfg, _ = train.parse_config(train.TrainConfig, [
        f"--teacher={own / 'teacher'}", f"--dataset={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}",
        "--batch_size=2", "--block_size=16", "--max_iters=1", "--progress=False", "--device=cpu"])
    with pytest.raises(ValueError, match="ids up to 399 .tokenizer unknown., beyond the model's vocabulary of 300"):
        train.train(cfg, log=lambda *a: None)


def test_a_vocabulary_over_65536_is_stored_as_uint32(tmp_path):
    assert tokenizer.token_dtype(65536) == np.uint16 and tokenizer.token_dtype(65537) == np.uint32
    ids = np.array([0, 70000, 65536], dtype=np.uint32)
    ids.tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32", "max_id": 70000}))
    assert load_tokens(str(tmp_path), "train").tolist() == ids.tolist()
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    (tmp_path / "train.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a whole number of uint16 ids"):
        tokenizer.token_file(str(tmp_path / "train.bin"))
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(ValueError, match="dtype float32.*uint16 or uint32"):
        tokenizer.token_file(str(tmp_path / "train.bin"))


def test_token_bytes_count_the_text_exactly(own):
    tok = tokenizer.load(str(own / "teacher"))
    text = " ".join(documents(3, seed=5)) + " \u4f60\u597d \U0001F600"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes(320)[tok.eot] == 0 and len(tok.token_bytes(320)) == 320


@pytest.fixture
def tiktoken_cache(monkeypatch):
    if not (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").exists():
        pytest.skip(f"tiktoken cache not found at {TIKTOKEN_CACHE} (set KRONY_SHARED to the shared/ folder)")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


def test_gpt2_exports_as_files_that_give_tiktokens_ids(tiktoken_cache, tmp_path):
    """Without any Hugging Face files at hand, GPT-2's BPE is written from tiktoken's ranks; the
    written tokenizer gives tiktoken's ids on the WikiText-2 test text and on the probe."""
    enc = tokenizer.gpt2()
    back = tokenizer.save(enc, str(tmp_path), 1024)
    assert back.fingerprint() == enc.fingerprint() and back.vocab_size == 50257 and back.eot == 50256
    raw = SHARED / "data" / "wikitext" / "wikitext-2-raw" / "wiki.test.raw"
    text = raw.read_text(encoding="utf-8")[:200_000] if raw.exists() else tokenizer.PROBE * 50
    assert back.encode(text) == enc.encode(text)
    hf_dir = SHARED / "data" / "gpt2_tokenizer" / "hf"
    if hf_dir.exists():
        assert tokenizer.load(str(hf_dir)).fingerprint() == enc.fingerprint()


def test_export_refuses_a_tokenizer_path_that_is_not_one(tiktoken_cache, tiny_hf_dir, tmp_path):
    import compress
    import checkpoint
    from model import GPT
    m, _ = GPT.from_pretrained(tiny_hf_dir)
    plan = compress.resolve_spec({"rules": [{"kinds": ["mlp.c_fc"], "b": [2, 2], "r": 1}]}, m.config)
    compress.decompose(m, plan, progress=False)
    checkpoint.save_student(m, tmp_path / "ckpt", plan, {})
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "krony_to_gpt.py", str(tmp_path / "ckpt"), str(tmp_path / "out"),
                        "--tokenizer", str(tmp_path / "empty")], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert p.returncode == 1 and "holds no tokenizer" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_folders_code_is_never_run(own, tmp_path, monkeypatch):
    """A teacher folder whose config and tokenizer config name code of their own (auto_map, a
    model_type and tokenizer class transformers does not know): loading refuses with one line, and
    the folder's code never runs, even when the terminal would answer yes to transformers' question
    (trust_remote_code=False is passed everywhere)."""
    import builtins
    import shutil
    from model import GPT
    monkeypatch.setattr(builtins, "input", lambda *a: "y")
    d = tmp_path / "hostile"
    shutil.copytree(own / "teacher", d)
    ran = tmp_path / "ran"
    (d / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n"
                               "from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel\n"
                               "from transformers import GPT2TokenizerFast as EvilTok\n")
    for name, edit in (("config.json", {"model_type": "evilgpt", "auto_map": {
                            "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}),
                       ("tokenizer_config.json", {"tokenizer_class": "EvilTok", "auto_map": {
                            "AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]}})):
        (d / name).write_text(json.dumps(dict(json.loads((d / name).read_text()), **edit)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        GPT.from_pretrained(str(d))
    with pytest.raises(ValueError, match="no tokenizer could be loaded"):
        tokenizer.load(str(d))
    assert not ran.exists()


@pytest.mark.slow
def test_a_tokenizer_of_another_model_is_refused(tiktoken_cache):
    """Ids beyond the model's vocabulary, or another end-of-text id, mean another model's tokenizer
    (a GPT-2 vocabulary padded beyond its tokenizer is fine); the command scores nothing."""
    mini, bpe8k = SHARED / "teacher" / "owt-mini-gpt2", SHARED / "teacher" / "owt-6x256-bpe8k"
    if not (bpe8k / "tokenizer.json").exists() or not (mini / "config.json").exists():
        pytest.skip("reference teachers not found")
    with pytest.raises(ValueError, match="ends text with id 0, the model .* with 50256"):
        tokenizer.for_model(str(mini), 50257, str(bpe8k))
    with pytest.raises(ValueError, match="more than the model's vocabulary of 8192"):
        tokenizer.for_model(str(bpe8k), 8192, "gpt2")
    assert tokenizer.for_model(str(mini), 50304, "gpt2").eot == 50256   # padded to a multiple of 64
    assert tokenizer.for_model(str(bpe8k), 8192).eot == 0
    p = subprocess.run([sys.executable, "perplexity_eval.py", str(mini), "wiki2", "--tokenizer", str(bpe8k),
                        "--max_tokens", "256"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "not this model's tokenizer" in p.stderr and "ppl" not in p.stdout.lower()
