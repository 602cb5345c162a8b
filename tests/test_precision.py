"""Precision: bfloat16 autocast trains without NaN/inf while the KL stays in float32; float64 works."""

import torch
from torch import nn

import vinn


def test_bf16_autocast_trains_1000_steps_with_float32_kl():
    torch.manual_seed(0)
    net = nn.Sequential(vinn.Linear(20, 64), nn.ReLU(), vinn.Linear(64, 3))
    x = torch.randn(256, 20)
    y = x[:, :3].argmax(1)
    elbo = vinn.ELBO(net, nn.CrossEntropyLoss(), dataset_size=256)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(1000):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            kl = net[0].kl
            loss = elbo(out, y)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    assert out.dtype == torch.bfloat16, "the forward pass runs in low precision"
    assert kl.dtype == loss.dtype == torch.float32, "the KL and the loss do not"
    assert all(torch.isfinite(p).all() for p in net.parameters())
    net.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accuracy = (vinn.predict(net, x, samples=8).mean(0).argmax(1) == y).float().mean()
    assert accuracy > 0.9


def test_float64_model_end_to_end():
    net = nn.Sequential(vinn.Conv1d(2, 3, 3, dtype=torch.float64), nn.Flatten(), vinn.Linear(12, 2, dtype=torch.float64))
    out = net(torch.randn(4, 2, 6, dtype=torch.float64))
    loss = vinn.ELBO(net, nn.CrossEntropyLoss(), dataset_size=10)(out, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert out.dtype == loss.dtype == vinn.kl(net).dtype == torch.float64
