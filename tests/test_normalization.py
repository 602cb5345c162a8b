"""Bayesian normalization layers: torch.nn's normalization, then a sampled scale and shift."""

import pytest
import torch
from torch import nn

import vinn

CASES = [
    (nn.LayerNorm, vinn.LayerNorm, (8,), {}, (5, 3, 8)),
    (nn.LayerNorm, vinn.LayerNorm, ((3, 8),), {"bias": False, "eps": 1e-3}, (5, 3, 8)),
    (nn.RMSNorm, vinn.RMSNorm, (8,), {}, (5, 3, 8)),
    (nn.GroupNorm, vinn.GroupNorm, (2, 6), {}, (5, 6, 4, 4)),
    (nn.BatchNorm1d, vinn.BatchNorm1d, (6,), {}, (5, 6)),
    (nn.BatchNorm1d, vinn.BatchNorm1d, (6,), {"momentum": None}, (5, 6, 7)),
    (nn.BatchNorm2d, vinn.BatchNorm2d, (6,), {"bias": False}, (5, 6, 4, 4)),
    (nn.BatchNorm3d, vinn.BatchNorm3d, (6,), {"track_running_stats": False}, (5, 6, 2, 3, 3)),
]


@pytest.mark.parametrize("torch_type, vinn_type, args, kwargs, shape", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_equal_to_torch_at_the_posterior_loc_buffers_included(torch_type, vinn_type, args, kwargs, shape, training):
    torch.manual_seed(0)
    source = torch_type(*args, **kwargs)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_()
    layer = vinn_type.from_torch(source)
    assert isinstance(layer, torch_type) and set(source.state_dict()) < set(layer.state_dict())
    source.train(training), layer.train(training)
    for _ in range(2):  # running statistics move alike
        x = torch.randn(shape)
        with vinn.deterministic():
            torch.testing.assert_close(layer(x), source(x))
    for name, buffer in source.named_buffers():
        torch.testing.assert_close(layer.get_buffer(name), buffer)
    assert vinn_type(*args, **kwargs)(x).shape == shape  # the constructor takes every argument too


def test_lrt_moments_are_those_of_the_sampled_affine_map():
    torch.manual_seed(0)
    layer = vinn.LayerNorm(4, init_scale=0.3)
    x = torch.randn(1, 4).expand(20_000, 4)
    with torch.no_grad():
        out = layer(x)
        normalized = nn.functional.layer_norm(x[:1], (4,))[0]
    mean = normalized * layer.weight + layer.bias
    var = normalized.square() * layer.weight_scale.square() + layer.bias_scale.square()
    n = out.shape[0]
    assert ((out.mean(0) - mean.detach()).abs() < 4.5 * (var.detach() / n).sqrt()).all()
    assert ((out.var(0) - var.detach()).abs() < 4.5 * var.detach() * (2 / n) ** 0.5).all()


def test_layers_without_affine_parameters_are_refused_and_reported():
    with pytest.raises(ValueError, match="no weight or bias"):
        vinn.LayerNorm(4, elementwise_affine=False)
    with pytest.raises(ValueError, match="estimator"):
        vinn.BatchNorm2d(4, estimator="flipout")
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False))
    config = vinn.BayesConfig().set_type(nn.LayerNorm, vinn.LayerSpec())
    reasons = {layer.name: layer.reason for layer in vinn.bayesify(model, config).conversion_report.layers}
    assert reasons == {"0": None, "1": "no weight or bias to make Bayesian"}


def test_bayesify_converts_normalization_only_where_the_config_names_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2), nn.LayerNorm(2)).eval()
    default = vinn.bayesify(model).conversion_report
    assert [layer.name for layer in default.converted] == ["0", "4"]
    assert {layer.name: layer.reason for layer in default.kept} == {
        "1": "excluded by config (opt-in type: name it with set_type or set_name)",
        "5": "excluded by config (opt-in type: name it with set_type or set_name)",
    }
    config = vinn.BayesConfig().set_type(nn.BatchNorm2d, vinn.LayerSpec()).set_name("5", vinn.LayerSpec(init_scale=0.1))
    bnn = vinn.bayesify(model, config)
    assert [layer.name for layer in bnn.conversion_report.converted] == ["0", "1", "4", "5"]
    assert isinstance(bnn.get_submodule("1"), vinn.BatchNorm2d)
    x = torch.randn(3, 1, 5, 5)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(x), model(x))
    samples = vinn.sample(bnn, x, samples=4)
    assert samples.std(0).min() > 0
    assert type(vinn.to_deterministic(bnn).get_submodule("1")) is nn.BatchNorm2d


def test_from_torch_and_to_torch_keep_running_statistics():
    torch.manual_seed(0)
    source = nn.BatchNorm1d(3).train()
    source(torch.randn(8, 3) * 2 + 1)  # running statistics away from their initial values
    layer = vinn.BatchNorm1d.from_torch(source)
    back = layer.to_torch()
    for name, buffer in source.named_buffers():
        assert torch.equal(layer.get_buffer(name), buffer) and torch.equal(back.get_buffer(name), buffer)
    x = torch.randn(4, 3)
    with vinn.deterministic():
        torch.testing.assert_close(layer.eval()(x), source.eval()(x))
