"""Save, resume, reproduce: a resumed run continues bit-identically, and a checkpoint of another
architecture fails with the first mismatching key named."""

import pytest
import torch
from torch import nn

import vinn


def _net() -> nn.Module:
    return vinn.bayesify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), init_scale=0.05)


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    """``n`` ELBO steps on minibatches shuffled by the global RNG, which also draws the layers' noise."""
    elbo = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=len(x))
    for _ in range(n):
        batch = torch.randperm(len(x))[:16]
        optimizer.zero_grad()
        elbo(model(x[batch]), y[batch]).backward()
        optimizer.step()


def test_checkpointed_and_resumed_run_is_bit_identical_to_the_uninterrupted_one(tmp_path):
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    torch.manual_seed(0)
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _steps(model, optimizer, x, y, 5)
    # the README's recipe: model, optimizer and RNG state
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    _steps(model, optimizer, x, y, 5)  # the uninterrupted run

    torch.manual_seed(123)  # a new process: other initial weights, other RNG state
    resumed = _net()
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    _steps(resumed, resumed_optimizer, x, y, 5)
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_loading_another_architecture_names_the_first_mismatching_key():
    bnn = _net()
    wider = vinn.bayesify(nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 3)))
    with pytest.raises(RuntimeError, match=r"first mismatching key '0.weight': shape \(5, 1, 3, 3\) in the state_dict"):
        bnn.load_state_dict(wider.state_dict())
    deterministic = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with pytest.raises(RuntimeError, match="first mismatching key '0.weight_log_sigma2': missing .* from a deterministic model"):
        bnn.load_state_dict(deterministic.state_dict())
    head_only = vinn.bayesify(deterministic, last=1)
    with pytest.raises(RuntimeError, match="'0.weight_log_sigma2'.*deterministic in this model"):
        head_only.load_state_dict(bnn.state_dict())
    extra = {**bnn.state_dict(), "4.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="first mismatching key '4.weight': in the state_dict but not in the model"):
        bnn.load_state_dict(extra)
    # what torch allows stays allowed: strict=False keeps this model's scales and priors
    result = bnn.load_state_dict(deterministic.state_dict(), strict=False)
    assert "0.weight_log_sigma2" in result.missing_keys
    assert torch.equal(bnn.get_submodule("0").weight, deterministic[0].weight)
