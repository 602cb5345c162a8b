"""bayesify's pass: what it converts, what it keeps and why, functional calls, the fallback, bad input."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

import vinn


def assert_same_outputs(bnn: nn.Module, model: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(*inputs), model(*inputs), atol=1e-6, rtol=0)


def reasons(bnn: nn.Module) -> dict[str, str | None]:
    return {layer.name: layer.reason for layer in bnn.conversion_report.layers}


CONSTRUCTOR_ATTRIBUTES = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "output_padding",
)


def assert_same_configuration(layer: nn.Module, original: nn.Module) -> None:
    assert isinstance(layer, vinn.BayesianLayer) and type(layer)._torch_cls is type(original)
    for attribute in CONSTRUCTOR_ATTRIBUTES:
        assert getattr(layer, attribute, None) == getattr(original, attribute, None), attribute
    assert (layer.bias is None) == (original.bias is None)
    assert layer.weight.dtype == original.weight.dtype and layer.training == original.training
    torch.testing.assert_close(layer.weight, original.weight, atol=0, rtol=0)


# -- models (module level, so that pickling finds them) -------------------------------------------


class TinyUNet(nn.Module):
    """Encoder-decoder with a skip connection; the transposed convolutions use every option."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.mid = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up_dilated = nn.ConvTranspose2d(8, 8, 3, stride=(2, 3), padding=2, output_padding=(1, 2), dilation=2, groups=4)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 4, 8, 8)
        h = F.relu(self.mid(F.relu(self.down(x))))  # (N, 8, 4, 4)
        skip = torch.cat([self.up(h, output_size=x.shape[-2:]), x], 1)  # (N, 8, 8, 8)
        return self.out(skip) + self.up_dilated(h)[..., :8, :8].mean(1, keepdim=True)


