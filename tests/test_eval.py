"""perplexity_eval.py: every protocol against a plain reference loop, every model form alike,
LAMBADA scored right where the answer is known, and clear errors for bad data."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import compress
import perplexity_eval
import scoring
import tokenizer
from conftest import ROOT, SHARED
from model import GPT, GPTConfig

TIKTOKEN_CACHE = SHARED / "data" / "gpt2_tokenizer" / "tiktoken_cache"
L = 32

WIKI = [" = Valkyria Chronicles = ", "", " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing game . ",
        " It was released in January 2011 in Japan , and is the third game in the series . ", "",
        " = = Gameplay = = ", "", " The game 's battle system , the BliTZ system , is carried over directly from the first game . ",
        " Troops are divided into five classes : Scouts , Shocktroopers , Engineers , Lancers and Armored Soldier . "]
PASSAGES = ["the dog ran to the dog dog", "she said hello and then hello hello", "my cat likes the red cat cat",
            "we went to paris and saw berlin", "it was a quiet night in the old house"]


@pytest.fixture(scope="module", autouse=True)
def tiktoken_offline():
    if not (TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").exists():
        pytest.skip(f"tiktoken cache not found at {TIKTOKEN_CACHE} (set KRONY_SHARED to the shared/ folder)")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)
    yield
    if old is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small data folder in the layout of ../shared/data."""
    d = tmp_path_factory.mktemp("data")
    text = "\n".join(WIKI * 6) + "\n"
    for rel in ("wikitext/wikitext-2-tokens/wiki.test.tokens", "wikitext/wikitext-103-tokens/wiki.test.tokens",
                "wikitext/wikitext-2-raw/wiki.test.raw"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text, encoding="utf-8")
    (d / "lambada").mkdir()
    (d / "lambada" / "lambada_test_plain_text.txt").write_text("\n".join(PASSAGES * 4) + "\n")
    (d / "lambada" / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    from datasets import Dataset
    Dataset.from_dict({"page": ["\n".join(WIKI[:5]) + "\n", "\n".join(WIKI * 3) + "\n"]}).save_to_disk(
        str(d / "wikitext/source_wikitext_document_level/wikitext-2-raw-v1/test"))
    return str(d)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, n_inner=64, vocab_size=50257, block_size=L))
    return m.eval()


def fwd(m):
    return lambda x: m(x)[0]


def reference_kp(m, ids):
    """Krony-PT's loop, plainly: windows of L at stride L, labels = inputs, mean of window means."""
    losses, counts = [], []
    for i in range(0, len(ids), L):
        x = torch.tensor(ids[i:i + L])[None]
        if x.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = m(x)[0]
        losses.append(F.cross_entropy(logits[0, :-1], x[0, 1:]).item())
        counts.append(x.shape[1] - 1)
    return math.exp(np.mean(losses)), math.exp(np.dot(losses, counts) / sum(counts))


