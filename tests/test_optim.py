"""vinn.param_groups: the posterior scales in their own group, at their own learning rate."""

import pytest
import torch
from torch import nn

import vinn


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = vinn.Linear(4, 4)
        self.body = nn.Sequential(vinn.Linear(3, 4), nn.LayerNorm(4), shared, shared, vinn.Linear(4, 2, bias=False))
        self.noise_log_sigma2 = nn.Parameter(torch.zeros(()))  # a likelihood's log-variance: a scale too


def _net() -> nn.Module:
    return _Regression()


def test_groups_partition_the_parameters():
    net = _net()
    locs, scales = vinn.param_groups(net, lr=1e-3, weight_decay=0.01)
    assert locs["lr"] == 1e-3 and locs["weight_decay"] == 0.01
    assert scales["lr"] == pytest.approx(1e-3 * vinn.SCALE_LR_RATIO) and scales["weight_decay"] == 0.0
    named = dict(net.named_parameters())
    assert {id(p) for p in scales["params"]} == {id(p) for n, p in named.items() if n.endswith("_log_sigma2")}
    assert any(p is net.noise_log_sigma2 for p in scales["params"]) and len(scales["params"]) == 6
    assert sorted(map(id, locs["params"] + scales["params"])) == sorted(map(id, net.parameters()))  # each once
    assert vinn.param_groups(net, lr=1e-3, scale_lr=5e-2)[1]["lr"] == 5e-2
    assert len(vinn.param_groups(nn.Linear(2, 2), lr=1e-3)) == 1  # no vinn layer: one group


def test_scales_move_ratio_times_further_under_adam():
    torch.manual_seed(0)
    layer = vinn.Linear(8, 1)
    start = layer.weight_log_sigma2.detach().clone()
    optimizer = torch.optim.Adam(vinn.param_groups(layer, lr=1e-3))
    x = torch.randn(32, 8)
    for _ in range(20):
        optimizer.zero_grad()
        layer.kl.backward()  # pushes every σ up towards the prior's: a gradient of constant sign
        optimizer.step()
    moved = (layer.weight_log_sigma2.detach() - start).mean()
    # Adam's steps with a steady gradient are the learning rate each
    assert moved == pytest.approx(20 * 1e-3 * vinn.SCALE_LR_RATIO, rel=0.05)
    assert layer(x).shape == (32, 1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"lr": "0.1"}, TypeError),
        ({"lr": -1.0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"lr": 1e-3, "scale_lr": True}, TypeError),
        ({"lr": 1e-3, "weight_decay": float("inf")}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    net = _net()
    with pytest.raises(error, match=next(iter(k for k in ("scale_lr", "weight_decay", "lr") if k in kwargs))):
        vinn.param_groups(net, **kwargs)
    with pytest.raises(TypeError, match="model"):
        vinn.param_groups([p for p in net.parameters()], lr=1e-3)
