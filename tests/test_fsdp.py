"""FSDP2 (torch.distributed.fsdp.fully_shard) with vinn.ELBO: two gloo processes on the CPU, every
vinn layer its own sharded unit, train exactly as one process on the concatenated batch (noise
off). Outside forward the parameters are sharded DTensors: vinn.kl is still the whole model's KL on
every rank, counted once per step, for the Normal prior's closed form and for a Laplace posterior
under a fitted, pretrained-centred prior (elementwise buffers, refitted at every KL), and for a
Monte Carlo KL; vinn.predict runs on the sharded model."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_training import (
    LOCAL_BATCH,
    WORLD,
    assert_trained_like_one_process,
    batches,
    join_process_group,
    local_part,
    mlp,
    spawn,
    train,
)
from torch import nn
from torch.distributions import Laplace, StudentT

import vinn

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch 2.6 or later", allow_module_level=True)
pytestmark = pytest.mark.slow  # two processes that import torch


def cnn() -> nn.Module:
    """A bayesified 1-d CNN on the same 6-feature inputs: Laplace posterior, a prior per output unit
    centred on the pretrained weights and fitted to the posterior."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 6)), nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    prior = vinn.EmpiricalBayesPrior(per="unit", pretrained=True)
    return vinn.bayesify(net, posterior=Laplace, prior=prior, init_scale=0.1)


def mlp_monte_carlo() -> nn.Module:
    """The MLP under a prior without a closed-form KL: estimated by Monte Carlo, on the gathered
    parameters, with the same draws on every rank as in one process (the same seed)."""
    return mlp(prior=StudentT(3.0, 0.0, 1.0))


MODELS = {"mlp": mlp, "cnn": cnn, "mc": mlp_monte_carlo}


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for module in model.modules():
        if isinstance(module, vinn.BayesianLayer):  # in a transformer: each block
            fsdp.fully_shard(module, mesh=mesh)
    return fsdp.fully_shard(model, mesh=mesh)


def _rank(rank: int, port: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    join_process_group(rank, port)
    for name, build in MODELS.items():
        model = _shard(build())
        assert any(vinn.sharding.is_dtensor(p) for p in model.parameters())
        train(model, model, local_part(rank))
        torch.save(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), Path(out) / f"{name}{rank}.pt")
        # after the state is saved: the KL refits the fitted prior's scale in place
        torch.manual_seed(1)  # the Monte Carlo KL draws as the reference's does
        torch.save(vinn.kl(model).detach(), Path(out) / f"{name}{rank}.kl.pt")
    # prediction: a deterministic trunk is not run apart from the model, which would bypass fully_shard's hooks
    model, reference = _shard(mlp(last=1)).eval(), mlp(last=1).eval()
    x = batches()[0][0]
    assert vinn.predict(model, x, samples=4).shape == (4, WORLD * LOCAL_BATCH, 3)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(model(x), reference(x))
    dist.barrier()
    dist.destroy_process_group()


def test_two_sharded_ranks_train_like_one_process_on_the_concatenated_batch(tmp_path, free_port):
    spawn(_rank, free_port, str(tmp_path))
    for name, build in MODELS.items():
        files = [tmp_path / f"{name}{r}.pt" for r in range(WORLD)]
        expected = assert_trained_like_one_process(files, build)
        reference = build()
        reference.load_state_dict(expected)
        torch.manual_seed(1)
        kl = reference.kl.detach()
        for rank in range(WORLD):  # the KL of the whole model on every rank, not that of the rank's shard
            torch.testing.assert_close(torch.load(tmp_path / f"{name}{rank}.kl.pt"), kl, msg=f"{name}: KL of rank {rank}")