class EveryLayerType(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
        self.deconv1 = nn.ConvTranspose1d(3, 2, 2, stride=2, bias=False)
        self.conv3 = nn.Conv3d(2, 3, (1, 2, 2), stride=(1, 2, 1))
        self.deconv3 = nn.ConvTranspose3d(3, 2, 2, output_padding=(0, 1, 0), stride=2)
        self.fc = nn.Linear(4, 5, dtype=torch.float64)

    def forward(self, x1: torch.Tensor, x3: torch.Tensor, v: torch.Tensor):
        return self.deconv1(self.conv1(x1)), self.deconv3(self.conv3(x3)), self.fc(v)


class Functional(nn.Module):
    """Layers written as functional calls on the module's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3))
        self.block = nn.Module()
        self.block.kernel = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x: torch.Tensor, image: torch.Tensor):
        features = F.conv2d(image, self.block.kernel, None, stride=2, padding=1, groups=2)
        return F.linear(x, self.w, bias=self.b), features


class FunctionalKept(nn.Module):
    """Functional calls that must stay deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Parameter(torch.randn(3, 4))
        self.attention = nn.MultiheadAttention(4, 2)
        self.bag = nn.EmbeddingBag(3, 4)
        self.kernel = nn.Parameter(torch.randn(2, 2, 1))
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor):  # x: (L, N=2, 4)
        twice = F.linear(x, self.twice) + F.linear(x, self.twice)
        attended = self.attention(x, x, x)[0]
        projected = F.linear(x, self.attention.in_proj_weight)  # the attention layer's weight, read directly
        bagged = self.bag(torch.tensor([[0, 2]])), F.linear(x, self.bag.weight)  # a weight inside a leaf module
        conv = F.conv1d(x.transpose(0, 1)[:, :2], self.kernel, stride=x.shape[0] // 2)  # computed stride
        computed_bias = F.linear(x, self.twice.T.T.contiguous(), self.offset * 2)  # weight computed: not a layer
        return twice, attended, projected, bagged, conv, computed_bias


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


class TiedFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(self.embed(tokens), self.embed.weight)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 3)
        self.alias = self.second  # one module under two names
        self.threshold = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        if h.sum() > self.threshold:
            h = h * 2
        return self.alias(h)

    def describe(self) -> str:
        return f"{type(self).__name__} with threshold {self.threshold}"


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(x))))


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Oddities(nn.Module):
    """A subclass, a layer never called, a layer whose weight forward reads, a vinn layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scaled = ScaledLinear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.peeked = nn.Linear(4, 4)
        self.bayesian = vinn.Linear(4, 4)
        self.plain = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bayesian(self.peeked(self.scaled(x)) + self.peeked.weight.sum())
        return self.plain(h)


# -- the pass ----------------------------------------------------------------------------------------


def test_unet_keeps_every_constructor_attribute():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    bnn = vinn.bayesify(model)
    assert all(layer.converted for layer in bnn.conversion_report.layers)
    for name in ("down", "mid", "up", "up_dilated", "out"):
        assert_same_configuration(bnn.get_submodule(name), model.get_submodule(name))
    assert_same_outputs(bnn, model, torch.randn(2, 4, 8, 8))


def test_every_supported_type_converts():
    torch.manual_seed(0)
    model = EveryLayerType()
    bnn = vinn.bayesify(model)
    assert bnn.training
    for name, module in model.named_children():
        assert_same_configuration(bnn.get_submodule(name), module)
    inputs = torch.randn(2, 2, 6), torch.randn(2, 2, 3, 4, 4), torch.randn(2, 4, dtype=torch.float64)
    assert_same_outputs(bnn, model, *inputs)
    assert bnn.kl.dtype == torch.float32 and bnn.kl > 0


def test_functional_calls_on_own_parameters_become_layers():
    torch.manual_seed(0)
    model = Functional()
    bnn = vinn.bayesify(model)
    report = {layer.name: layer for layer in bnn.conversion_report.layers}
    assert report.keys() == {"w", "block.kernel"}
    assert report["w"].kind == "F.linear" and report["w"].parameters == 15 and report["w"].converted
    assert report["block.kernel"].kind == "F.conv2d" and report["block.kernel"].converted
    assert type(bnn.w) is vinn.Linear and (bnn.w.in_features, bnn.w.out_features) == (4, 3)
    conv = bnn.block.kernel
    assert type(conv) is vinn.Conv2d and conv.bias is None
    assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding, conv.groups) == (2, 4, (2, 2), (1, 1), 2)
    keys = set(bnn.state_dict())
    assert {"w.weight", "w.bias", "block.kernel.weight"} <= keys
    assert not {"w", "b", "block.kernel"} & keys  # the parameters moved into the layers
    inputs = torch.randn(5, 4), torch.randn(2, 2, 6, 6)
    assert_same_outputs(bnn, model, *inputs)
    net = vinn.to_deterministic(bnn)
    assert type(net.w) is nn.Linear and type(net.block.kernel) is nn.Conv2d
    for got, expected in zip(net(*inputs), model(*inputs)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_functional_calls_that_must_stay_deterministic_are_reported():
    torch.manual_seed(0)
    model = FunctionalKept()
    bnn = vinn.bayesify(model)
    assert reasons(bnn) == {
        "attention": None,  # its weight read directly: drawn whole (see the next test)
        "attention.out_proj": "read directly by leaf module attention",
        "twice": "parameter twice used elsewhere in forward",
        "bag.weight": "read directly by leaf module bag",
        "kernel": "stride, padding, dilation or groups computed in forward",
    }
    bayesian = [name for name, m in bnn.named_modules() if isinstance(m, vinn.BayesianLayer)]
    assert bayesian == ["attention.parametrizations.in_proj_weight.0", "attention.parametrizations.in_proj_bias.0"]
    assert_same_outputs(bnn, model, torch.randn(4, 2, 4))


class ReadDirectly(nn.Module):
    """Layers whose parameters forward reads itself, as torchvision's Swin attention passes its
    ``qkv.weight`` to a function: one never called, one called as well."""

    def __init__(self) -> None:
        super().__init__()
        self.passed = nn.Linear(3, 2)
        self.also_called = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.passed.bias, x, self.passed.weight.T) + self.also_called(x) + self.also_called.weight.sum()


def test_a_layer_whose_parameters_forward_reads_is_drawn_whole():
    torch.manual_seed(0)
    model = ReadDirectly()
    bnn = vinn.bayesify(model, init_scale=0.1)
    report = {layer.name: layer for layer in bnn.conversion_report.layers}
    assert all(layer.converted and layer.drawn_whole for layer in report.values())
    assert report["passed"].parameters == 8 and bnn.conversion_report.bayesian_parameters == 14
    assert "passed Linear 8 yes, its parameters drawn whole" in {
        " ".join(line.split()) for line in str(bnn.conversion_report).splitlines()
    }
    assert "parametrizations" in repr(bnn)
    draws = bnn.passed.parametrizations
    assert isinstance(draws.weight[0], vinn.BayesianParameter) and torch.equal(draws.weight.original, model.passed.weight)
    assert torch.equal(bnn.kl, draws.weight[0].kl + draws.bias[0].kl + bnn.also_called.parametrizations.weight[0].kl)
    assert_same_outputs(bnn, model, torch.randn(4, 3))
    net = vinn.to_deterministic(bnn)
    assert set(net.state_dict()) == set(model.state_dict())

    # weight sampling: the rows of one pass share the draw; across passes, the variance of each
    # output is sum_j x_j^2 sigma_w^2 + sigma_b^2 (+ the called layer's and the read sum's)
    only_passed = vinn.bayesify(model, vinn.BayesConfig().set_global(vinn.LayerSpec(init_scale=0.1)).set_name("also_called", None))
    x = torch.tensor([[1.0, -2.0, 0.5]]).repeat(2, 1)
    with torch.no_grad():
        outputs = vinn.sample(only_passed, x, samples=4000, generator=0)  # (T, 2, 2)
    assert torch.equal(outputs[:, 0], outputs[:, 1])
    variance = 0.01 * (x[0].square().sum() + 1)
    standard_error = variance * (2 / 3999) ** 0.5
    assert (outputs[:, 0].var(0) - variance).abs().max() < 4 * standard_error


def test_tied_weights_share_one_posterior():
    torch.manual_seed(0)
    model = TiedHead()
    bnn = vinn.bayesify(model)
    assert reasons(bnn) == {"embed": None, "body": None, "head": None}
    report = bnn.conversion_report
    assert {layer.name: (layer.parameters, layer.shared_with) for layer in report.layers} == {
        "embed": (40, None), "body": (20, None), "head": (0, "embed.weight"),
    }
    assert report.bayesian_parameters == report.total_parameters == 60
    assert "head   Linear              0  yes, sharing the posterior of embed.weight" in str(report).splitlines()
    assert bnn.head.weight is bnn.embed.weight and bnn.head.weight_log_sigma2 is bnn.embed.weight_log_sigma2
    assert torch.equal(bnn.kl, bnn.embed.kl + bnn.body.kl)  # the shared matrix once
    tokens = torch.randint(0, 10, (3, 5))
    assert_same_outputs(bnn, model, tokens)
    net = vinn.to_deterministic(bnn)
    assert type(net.head) is nn.Linear and net.head.weight is net.embed.weight

    # a tied group is Bayesian whole or not at all
    bnn = vinn.bayesify(model, vinn.BayesConfig().set_name("head", None))
    assert reasons(bnn) == {
        "embed": "shared parameter (also head.weight), which stays deterministic",
        "body": None,
        "head": "excluded by config (name 'head')",
    }
    assert type(bnn.embed) is nn.Embedding and bnn.head.weight is bnn.embed.weight

    functional = TiedFunctional()
    tied_by_forward = vinn.bayesify(functional)  # forward reads the called embedding's weight: drawn whole
    assert reasons(tied_by_forward) == {"embed": None} and tied_by_forward.conversion_report.converted[0].drawn_whole


def test_untraceable_model_is_converted_by_walking_its_module_tree():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.warns(UserWarning, match="cannot be used as inputs to control flow") as caught:
        bnn = vinn.bayesify(model)
    assert "torch.fx could not trace Untraceable" in str(caught[0].message)
    report = bnn.conversion_report
    why = "TraceError: symbolically traced variables cannot be used as inputs to control flow"
    assert not report.traced and report.trace_error == why
    assert str(report).splitlines()[:2] == [
        "bayesify: 2 of 2 layers Bayesian (module tree walked)",
        f"torch.fx could not trace the model: {why}",
    ]
    assert [layer.name for layer in report.converted] == ["first", "second"]
    assert isinstance(bnn, Untraceable) and isinstance(bnn, vinn.Module)
    assert type(bnn).__name__ == "Untraceable"
    assert bnn.describe() == "Untraceable with threshold 0.0" and bnn.threshold == 0.0
    assert bnn.alias is bnn.second and type(bnn.second) is vinn.Linear
    assert torch.equal(bnn.kl, bnn.first.kl + bnn.second.kl)
    assert_same_outputs(bnn, model, torch.randn(3, 4))

    net = vinn.to_deterministic(bnn)
    assert type(net) is Untraceable and not hasattr(net, "conversion_report")
    assert type(net.second) is nn.Linear and net.alias is net.second
    with torch.no_grad():
        torch.testing.assert_close(net(torch.ones(1, 4)), model(torch.ones(1, 4)))


class FailsToTrace(nn.Module):
    """Refuses symbolic tracing with a message of several lines."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            raise NotImplementedError("no symbolic tracing here\n  (a long explanation follows)\nand more")
        return self.fc(x)


