"""torch.compile (inductor on the CPU): a whole ELBO training step compiles with fullgraph=True (no
graph break on the sampling path or in vinn.ELBO), runs backward, and samples from the same
distribution as eager."""

import pytest
import torch
import torchvision
from lenet_digits import Net as LeNet
from torch import nn

import vinn

pytestmark = pytest.mark.slow  # inductor compiles C++: tens of seconds per model


def _compiled_step(model: nn.Module):
    elbo = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=10_000)  # > the 2000 rows sampled below

    def step(x, y):
        out = model(x)
        return elbo(out, y), out

    return step, torch.compile(step, fullgraph=True)  # fullgraph: any graph break is an error


def _assert_same_distribution(eager: torch.Tensor, compiled: torch.Tensor) -> None:
    """(draws, D) samples of the same D outputs: means, and log variances (standard error
    sqrt(2 / draws) each for normal-ish outputs), within 4.5 standard errors of their difference,
    which at 320 draws or more tells a doubled variance apart."""
    draws = eager.shape[0]
    se_mean = ((eager.var(0) + compiled.var(0)) / draws).sqrt()
    assert ((eager.mean(0) - compiled.mean(0)).abs() / se_mean).max() < 4.5
    assert ((compiled.var(0) / eager.var(0)).log().abs()).max() < 4.5 * (4 / draws) ** 0.5


def test_compiled_lenet_trains_and_samples_like_eager():
    torch.manual_seed(0)
    net = LeNet().train()
    step, compiled = _compiled_step(net)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss, _ = compiled(x, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    rows = x.repeat(500, 1, 1, 1)  # 500 draws of each of the 4 examples in one call
    labels = y.repeat(500)
    with torch.no_grad():
        eager, fast = step(rows, labels)[1], compiled(rows, labels)[1]
    _assert_same_distribution(eager.view(500, -1), fast.view(500, -1))
    with vinn.deterministic(), torch.no_grad():  # the switch is honoured by the compiled code too
        torch.testing.assert_close(compiled(rows, labels)[1], step(rows, labels)[1], rtol=1e-4, atol=1e-5)


def test_compiled_bayesified_residual_network_trains_and_samples_like_eager():
    torch.manual_seed(0)
    # what a torchvision ResNet is made of (a stem, batch norm, a residual block, a linear head),
    # small enough to compile in seconds
    resnet = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        torchvision.models.resnet.BasicBlock(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    bnn = vinn.bayesify(resnet, init_scale=0.05).train()
    step, compiled = _compiled_step(bnn)
    x, y = torch.randn(2, 3, 32, 32).repeat(16, 1, 1, 1), torch.tensor([3, 7]).repeat(16)
    loss, _ = compiled(x, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bnn.parameters())
    # the same batch (so the same batch-norm statistics) 20 times: 320 draws for each of 2 images
    eager = torch.cat([step(x, y)[1].detach().view(16, -1) for _ in range(20)])
    fast = torch.cat([compiled(x, y)[1].detach().view(16, -1) for _ in range(20)])
    _assert_same_distribution(eager, fast)