def test_kp_equals_reference_loop(tiny, data_dir):
    res = scoring.evaluate(tiny, ["wiki2", "lambada"], "kp", data_dir, batch_size=3, cache_dir=None, progress=False)
    for ds, src in (("wiki2", "wikitext-2-v1"), ("lambada", "lambada-plain")):
        ids = tokenizer.gpt2().encode("\n\n".join(scoring.load_rows(src, data_dir)))
        ppl, weighted = reference_kp(tiny, ids)
        assert res[ds]["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert res[ds]["ppl_token_weighted"] == pytest.approx(weighted, rel=1e-5)
        assert res[ds]["tokens"] == len(ids) and res[ds]["windows"] == math.ceil(len(ids) / L) - (len(ids) % L == 1)


def test_bits_per_byte_is_the_scored_tokens_loss_over_their_bytes(tiny, data_dir):
    """Bits per byte from the same windows: the summed loss of the scored tokens over the UTF-8
    bytes of exactly those tokens (each window's first token is context, not scored)."""
    enc = tokenizer.gpt2()
    for protocol in ("kp", "hf"):
        res = scoring.evaluate(tiny, ["wiki2"], protocol, data_dir, cache_dir=None, progress=False)["wiki2"]
        src = "wikitext-2-v1" if protocol == "kp" else "wikitext-2-raw-v1"
        ids = enc.encode("\n\n".join(scoring.load_rows(src, data_dir)))
        scored = [t for b in range(0, len(ids), L) for t in ids[b + 1:b + L]]
        nbytes = len(b"".join(enc.tiktoken.decode_single_token_bytes(t) for t in scored))
        nll = math.log(res["ppl_token_weighted" if protocol == "kp" else "ppl"]) * len(scored)
        assert res["bytes"] == nbytes and res["scored"] == len(scored)
        assert res["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-6)


def test_rows_rebuilt_as_the_hub_holds_them(data_dir):
    rows = scoring.load_rows("wikitext-2-v1", data_dir)
    assert rows[0] == WIKI[0] + "\n" and rows[1] == "" and len(rows) == len(WIKI) * 6
    assert scoring.load_rows("lambada-plain", data_dir)[0] == PASSAGES[0]


def test_hf_at_full_stride_is_token_weighted_kp(tiny, data_dir):
    """On the same (raw) stream; kp's own stream, the non-raw text, is checked against the
    reference loop in test_kp_equals_reference_loop."""
    tok = tokenizer.gpt2()
    raw_kp = scoring.eval_kp(fwd(tiny), tok.encode("\n\n".join(scoring.load_rows("wikitext-2-raw-v1", data_dir))), L, 4, "cpu",
                        tok.token_bytes())
    hf = scoring.evaluate(tiny, ["wiki2"], "hf", data_dir, stride=L, cache_dir=None, progress=False)["wiki2"]
    assert hf["ppl"] == pytest.approx(raw_kp["ppl_token_weighted"], rel=1e-6)


@pytest.mark.parametrize("stride", [7, 16, 31])
def test_hf_sliding_window_equals_the_guides_loop(tiny, data_dir, tmp_path, stride):
    """The Hugging Face guide's loop, on transformers' own GPT2LMHeadModel of the same weights."""
    from transformers import AutoModelForCausalLM
    checkpoint.export_dense(tiny, tmp_path / "hf", {})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor(tokenizer.gpt2().encode("\n\n".join(scoring.load_rows("wikitext-2-raw-v1", data_dir))))[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + L, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n_valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == ids.size(1):
            break
    res = scoring.evaluate(tiny, ["wiki2"], "hf", data_dir, stride=stride, batch_size=5, cache_dir=None, progress=False)
    assert res["wiki2"]["ppl"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)
    assert res["wiki2"]["scored"] == ids.size(1) - 1 == n_tokens


@pytest.mark.slow
def test_three_model_forms_give_the_same_numbers(tiny, data_dir, tmp_path):
    m = GPT(tiny.config)
    m.load_state_dict(tiny.state_dict())
    plan = compress.resolve_spec({"rules": [{"kinds": ["mlp.c_fc", "mlp.c_proj"], "b": [2, 2], "r": 2}]}, m.config)
    compress.decompose(m, plan, progress=False)
    checkpoint.save_student(m, tmp_path / "ckpt", plan, {})
    import krony_to_gpt
    krony_to_gpt.convert(str(tmp_path / "ckpt"), str(tmp_path / "dense"))
    krony_to_gpt.convert(str(tmp_path / "ckpt"), str(tmp_path / "compact"), compact=True)
    results = []
    for form in ("ckpt", "dense", "compact"):
        model, kind = scoring.load_model(str(tmp_path / form))
        results.append(scoring.evaluate(model, ["wiki2"], "kp", data_dir, cache_dir=None, progress=False)["wiki2"]["ppl"])
    assert results[0] == results[2]
    assert results[1] == pytest.approx(results[0], rel=1e-5)


def copy_model(x, V=50257, peak=10.0):
    """Predicts the token it just read, with logit `peak` against 0 for every other token."""
    return peak * F.one_hot(x, V).float()


def test_lambada_scored_right_where_the_answer_is_known(data_dir):
    passages = scoring.load_rows("lambada-openai", data_dir)
    enc = tokenizer.gpt2()
    log_z = math.log(math.exp(10.0) + 50256)
    expect_ll, expect_hit = [], []
    for p in passages:
        ctx, word = p.rsplit(" ", 1)
        ctx_ids, tgt = enc.encode(ctx), enc.encode(p)[len(enc.encode(ctx)):]
        prev = [ctx_ids[-1]] + tgt[:-1]            # the copy model predicts each target from the token before it
        hits = [a == b for a, b in zip(prev, tgt)]
        expect_ll.append(sum((10.0 if h else 0.0) - log_z for h in hits))
        expect_hit.append(all(hits))
    assert expect_hit == [True, True, True, False, False]      # by construction of PASSAGES
    res = scoring.eval_lambada_harness(copy_model, passages, L, 2, "cpu", enc)
    assert res["acc"] == pytest.approx(0.6)
    assert res["ppl"] == pytest.approx(math.exp(-np.mean(expect_ll)), rel=1e-6)


def harness_rolling(tokens, max_len, eot=tokenizer.GPT2_EOT):
    """lm-evaluation-harness's get_rolling_token_windows(context_len=1) as (input, targets) lists."""
    out = [([eot] + tokens[:min(max_len, len(tokens)) - 1], tokens[:min(max_len, len(tokens))])]
    done = min(max_len, len(tokens))
    while done < len(tokens):
        pred = min(len(tokens) - done, max_len)
        end = done + pred
        out.append((tokens[end - max_len - 1:end - 1], tokens[end - pred:end]))
        done += pred
    return out


def test_wikitext_harness_equals_the_rolling_reference(tiny, data_dir):
    pages = scoring.load_rows("wikitext-docs", data_dir)
    enc = tokenizer.gpt2()
    nll = 0.0
    for page in pages:
        toks = enc.encode(scoring.wikitext_detokenizer(page))
        for inp, tgt in harness_rolling(toks, L):
            with torch.no_grad():
                logits = tiny(torch.tensor(inp)[None])[0][0]
            lp = F.log_softmax(logits[-len(tgt):], -1)
            nll -= lp[torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()
    words = sum(len(__import__("re").split(r"\s+", p)) for p in pages)
    nbytes = sum(len(p.encode()) for p in pages)
    res = scoring.eval_wikitext_harness(fwd(tiny), pages, L, 4, "cpu", enc)
    assert res["word_ppl"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / nbytes / math.log(2), rel=1e-5)
    assert scoring.wikitext_detokenizer(" role @-@ playing game . It") == " role-playing game. It"


def test_every_token_scored_once():
    for n in (1, 5, 32, 33, 100):
        wins = scoring.rolling_windows(n, L)
        scored = [t for b, e, f in wins for t in range(f, e)]
        assert scored == list(range(1, n + 1)) and all(e - 1 - b <= L for b, e, f in wins)
        for stride in (1, 10, L - 1):
            wins = scoring.hf_windows(n + 1, L, stride)
            assert [t for b, e, f in wins for t in range(f, e)] == list(range(1, n + 1))
        # at stride = L the guide's windows are disjoint and each one's first token goes unscored, as in kp
        hf = [t for b, e, f in scoring.hf_windows(n + 1, L, L) for t in range(f, e)]
        kp = [t for b, e, f in scoring.kp_windows(n + 1, L) for t in range(f, e)]
        assert hf == kp


def test_missing_and_malformed_data(tmp_path, data_dir):
    with pytest.raises(scoring.DataError, match="not found.*drop --data_dir to use the hub dataset Salesforce/wikitext"):
        scoring.load_rows("wikitext-103-v1", str(tmp_path))
    bad = tmp_path / "lambada"
    bad.mkdir()
    (bad / "lambada_test.jsonl").write_text('{"text": "fine passage"}\n{"txt": 1}\n')
    with pytest.raises(scoring.DataError, match="line 2 is not a JSON object"):
        scoring.load_rows("lambada-openai", str(tmp_path))
    w = tmp_path / "wikitext/wikitext-2-tokens"
    w.mkdir(parents=True)
    (w / "wiki.test.tokens").write_text("no final newline")
    with pytest.raises(scoring.DataError, match="malformed"):
        scoring.load_rows("wikitext-2-v1", str(tmp_path))
    with pytest.raises(scoring.DataError, match="data/owt/prepare.py"):
        scoring.owt_tokens(str(tmp_path / "val.bin"), tokenizer.gpt2(), 50257)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(scoring.DataError, match="not a whole number of uint16 ids"):
        scoring.owt_tokens(str(tmp_path / "odd.bin"), tokenizer.gpt2(), 50257)


@pytest.mark.slow
def test_command_line(tiny, data_dir, tmp_path):
    checkpoint.export_dense(tiny, tmp_path / "m", {})
    owt = tmp_path / "val.bin"
    np.arange(500, dtype=np.uint16).tofile(owt)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(TIKTOKEN_CACHE), HF_HUB_OFFLINE="1")
    run = lambda *a: subprocess.run([sys.executable, "perplexity_eval.py", *a], cwd=ROOT, capture_output=True,
                                    text=True, env=env, timeout=300)
    p = run(str(tmp_path / "m"), "wiki2", "lambada", "owt", "--data_dir", data_dir, "--owt_bin", str(owt),
            "--json", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr
    assert "Krony-PT 81M (published)" in p.stdout and "token-weighted" in p.stdout
    out = json.loads((tmp_path / "r.json").read_text())
    assert set(out["results"]["kp"]) == {"wiki2", "lambada", "owt"} and out["published"]["kp"]["GPT-2 124M"][0] == 29.16
    p = run(str(tmp_path / "m"), "lambada", "--data_dir", data_dir, "--json")       # no FILE: the JSON, printed
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["results"]["kp"]["lambada"] == out["results"]["kp"]["lambada"]
    p = run(str(tmp_path / "m"), "--json", "lambada")
    assert p.returncode == 2 and "that is a dataset" in p.stderr
    p = run(str(tmp_path / "m"), "wiki103", "--data_dir", str(tmp_path / "nowhere"))
    assert p.returncode == 1 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = run(str(tmp_path / "m"), "wiki5")
    assert p.returncode == 2 and "unknown dataset" in p.stderr


@pytest.mark.parametrize("args", [["--max_tokens", "0"], ["--max_tokens", "-3"], ["--stride", "0"], ["--block_size", "0"],
                                  ["--block_size", "1"], ["--batch_size", "0"], ["--batch_size", "-2"],
                                  ["--device", "tpu"], ["--device", "cuda:7"], ["--json", "/nonexistent/dir/r.json"]])
def test_bad_values_are_a_bad_command_line(tmp_path, args, capsys):
    """Refused before any model is loaded or any text scored (exit 2), never silently replaced by a default."""
    with pytest.raises(SystemExit) as e:
        perplexity_eval.main([str(tmp_path / "never-loaded"), "wiki2", *args])
    assert e.value.code == 2 and args[0] in capsys.readouterr().err


def test_a_damaged_cache_entry_is_never_scored(tiny, data_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    kw = dict(data_dir=data_dir, cache_dir=str(cache), progress=False)
    first = scoring.evaluate(tiny, ["wiki2"], **kw)["wiki2"]
    (entry,) = cache.iterdir()
    blob = entry.read_bytes()
    entry.write_bytes(blob[: len(blob) // 2])              # truncated, as a full disk or a copy might leave it
    again = scoring.evaluate(tiny, ["wiki2"], **kw)["wiki2"]
    assert "is damaged; tokenizing again" in capsys.readouterr().err
    assert again == first and entry.read_bytes() == blob
    assert scoring.evaluate(tiny, ["wiki2"], **kw)["wiki2"] == first
