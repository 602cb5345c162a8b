"""bayesify on torchvision architectures (random weights): exact outputs, complete reports, attention intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vinn

torchvision = pytest.importorskip("torchvision")

SUPPORTED = tuple(vinn.layer_types())  # the registry: what bayesify reports on


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


BUILDERS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(weights=None),
    "densenet121": lambda: torchvision.models.densenet121(weights=None),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "vit_b_16": lambda: torchvision.models.vit_b_16(weights=None, image_size=32),
    "small_vit": small_vit,
}
SLOW = {"vgg11_bn", "vit_b_16"}  # 130M and 86M parameters: seconds to build and copy


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BUILDERS]
)
def test_converts_with_identical_outputs_and_a_complete_report(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    bnn = vinn.bayesify(model)

    assert isinstance(bnn, vinn.Module)
    assert not bnn.training
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(x), model(x), atol=1e-5, rtol=0)
    with torch.no_grad():
        sampled = bnn(x)
    assert sampled.shape == model(x).shape and not torch.equal(sampled, model(x))

    report = bnn.conversion_report
    assert report.traced and report.trace_error is None
    layers = {n for n, m in model.named_modules() if isinstance(m, SUPPORTED)}
    assert {layer.name for layer in report.layers} == layers
    assert all(layer.converted == (layer.reason is None) for layer in report.layers)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert report.converted, "something must become Bayesian"
    for layer in report.converted:
        assert isinstance(bnn.get_submodule(layer.name), vinn.BayesianLayer)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):  # Bayesian, and its out_proj with it
            assert reasons[name] is None and reasons[f"{name}.out_proj"] is None
    bayesian = sum(
        p.numel() for m in bnn.modules() if isinstance(m, vinn.BayesianLayer) for p in m.random_parameters().values()
    )
    assert report.bayesian_parameters == bayesian
    assert report.total_parameters == sum(p.numel() for p in model.parameters())


def test_vit_attention_is_bayesian():
    torch.manual_seed(0)
    model = small_vit().eval()
    bnn = vinn.bayesify(model)
    attention = "encoder.layers.encoder_layer_0.self_attention"
    assert type(bnn.get_submodule(attention)) is vinn.MultiheadAttention
    assert isinstance(bnn.get_submodule(f"{attention}.out_proj"), type(model.get_submodule(f"{attention}.out_proj")))
    # every weight matrix is Bayesian: patch embedding, attention, MLP blocks, head; the layer norms are opt-in
    kept = {layer.name: layer.reason for layer in bnn.conversion_report.kept}
    assert all(reason.startswith("excluded by config (opt-in") for reason in kept.values())
    assert len(kept) == 5  # 2 per block, 1 final
    x = torch.randn(3, 3, 32, 32)
    (bnn(x).sum() + bnn.kl).backward()
    for name in ("conv_proj", "encoder.layers.encoder_layer_1.mlp.0", "heads.head", f"{attention}.out_proj"):
        layer = bnn.get_submodule(name)
        assert isinstance(layer, vinn.BayesianLayer) and layer.weight.grad is not None
    assert bnn.get_submodule(attention).in_proj_weight_log_sigma2.grad is not None
