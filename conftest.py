"""pytest set-up shared by every test file.

Triton runs on the CPU only under its interpreter, and the switch has to be set before Triton is
first imported, so it is set here, ahead of any test module.
"""
import os
from pathlib import Path

import pytest

if not os.environ.get("CUDA_VISIBLE_DEVICES") == "" and os.path.exists("/dev/nvidia0"):
    pass  # a real GPU: let Triton compile for it
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