def test_report_says_why_tracing_failed_in_one_line():
    with pytest.warns(UserWarning, match=r"could not trace FailsToTrace \(NotImplementedError: no symbolic tracing here\)"):
        report = vinn.bayesify(FailsToTrace()).conversion_report
    assert not report.traced and report.trace_error == "NotImplementedError: no symbolic tracing here"
    assert "torch.fx could not trace the model: NotImplementedError: no symbolic tracing here" in str(report).splitlines()
    assert "long explanation" not in str(report)
    assert vinn.bayesify(nn.Sequential(nn.Linear(2, 2))).conversion_report.trace_error is None


def test_untraceable_result_copies_and_pickles_as_the_users_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bnn = vinn.bayesify(Untraceable())
    buffer = io.BytesIO()
    torch.save(bnn, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(bnn), torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(bnn))):
        assert type(clone) is type(bnn) and isinstance(clone, vinn.Module)
        assert clone.describe() == bnn.describe() and clone.alias is clone.second
        assert clone.conversion_report == bnn.conversion_report
        assert_same_outputs(clone, bnn, torch.randn(2, 4))
        assert clone.first.weight is not bnn.first.weight


def test_a_layer_called_twice_is_one_bayesian_layer():
    torch.manual_seed(0)
    model = CalledTwice()
    bnn = vinn.bayesify(model)
    assert reasons(bnn) == {"shared": None, "head": None}
    calls = [node.target for node in bnn.graph.nodes if node.op == "call_module"]
    assert calls == ["shared", "shared", "head"]
    assert type(bnn.shared) is vinn.Linear
    assert_same_outputs(bnn, model, torch.randn(3, 4))


