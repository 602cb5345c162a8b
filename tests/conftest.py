import socket
import sys
from collections.abc import Callable
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function giving a TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    return _free_port
