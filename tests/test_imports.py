"""The dependency arrows point one way: library modules below, commands above, scripts on top.
docs/code-map.md names each module's layer."""
import ast

from conftest import ROOT

COMMANDS = {"train", "kron_decompose", "krony_to_gpt", "perplexity_eval", "sample", "demo", "prepare"}
# The one script that imports a command: bench_train.py times train.py's own training step in its
# process (setup, prepare, train_step), which a child process could not isolate from loading and
# evaluation. Every other stage another command needs runs as that command's own command line
# (configurator.run_command).
KNOWN = {("bench_train", "train")}


def modules():
    """{name: path} of the project's Python modules (tests aside)."""
    paths = list(ROOT.glob("*.py")) + list((ROOT / "scripts").glob("*.py")) + [ROOT / "data" / "owt" / "prepare.py"]
    return {p.stem: p for p in paths}


def imports(path, names):
    """The project modules a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(names)


def layer(name, path):
    if path.parent.name == "scripts":
        return "script"
    return "command" if name in COMMANDS else "library"


def graph():
    mods = modules()
    return mods, {n: imports(p, mods) for n, p in mods.items()}


def test_libraries_import_only_libraries():
    mods, deps = graph()
    bad = [(n, d) for n, ds in deps.items() if layer(n, mods[n]) == "library" for d in ds
           if layer(d, mods[d]) != "library"]
    assert bad == [], f"library modules importing a command or script: {bad}"


def test_no_script_or_command_imports_another_beyond_the_known_list():
    mods, deps = graph()
    edges = {(n, d) for n, ds in deps.items() if layer(n, mods[n]) != "library" for d in ds
             if layer(d, mods[d]) != "library"}
    assert edges - KNOWN == set(), f"new imports of a command or script: {sorted(edges - KNOWN)}"
    assert KNOWN - edges == set(), f"gone, take them off KNOWN: {sorted(KNOWN - edges)}"


def test_no_import_cycle():
    _, deps = graph()
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(deps[n]):
            assert state.get(d) != "open", f"import cycle: {' -> '.join(stack + [n, d])}"
            if d not in state:
                visit(d, stack + [n])
        state[n] = "done"
    for n in sorted(deps):
        if n not in state:
            visit(n, [])


def test_the_checks_see_a_violation(tmp_path):
    """The walk finds imports inside functions and cycles (a check that cannot fail checks nothing)."""
    (tmp_path / "a.py").write_text("import os\ndef f():\n    import b\n")
    (tmp_path / "b.py").write_text("from a import f\n")
    names = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    assert imports(names["a"], names) == {"b"} and imports(names["b"], names) == {"a"}
