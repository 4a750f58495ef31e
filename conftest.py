"""pytest set-up shared by every test file.

Triton runs on the CPU only under its interpreter, and the switch has to be set before Triton is
first imported (importing torch does not import Triton), so it is set here, ahead of any test
module. With a GPU the kernels compile for real and the CUDA tests run.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
