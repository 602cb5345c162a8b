"""DistributedDataParallel with vinn.ELBO: two gloo processes on the CPU train exactly as one process
on the concatenated batch (noise off), so the KL is counted once per step and scaled by the dataset."""

from pathlib import Path

import torch
import torch.distributed as dist
from distributed_training import WORLD, assert_trained_like_one_process, join_process_group, local_part, mlp, spawn, train
from torch.nn.parallel import DistributedDataParallel


def _rank(rank: int, port: int, out: str) -> None:
    join_process_group(rank, port)
    model = mlp()
    train(model, DistributedDataParallel(model), local_part(rank))
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_train_like_one_process_on_the_concatenated_batch(tmp_path, free_port):
    spawn(_rank, free_port, str(tmp_path))
    assert_trained_like_one_process([tmp_path / f"rank{r}.pt" for r in range(WORLD)], mlp)
