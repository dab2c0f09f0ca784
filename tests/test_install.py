"""What a fresh machine installs: requirements.lock pins every package exactly, each within the
ranges of requirements.txt, and the compact export's transformers contract holds for the installed
release (the cache argument's name changed in transformers 5.24)."""
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def read(name):
    return [l.split("#")[0].strip() for l in (ROOT / name).read_text().splitlines() if l.split("#")[0].strip()]


def canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def test_the_lock_pins_every_requirement_within_its_range():
    pins = {}
    for line in read("requirements.lock"):
        name, _, version = line.partition("==")
        assert version and not any(c in version for c in "<>~*,"), f"not an exact pin: {line}"
        pins[canonical(name)] = Version(version)
    for line in read("requirements.txt"):
        req = Requirement(line)
        assert canonical(req.name) in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[canonical(req.name)], prereleases=True), (line, pins[canonical(req.name)])
    for dep in ("tokenizers", "huggingface-hub", "safetensors", "numpy", "filelock"):   # the transitive ones too
        assert dep in pins, f"{dep} (a dependency of a requirement) is not pinned"
