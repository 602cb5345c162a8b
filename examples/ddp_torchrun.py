"""Data-parallel ELBO training of a bayesified model with DistributedDataParallel, on CPU (gloo).

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py [--epochs 20] [--fast]

KL scaling under DDP. With N training examples, R ranks and a local batch of B examples per rank,
`vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=N)` gives on every rank

    loss_r = Σ_local nll / B + KL / N

(the per-example negative ELBO, estimated on the local batch). DDP averages the gradients of the
R replicas, which is the gradient of the average loss

    (1/R) Σ_r loss_r = Σ_global nll / (R B) + KL / N,

the same per-example negative ELBO estimated on the global batch of R B examples. So each replica
adds the KL once per step, its weight stays 1/N (not R/N), and nothing needs rescaling: give
`dataset_size` the size of the whole dataset, not of one rank's shard. With `beta=` instead, use
the number of *global* batches per epoch (len of one rank's loader, as DistributedSampler makes it).

Because DDP broadcasts rank 0's parameters at construction and every rank then applies the same
averaged gradient, the posteriors (loc and scale) stay identical on all ranks; the script checks it.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import vinn

try:
    from digits import load_digits_tensors
except ImportError:  # imported as examples.ddp_torchrun
    from .digits import load_digits_tensors


def posteriors_identical_across_ranks(model: nn.Module) -> bool:
    """Every rank's flattened parameters equal rank 0's (exactly: the same updates were applied)."""
    local = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def main(epochs: int = 20, batch_size: int = 32, fast: bool = False) -> dict[str, float] | None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank = dist.get_rank()
    if fast:
        epochs = 3
    torch.manual_seed(rank)  # different sampling noise per rank; DDP makes the initial weights rank 0's

    x_train, y_train, x_test, y_test = load_digits_tensors(size=8)
    dataset = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)  # each rank gets its own shard
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)  # batch_size per rank

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    bnn = vinn.bayesify(model)
    ddp_model = DistributedDataParallel(bnn)
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=len(dataset))  # the whole dataset: see above
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=1e-2)

    ddp_model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # a new shuffle every epoch, consistent across ranks
        for images, labels in loader:
            optimizer.zero_grad()
            loss = elbo(ddp_model(images), labels)  # forward through DDP, so backward all-reduces
            loss.backward()
            optimizer.step()

    identical = posteriors_identical_across_ranks(bnn)
    result = None
    if rank == 0:
        bnn.eval()
        p = vinn.predict(bnn, x_test, samples=32)
        accuracy = (p.mean(0).argmax(1) == y_test).float().mean().item()
        print(f"world size {dist.get_world_size()} | test accuracy {accuracy:.3f}")
        print(f"posterior parameters identical on all ranks: {identical}")
        result = {"accuracy": accuracy, "identical": identical}
    dist.barrier()  # rank 1 must not tear the group down while rank 0 is still evaluating
    del ddp_model  # DDP's reducer holds the group: release it before the group goes
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--fast", action="store_true", help="tiny settings, for tests")
    args = parser.parse_args()
    main(args.epochs, fast=args.fast)
