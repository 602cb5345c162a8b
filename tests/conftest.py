import sys
from pathlib import Path

import pytest
import torch

# the examples are scripts, not a package: make them importable for the tests that run them
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every test that takes ``device`` runs on the CPU and, where one is present, on CUDA."""
    return torch.device(request.param)
