"""The result as a module: kl, training, copying, pickling, state_dict keys and loading, to_deterministic."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vinn
from vinn.convert import BayesianGraphModule


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.gate = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 5, 5)
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return F.linear(self.fc(h), self.gate)


class HandWritten(vinn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = vinn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x))


def saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.fixture
def model() -> SmallConvNet:
    torch.manual_seed(0)
    return SmallConvNet().eval()


X = torch.randn(4, 1, 5, 5)


def test_result_is_a_vinn_module_with_kl(model):
    bnn = vinn.bayesify(model)
    assert isinstance(bnn, vinn.Module) and isinstance(bnn, BayesianGraphModule)
    assert type(bnn).__name__ == "SmallConvNet"
    layers = [m for m in bnn.modules() if isinstance(m, vinn.BayesianLayer)]
    assert len(layers) == 3
    torch.testing.assert_close(bnn.kl, sum(layer.kl for layer in layers))
    torch.testing.assert_close(bnn.kl, vinn.kl(bnn))


def test_it_trains_with_the_elbo(model):
    bnn = vinn.bayesify(model.train())
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=100)
    optimizer = torch.optim.SGD(bnn.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in bnn.named_parameters()}
    loss = elbo(bnn(X), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    changed = {name for name, p in bnn.named_parameters() if not torch.equal(p, before[name])}
    assert {"conv.weight", "fc.weight", "gate.weight"} <= changed
    assert any("conv.weight_" in name for name in changed)  # the posterior scale learns too


@pytest.mark.parametrize("clone", [copy.deepcopy, saved_and_loaded, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_and_pickles_keep_type_report_and_state(model, clone):
    bnn = vinn.bayesify(model)
    # this file's `from __future__ import annotations` makes forward's annotations strings, which
    # GraphModule pickling rejects in torch 2.11: bayesify drops them from the graph
    assert not any(isinstance(node.type, str) for node in bnn.graph.nodes)
    with torch.no_grad():
        bnn.fc.weight.add_(0.5)  # trained away from the input model
    twin = clone(bnn)
    assert isinstance(twin, BayesianGraphModule) and isinstance(twin, vinn.Module)
    assert type(twin).__name__ == "SmallConvNet" and not twin.training
    assert twin.conversion_report == bnn.conversion_report
    assert twin.state_dict().keys() == bnn.state_dict().keys()
    assert twin.fc.weight is not bnn.fc.weight
    torch.testing.assert_close(twin.kl, bnn.kl)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(twin(X), bnn(X), atol=0, rtol=0)
    with torch.no_grad():
        torch.manual_seed(1)
        sampled = bnn(X)
        torch.manual_seed(1)
        torch.testing.assert_close(twin(X), sampled, atol=0, rtol=0)
    assert copy.copy(bnn).conversion_report is bnn.conversion_report


def test_state_dict_keys_and_loading_into_a_fresh_conversion(model):
    bnn = vinn.bayesify(model, prior=vinn.PretrainedPrior(0.1), init_scale=vinn.RelativeScale())
    keys = set(bnn.state_dict())
    original = set(model.state_dict())
    assert original - keys == {"gate"}  # the functional call's weight moved into the layer "gate"
    assert original - {"gate"} <= keys
    for layer in ("conv", "fc", "gate"):
        assert {f"{layer}.weight", f"{layer}.weight_prior_loc", f"{layer}.weight_prior_scale"} <= keys
    added = keys - original
    assert all(key.split(".")[0] in ("conv", "fc", "gate") for key in added)

    with torch.no_grad():
        for parameter in bnn.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # as after training
    torch.manual_seed(5)
    fresh = vinn.bayesify(SmallConvNet().eval(), prior=vinn.PretrainedPrior(0.1), init_scale=vinn.RelativeScale())
    fresh.load_state_dict(bnn.state_dict())
    torch.testing.assert_close(fresh.kl, bnn.kl)
    torch.testing.assert_close(fresh.fc.weight_prior.loc, bnn.fc.weight_prior.loc, atol=0, rtol=0)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(fresh(X), bnn(X), atol=0, rtol=0)


def test_a_deterministic_checkpoint_loads_with_strict_false(model):
    torch.manual_seed(3)
    bnn = vinn.bayesify(SmallConvNet().eval())
    result = bnn.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == ["gate"]
    assert {key for key in result.missing_keys if key.endswith((".weight", ".bias"))} == {"gate.weight"}
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn.bn(bnn.conv(X)), model.bn(model.conv(X)), atol=0, rtol=0)


def test_to_deterministic_of_a_traced_conversion(model):
    bnn = vinn.bayesify(model)
    with torch.no_grad():
        bnn.fc.weight.mul_(2)
    net = vinn.to_deterministic(bnn)
    assert isinstance(net, torch.fx.GraphModule) and not isinstance(net, vinn.Module)
    assert type(net).__name__ == "SmallConvNet"
    assert not any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    assert type(net.fc) is nn.Linear and type(net.gate) is nn.Linear and not net.training
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(net(X), bnn(X), atol=0, rtol=0)
    assert isinstance(bnn.fc, vinn.Linear)  # bnn itself is unchanged
    assert net.state_dict().keys() == (model.state_dict().keys() - {"gate"}) | {"gate.weight"}


def test_to_deterministic_of_any_module_with_vinn_layers():
    torch.manual_seed(0)
    hand_written = HandWritten()
    net = vinn.to_deterministic(hand_written)
    assert type(net) is HandWritten and type(net.fc) is nn.Linear
    x = torch.randn(2, 4)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(net(x), hand_written(x), atol=0, rtol=0)
    assert type(vinn.to_deterministic(vinn.Conv2d(1, 2, 3))) is nn.Conv2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vinn.to_deterministic("model")


def test_a_model_on_a_device_converts_and_stays_there(model, device):
    model = model.to(device)
    x = X.to(device)
    bnn = vinn.bayesify(model, prior=vinn.PretrainedPrior(0.1), init_scale=vinn.RelativeScale())
    tensors = list(bnn.parameters()) + list(bnn.buffers())
    assert all(t.device.type == device.type for t in tensors)
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(x), model(x), atol=1e-6, rtol=0)
    (bnn(x).sum() + bnn.kl).backward()
    assert bnn.kl.device.type == bnn.fc.weight.grad.device.type == device.type
    for twin in (saved_and_loaded(bnn), copy.deepcopy(bnn), vinn.to_deterministic(bnn)):
        assert all(t.device.type == device.type for t in twin.parameters())
        with torch.no_grad(), vinn.deterministic():
            torch.testing.assert_close(twin(x), bnn(x), atol=0, rtol=0)
