"""The layer registry: one place that says which torch layers vinn converts, open to a user's own types."""

import pytest
import torch
from torch import nn

import vinn


class Affine(nn.Module):
    """A user's own torch layer: y = x * weight + bias over the last dimension (features)."""

    def __init__(self, features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.features = features
        self.weight = nn.Parameter(torch.empty(features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 1.0, 0.1)
        if self.bias is not None:
            nn.init.normal_(self.bias, 0.0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + (0.0 if self.bias is None else self.bias)


@pytest.fixture
def bayesian_affine():
    class BayesianAffine(vinn.BayesianLayer, Affine):
        def _op(self, input, weight, bias):
            return input * weight + (0.0 if bias is None else bias)

    yield vinn.register_layer(BayesianAffine)
    vinn.layers._REGISTRY.pop(Affine)


def test_built_in_types_are_registered():
    torch_types = {t: layer for t, layer in vinn.layer_types().items() if t.__module__.startswith("torch.nn")}
    assert torch_types == {
        nn.Linear: vinn.Linear,
        nn.Conv1d: vinn.Conv1d,
        nn.Conv2d: vinn.Conv2d,
        nn.Conv3d: vinn.Conv3d,
        nn.ConvTranspose1d: vinn.ConvTranspose1d,
        nn.ConvTranspose2d: vinn.ConvTranspose2d,
        nn.ConvTranspose3d: vinn.ConvTranspose3d,
        nn.Embedding: vinn.Embedding,
        nn.LayerNorm: vinn.LayerNorm,
        nn.RMSNorm: vinn.RMSNorm,
        nn.GroupNorm: vinn.GroupNorm,
        nn.BatchNorm1d: vinn.BatchNorm1d,
        nn.BatchNorm2d: vinn.BatchNorm2d,
        nn.BatchNorm3d: vinn.BatchNorm3d,
        nn.LSTM: vinn.LSTM,
        nn.GRU: vinn.GRU,
        nn.RNN: vinn.RNN,
        nn.MultiheadAttention: vinn.MultiheadAttention,
    }
    vinn.layer_types().clear()  # a copy: the registry stays
    assert nn.Linear in vinn.layer_types()


def test_a_registered_user_type_is_converted_sampled_and_configured(bayesian_affine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Affine(4)).eval()
    bnn = vinn.bayesify(model)
    assert [layer.kind for layer in bnn.conversion_report.converted] == ["Linear", "Affine"]
    layer = bnn.get_submodule("1")
    assert isinstance(layer, bayesian_affine) and isinstance(layer, Affine)
    x = torch.randn(5, 3)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(x), model(x))
    samples = vinn.sample(bnn, x, samples=4)
    assert samples.shape == (4, 5, 4) and samples.std(0).min() > 0
    assert float(layer.kl.detach()) > 0
    assert isinstance(vinn.to_deterministic(bnn).get_submodule("1"), Affine)
    only_affine = vinn.BayesConfig().set_global(None).set_type(Affine, vinn.LayerSpec())
    assert [layer.kind for layer in vinn.bayesify(model, only_affine).conversion_report.converted] == ["Affine"]


def test_register_layer_refuses_what_is_not_a_bayesian_layer():
    with pytest.raises(TypeError, match="subclass of vinn.BayesianLayer"):
        vinn.register_layer(nn.Linear)

    class NoTorchBase(vinn.BayesianLayer):
        pass

    with pytest.raises(TypeError, match="no torch layer"):
        vinn.register_layer(NoTorchBase)
    with pytest.raises(ValueError, match="register_layer"):
        vinn.BayesConfig().set_type(Affine, vinn.LayerSpec())
