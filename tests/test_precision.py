"""Precision: bfloat16 autocast trains without NaN/inf while the KL stays in float32; float64 works."""

import pytest
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["lrt", "sample"])
@pytest.mark.parametrize("layer", ["linear", "conv", "transpose"])
def test_16_bit_layers_sample_and_give_a_float32_kl(dtype, estimator, layer):
    torch.manual_seed(0)
    build = {
        "linear": lambda **kw: vinn.Linear(6, 4, **kw),
        "conv": lambda **kw: vinn.Conv1d(2, 3, 3, **kw),
        "transpose": lambda **kw: vinn.ConvTranspose1d(2, 3, 3, **kw),
    }[layer]
    x = torch.randn(5, 6) if layer == "linear" else torch.randn(5, 2, 6)
    # 1e-3, bayesify's default initial scale, is a subnormal variance in float16
    half = build(dtype=dtype, estimator=estimator, init_scale=1e-3)
    full = build(estimator=estimator, init_scale=1e-3)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    out = half(x.to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    kl = half.kl
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, full.kl, rtol=1e-3, atol=1e-3)
    (out.float().sum() + kl).backward()
    assert all(p.grad.isfinite().all() for p in half.parameters())
    torch.testing.assert_close(half.weight_scale.float(), torch.full_like(full.weight_scale, 1e-3), rtol=0.01, atol=0)


def test_float16_model_predicts():
    net = nn.Sequential(vinn.Linear(4, 8), nn.ReLU(), vinn.Linear(8, 3)).half().eval()
    p = vinn.predict(net, torch.randn(5, 4).half(), samples=4)
    assert p.dtype == torch.float16 and p.shape == (4, 5, 3) and p.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_layers_with_a_non_normal_posterior_give_a_finite_float32_kl_and_gradients(dtype):
    from torch.distributions import Laplace

    torch.manual_seed(0)
    layer = vinn.Linear(300, 200, posterior=Laplace, dtype=dtype)  # 60,000 terms: a 16-bit sum would overflow
    kl = layer.kl
    reference = vinn.Linear(300, 200, posterior=Laplace)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, reference.kl, rtol=1e-3, atol=0)
    kl.backward()
    assert layer.weight_log_sigma2.grad.dtype == dtype and bool(layer.weight_log_sigma2.grad.isfinite().all())