def test_subclasses_and_direct_reads_are_drawn_whole_unused_layers_and_vinn_layers_kept():
    torch.manual_seed(0)
    model = Oddities()
    bnn = vinn.bayesify(model)
    assert reasons(bnn) == {
        "scaled": None,  # a subclass: its weight and bias drawn whole
        "unused": "never called in forward",
        "peeked": None,  # drawn whole
        "bayesian": "already a vinn layer",
        "plain": None,
    }
    x = torch.randn(3, 4)
    assert_same_outputs(bnn, model, x)
    # the vinn layer inside was not traced into: it still samples, and only inside forward
    with torch.no_grad():
        assert not torch.equal(bnn(x), bnn(x))
    # the subclass's own forward (2 x F.linear) runs on drawn parameters: its rows share one draw
    scaled = vinn.bayesify(model, vinn.BayesConfig().set_global(None).set_type(nn.Linear, vinn.LayerSpec(init_scale=0.1)))
    assert {layer.name for layer in scaled.conversion_report.converted} == {"scaled", "peeked", "plain"}
    assert isinstance(scaled.scaled.parametrizations.weight[0], vinn.BayesianParameter)
    with torch.no_grad():
        assert not torch.equal(scaled(x), scaled(x))


def test_the_input_model_is_unchanged():
    torch.manual_seed(0)
    model = TiedHead().train()
    state = copy.deepcopy(model.state_dict())
    types = {name: type(m) for name, m in model.named_modules()}
    tokens = torch.randint(0, 10, (3, 5))
    before = model(tokens)
    bnn = vinn.bayesify(model, prior=vinn.PretrainedPrior(0.1), init_scale=vinn.RelativeScale())
    with torch.no_grad():
        for parameter in bnn.parameters():  # the result owns its tensors
            parameter.add_(1.0)
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.training and torch.equal(model(tokens), before)
    assert not hasattr(model, "conversion_report")


def test_train_and_eval_mode_are_preserved():
    model = TinyUNet()
    model.mid.eval()  # a mixed state too
    bnn = vinn.bayesify(model)
    assert bnn.training and bnn.down.training and not bnn.mid.training
    assert not vinn.bayesify(model.eval()).training


