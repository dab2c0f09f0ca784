import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("KRONY_SHARED", ROOT.parent / "shared"))
TEACHER = SHARED / "teacher" / "owt-mini-gpt2"


@pytest.fixture
def teacher_state():
    """The reference teacher's tensors (safetensors), or a skip that says why."""
    path = TEACHER / "model.safetensors"
    if not path.exists():
        pytest.skip(f"reference teacher not found at {path} (set KRONY_SHARED to the shared/ folder)")
    from safetensors.torch import load_file
    return load_file(str(path))
