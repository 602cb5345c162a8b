"""What the DistributedDataParallel and FSDP2 tests share: the model, the data, the training loop,
starting two gloo processes and checking that they trained exactly as one process on the
concatenated batch (noise off), so that the KL was counted once per step and scaled by the dataset."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import vinn

WORLD, LOCAL_BATCH, DATASET_SIZE, STEPS = 2, 8, 100, 4


def mlp(**options: object) -> nn.Module:
    """The same bayesified 6-16-3 network on every call; ``options`` go to `vinn.bayesify`."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return vinn.bayesify(net, **{"init_scale": 0.1, **options})  # scales large enough for the KL to steer them


def batches() -> list[tuple[Tensor, Tensor]]:
    """The global batches of every step, (WORLD * LOCAL_BATCH, 6) inputs and their labels."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * LOCAL_BATCH, 6, generator=generator)
    return [(xs, xs[:, :3].argmax(1)) for xs in x]


def local_part(rank: int) -> slice:
    """The examples of the global batch that rank ``rank`` trains on."""
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def train(model: nn.Module, forward: nn.Module, part: slice) -> None:
    """SGD on the ELBO of ``model`` (dataset size: the whole dataset), through ``forward`` (the model
    itself, or its DistributedDataParallel wrapper), on the examples ``part`` of every global batch."""
    elbo = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=DATASET_SIZE)
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.5)  # not Adam: its steps ignore a rescaled gradient
    for x, y in batches():
        optimizer.zero_grad()
        with vinn.deterministic():  # noise off: the two runs must agree to float rounding
            loss = elbo(forward(x[part]), y[part])
        loss.backward()
        optimizer.step()


def join_process_group(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def spawn(function: Callable[..., None], free_port: Callable[[], int], *args: object) -> None:
    """``function(rank, port, *args)`` in WORLD processes, run once more if gloo aborts one of them in its
    C++ teardown (rare, on a loaded machine: see test_examples.py), which is no failure of the test."""
    try:
        mp.spawn(function, args=(free_port(), *args), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:
        if error.signal_name != "SIGABRT":
            raise
        mp.spawn(function, args=(free_port(), *args), nprocs=WORLD, join=True)


def assert_trained_like_one_process(rank_files: list[Path], build: Callable[[], nn.Module]) -> Mapping[str, Tensor]:
    """The state_dicts saved by every rank are equal, and equal to that of ``build()`` trained in one
    process on the concatenated batches; returns the latter."""
    ranks = [torch.load(path) for path in rank_files]
    reference = build()
    train(reference, reference, slice(None))
    initial = build().state_dict()
    expected_state = reference.state_dict()
    for key, expected in expected_state.items():
        for state in ranks:
            assert torch.equal(state[key], ranks[0][key]), f"{key} differs between ranks"
            torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6, msg=f"{key} differs from one process")
        if key.endswith("log_sigma2"):
            assert not torch.equal(expected, initial[key]), "the KL term trained the scales"
    return expected_state