def test_report_is_data_and_prints_readably(capsys):
    bnn = vinn.bayesify(Oddities(), verbose=True)
    printed = capsys.readouterr().out
    report = bnn.conversion_report
    assert printed.strip() == str(report)
    lines = str(report).splitlines()
    assert lines[0] == "bayesify: 3 of 5 layers Bayesian (traced by torch.fx)"
    assert lines[1].split() == ["layer", "type", "parameters", "Bayesian"]
    assert any(line.startswith("unused ") and line.endswith("no: never called in forward") for line in lines)
    assert lines[-1].startswith("Bayesian parameters: 50 of ")
    assert report.bayesian_parameters == 50 and [layer.name for layer in report.converted] == ["scaled", "peeked", "plain"]
    assert len(report.kept) == 2
    as_data = dataclasses.asdict(report)
    assert as_data["layers"][0] == {
        "name": "scaled",
        "kind": "ScaledLinear",
        "parameters": 20,
        "converted": True,
        "reason": None,
        "shared_with": None,
        "drawn_whole": True,
    }
    assert pickle.loads(pickle.dumps(report)) == report
    assert vinn.bayesify(Oddities()).conversion_report == report  # nothing printed without verbose
    assert capsys.readouterr().out == ""


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"last": 0}, ValueError, "last"),
        ({"last": -2}, ValueError, "last"),
        ({"last": 1.5}, TypeError, "last"),
        ({"last": True}, TypeError, "last"),
        ({"prior": "normal"}, TypeError, "prior"),
        ({"prior": Normal}, TypeError, "prior"),
        ({"posterior": Normal(0.0, 1.0)}, TypeError, "posterior"),
        ({"init_scale": "small"}, TypeError, "init_scale"),
        ({"init_scale": -1.0}, ValueError, "init_scale"),
        ({"config": {"fc": None}}, TypeError, "config"),
        ({"config": vinn.BayesConfig(), "init_scale": 0.1}, ValueError, "LayerSpec"),
        ({"config": vinn.BayesConfig(), "prior": vinn.PretrainedPrior()}, ValueError, "LayerSpec"),
    ],
)
def test_bad_arguments_fail_early(kwargs, error, match):
    with pytest.raises(error, match=match):
        vinn.bayesify(CalledTwice(), **kwargs)


def test_bad_models_fail_early():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vinn.bayesify(lambda x: x)
    with pytest.raises(TypeError, match=r"vinn.Linear.from_torch"):
        vinn.bayesify(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="cannot convert shared"):  # an elementwise prior of the wrong shape
        vinn.bayesify(CalledTwice(), prior=Normal(torch.zeros(5), 1.0))


def test_torchscript_models_are_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in recent torch
        scripted = torch.jit.script(nn.Sequential(nn.Linear(2, 3)))
    with pytest.raises(TypeError, match=r"model must be a Python torch.nn.Module.*before torch.jit.script"):
        vinn.bayesify(scripted)


# -- what the user set on the model is kept --------------------------------------------------------


