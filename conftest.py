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


@pytest.fixture
def shared_data():
    """A folder of real samples for the optional extra tests over real data, named by the SSD_DATA
    environment variable (bccd/BCCD in VOC layout, BCCD_Dataset on GitHub; tiny_coco/ with a COCO
    annotation json): those tests skip without it. Every other test writes its own data."""
    folder = Path(os.environ.get("SSD_DATA", ""))
    if not os.environ.get("SSD_DATA") or not folder.is_dir():
        pytest.skip("set SSD_DATA to a folder of real samples to run this test")
    return folder
