"""kron_decompose.py and the scripts not built yet, run as a user runs them."""
import json
import subprocess
import sys

from conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_list_table_has_kronypt_81m_shape():
    p = run("kron_decompose.py", "--list", "3072", "768", "--factors", "1")
    assert p.returncode == 0, p.stderr
    assert "396 factorizations of a 3072 x 768 matrix" in p.stdout
    line = [l for l in p.stdout.splitlines() if l.split()[:7] == ["768", "x", "768", "4", "x", "1", "1"]]
    assert len(line) == 1 and "589,828" in line[0] and "4.0x" in line[0]


def test_list_budget_and_json():
    p = run("kron_decompose.py", "--list", "3072", "768", "--factors", "2", "--budget", "600000", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert rows and all(r["params"] <= 600_000 and r["r"] == 2 for r in rows)
    assert all(r["m1"] * r["m2"] == 3072 and r["n1"] * r["n2"] == 768 for r in rows)
    full = json.loads(run("kron_decompose.py", "--list", "3072", "768", "--factors", "2", "--json").stdout)
    assert len(rows) == sum(r["params"] <= 600_000 for r in full) < len(full)


def test_bad_arguments_give_one_line_errors():
    for args in (["768", "768", "0"], ["--list", "3072", "-5"], ["--list", "3072", "7x"],
                 ["--list", "3072", "768", "--factors", "0"], ["768", "768"], []):
        p = run("kron_decompose.py", *args)
        assert p.returncode == 2, args
        assert "Traceback" not in p.stderr and "error:" in p.stderr, (args, p.stderr)


def test_unbuilt_parts_say_so_and_fail():
    p = run("kron_decompose.py", "768", "768", "1")
    assert p.returncode != 0 and "not built yet" in p.stderr
    for script in ("train.py", "krony_to_gpt.py", "perplexity_eval.py"):
        p = run(script)
        assert p.returncode != 0 and "not built yet" in p.stderr, script