class Blocks(nn.Module):
    """Nested containers, which torch.fx recreates in the result, and a functional layer."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)
        self.w = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        return F.linear(self.head(self.trunk(x)), self.w)


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_every_module_of_the_result_has_the_mode_of_the_input(mode):
    model = Blocks().train(mode == "train")
    if mode == "mixed":
        model.trunk[0].eval()
    bnn = vinn.bayesify(model)
    modes = dict((name, m.training) for name, m in model.named_modules())
    for name, module in bnn.named_modules():
        owner = name if name in modes else name.rpartition(".")[0]  # "w": the functional layer
        assert module.training == modes[owner], name


def test_a_fresh_conversion_of_an_eval_model_shares_its_trunk():
    torch.manual_seed(0)
    bnn = vinn.bayesify(Blocks().eval(), last=1)
    calls = []
    bnn.get_submodule("trunk.0.0").register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    vinn.sample(bnn, torch.randn(3, 3), samples=8)
    assert calls == [3], "no explicit .eval() needed"


@pytest.mark.parametrize("where", ["converted layer", "kept module", "model", "container"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "forward_with_kwargs", "full_backward"])
def test_hooks_are_kept(where, kind):
    torch.manual_seed(0)
    model = Blocks().eval()
    target = {"converted layer": model.head, "kept module": model.trunk[0][1], "model": model,
              "container": model.trunk[0]}[where]  # fmt: skip
    seen = []
    if kind == "forward":
        target.register_forward_hook(lambda module, args, out: seen.append(1) or out * 0)
    elif kind == "forward_with_kwargs":
        target.register_forward_hook(lambda module, args, kwargs, out: seen.append(1) or out * 0, with_kwargs=True)
    elif kind == "forward_pre":
        target.register_forward_pre_hook(lambda module, args: seen.append(1) or (args[0] * 0,))
    else:
        target.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append(1))
    x = torch.randn(5, 3, requires_grad=kind == "full_backward")
    expected = model(x)
    if kind == "full_backward":
        expected.sum().backward()
        bnn = vinn.bayesify(model)
        bnn(x).sum().backward()
        assert seen == [1, 1], "the backward hook ran in the result"
        return
    assert seen == [1]
    bnn = vinn.bayesify(model)
    with vinn.deterministic():
        torch.testing.assert_close(bnn(x), expected)
    assert seen == [1, 1], "the hook ran in the result"
    net = vinn.to_deterministic(bnn)
    torch.testing.assert_close(net(x), expected)
    assert seen == [1, 1, 1], "and in the deterministic model back"
    assert not any(m.training for m in net.modules())


def test_hooked_container_keeps_its_children_deterministic_with_a_reason():
    model = Blocks()
    model.trunk.register_forward_hook(lambda module, args, out: out)
    bnn = vinn.bayesify(model)
    reasons = {layer.name: layer.reason for layer in bnn.conversion_report.kept}
    assert reasons == {"trunk.0.0": "inside trunk, called whole so that its hooks keep running"}


# -- conversions that convert nothing, or config rules that match nothing ------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (vinn.BayesConfig().set_name("haed", vinn.LayerSpec()), r"set_name\('haed', ...\) matches no"),
        (vinn.BayesConfig().set_type(nn.Conv2d, vinn.LayerSpec()), r"set_type\(nn.Conv2d, ...\) matches no"),
    ],
)
def test_config_rules_matching_no_layer_warn(config, match):
    with pytest.warns(UserWarning, match=match):
        vinn.bayesify(Blocks(), config)


@pytest.mark.parametrize(
    "model, kwargs",
    [(nn.Sequential(nn.ReLU()), {}), (Blocks(), {"config": vinn.BayesConfig().set_global(None)})],
)
def test_converting_nothing_warns(model, kwargs):
    with pytest.warns(UserWarning, match="bayesify converted no layer .*KL is 0"):
        bnn = vinn.bayesify(model, **kwargs)
    assert float(bnn.kl) == 0


def test_frozen_parameters_stay_frozen():
    model = Blocks()
    model.head.requires_grad_(False)
    bnn = vinn.bayesify(model)
    head = bnn.get_submodule("head")
    assert not any(p.requires_grad for p in head.parameters()), "loc and scale of a frozen layer"
    assert all(p.requires_grad for p in bnn.get_submodule("trunk.0.0").parameters())
    net = vinn.to_deterministic(bnn)
    assert not any(p.requires_grad for p in net.get_submodule("head").parameters())


class ScaledEmbedding(nn.Embedding):
    """An nn.Embedding subclass with a forward of its own, as transformers' scaled word embeddings (BART, Gemma)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * 2.0


class TiedScaled(nn.Module):
    """Encoder and decoder embeddings and a head tied to one matrix, the embeddings subclasses."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_embed, self.decoder_embed = ScaledEmbedding(10, 4), ScaledEmbedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.decoder_embed.weight = self.head.weight = self.encoder_embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder_embed(tokens) + self.decoder_embed(tokens))


def test_tied_layers_drawn_whole_share_one_bayesian_parameter():
    torch.manual_seed(0)
    model = TiedScaled()
    bnn = vinn.bayesify(model, init_scale=0.1)
    report = bnn.conversion_report
    assert all(layer.converted and layer.drawn_whole for layer in report.layers)
    assert report.bayesian_parameters == report.total_parameters == 40  # the matrix once
    draws = [m for m in bnn.modules() if isinstance(m, vinn.BayesianParameter)]
    assert len(draws) == 1 and torch.equal(bnn.kl, draws[0].kl)
    tokens = torch.randint(0, 10, (3, 5))
    assert_same_outputs(bnn, model, tokens)
    with torch.no_grad():
        assert not torch.equal(bnn(tokens), bnn(tokens))
    net = vinn.to_deterministic(bnn)
    assert net.head.weight is net.encoder_embed.weight and type(net.head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(net(tokens), model(tokens))
