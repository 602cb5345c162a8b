"""DistributedDataParallel with vinn.ELBO: two gloo processes on the CPU train exactly as one process
on the concatenated batch (noise off), so the KL is counted once per step and scaled by the dataset."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import vinn

WORLD, LOCAL_BATCH, DATASET_SIZE, STEPS = 2, 8, 100, 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return vinn.bayesify(net, init_scale=0.1)  # scales large enough for the KL to steer them


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of every step, (WORLD * LOCAL_BATCH, 6) inputs and their labels."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD * LOCAL_BATCH, 6, generator=generator)
    return [(xs, xs[:, :3].argmax(1)) for xs in x]


def _train(model: nn.Module, forward: nn.Module, part: slice) -> None:
    elbo = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=DATASET_SIZE)
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.5)  # not Adam: its steps ignore a rescaled gradient
    for x, y in _batches():
        optimizer.zero_grad()
        with vinn.deterministic():  # noise off: the two runs must agree to float rounding
            loss = elbo(forward(x[part]), y[part])
        loss.backward()
        optimizer.step()


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = _model()
    _train(model, DistributedDataParallel(model), slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_train_like_one_process_on_the_concatenated_batch(tmp_path, free_port):
    try:
        mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:  # gloo's rare teardown abort (see test_examples.py): once more
        if error.signal_name != "SIGABRT":
            raise
        mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    reference = _model()
    _train(reference, reference, slice(None))
    initial = _model().state_dict()
    for key, expected in reference.state_dict().items():
        for state in ranks:
            assert torch.equal(state[key], ranks[0][key]), f"{key} differs between ranks"
            torch.testing.assert_close(state[key], expected, rtol=1e-5, atol=1e-6, msg=f"{key} differs from one process")
        if key.endswith("log_sigma2"):
            assert not torch.equal(expected, initial[key]), "the KL term trained the scales"
