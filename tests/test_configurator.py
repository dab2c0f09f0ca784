"""configurator.py: config files are parsed, never executed; unknown keys and bad types are errors."""
from dataclasses import dataclass, field

import pytest

from configurator import ConfigError, parse_config, read_config_file


@dataclass
class Cfg:
    out_dir: str = "out"
    max_iters: int = 100
    learning_rate: float = 6e-4
    compile: bool = False
    init_from: str | None = None
    betas: list = field(default_factory=lambda: [0.9, 0.95])


def test_files_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text('"""a run"""\n# comment\nout_dir = "checks/run1"\nmax_iters = 5000\nlearning_rate = 1  # an int\n'
                 "betas = (0.9, 0.99)\ncompile = True\n")
    cfg, src = parse_config(Cfg, [str(f), "--max_iters=10", "--compile=false", "--init_from=resume"])
    assert cfg == Cfg(out_dir="checks/run1", max_iters=10, learning_rate=1.0, compile=False, init_from="resume",
                      betas=[0.9, 0.99])
    assert isinstance(cfg.learning_rate, float) and src["max_iters"] == "command line" and src["out_dir"] == str(f)


def test_key_space_value_is_key_equals_value(tmp_path):
    a, _ = parse_config(Cfg, ["--max_iters", "10", "--compile", "true", "--learning_rate", "-1e-3"])
    b, _ = parse_config(Cfg, ["--max_iters=10", "--compile=true", "--learning_rate=-1e-3"])
    assert a == b == Cfg(max_iters=10, compile=True, learning_rate=-1e-3)


@pytest.mark.parametrize("argv,message", [
    (["--max_iter=5"], "unknown key 'max_iter' .*did you mean 'max_iters'.*valid keys: betas, compile"),
    (["--max_iters=5.5"], "max_iters must be int, got float"),
    (["--learning_rate=fast"], "learning_rate must be float, got str"),
    (["--max_iters"], "needs a value: --max_iters=VALUE or --max_iters VALUE"),
    (["-x"], "is not an option"),
    (["--compile=maybe"], "compile must be bool"),
    (["--max_iters=True"], "max_iters must be int, got the boolean"),
    (["--betas={[1]: 2}"], "betas must be list, got str"),               # no literal (an unhashable key)
    (["--betas=" + "-" * 200_000 + "1"], "betas must be list, got str"),
])
def test_command_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Cfg, argv)


@pytest.mark.parametrize("text,message", [
    ("import os\n", "assignments `key = value` of literal values only"),
    ("max_iters = 10 if True else 2\n", "not a literal"),
    ("out_dir = __import__('os').getcwd()\n", "not a literal"),
    ("learning_rat = 1e-3\n", "unknown key 'learning_rat'"),
    ("max_iters = \n", "not valid Python syntax"),
    ("a = b = 1\n", "assignments"),
    ("betas = {[1]: 2}\n", "not a literal"),
    ("max_iters = " + "-" * 200_000 + "1\n", "nested too deeply|not a literal"),
])
def test_file_errors_and_nothing_runs(tmp_path, text, message):
    f = tmp_path / "c.py"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(Cfg, [str(f)])


def test_code_in_a_config_file_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "c.py"
    f.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ConfigError):
        read_config_file(str(f))
    assert not marker.exists()


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["-h"], doc="Train a thing.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Train a thing." in out
    for key in ("out_dir", "max_iters", "learning_rate", "compile", "init_from", "betas"):
        assert f"--{key}=" in out
    assert "(str | None)" in out and "(float)" in out


def test_only_small_regular_files_are_read(tmp_path):
    """/dev/zero, a pipe or a folder would be read until memory runs out: refused, as is a file over
    the limit and one that is not UTF-8."""
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.py"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"out_dir = '\xe9'\n")
    for path, message in (("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                          (tmp_path, "not a regular file"), (big, "more than the 1,048,576"),
                          (latin, "not UTF-8"), (tmp_path / "none.py", "No such file")):
        with pytest.raises(ConfigError, match=message):
            parse_config(Cfg, [str(path)])


def test_a_written_config_reads_back_to_the_same_values(tmp_path):
    from configurator import write_config
    path = tmp_path / "run.py"
    values = dict(out_dir="out/a b", max_iters=7, learning_rate=1e-300, compile=True, init_from=None,
                  betas=[0.9, {"rules": [{"a": [768, 1], "r": 3}]}])
    write_config(path, values, "made by a test")
    cfg, _ = parse_config(Cfg, [str(path)])
    assert cfg == Cfg(**values)
    with pytest.raises(ValueError, match="not a literal"):
        write_config(tmp_path / "bad.py", dict(learning_rate=float("inf")))
    assert not (tmp_path / "bad.py").exists()


def test_a_command_run_by_another_says_how_it_failed(tmp_path):
    """run_command: a stage's failure is an exception naming its exit status and its log."""
    from configurator import CommandFailed, run_command
    log = tmp_path / "train.log"
    with pytest.raises(CommandFailed, match=f"train.py exited with status 2; its output is in {log}"):
        run_command("train.py", ["--no_such_key=1"], log_path=log)
    assert "unknown key 'no_such_key'" in log.read_text()
