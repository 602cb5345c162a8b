"""Choosing what becomes Bayesian (BayesConfig, last=k) and how (LayerSpec, priors, initial scales)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Laplace, Normal

import vinn
from vinn import BayesConfig, LayerSpec, PretrainedPrior


class Net(nn.Module):
    """Modules registered in an order (head first) that differs from the order forward uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
        self.w = nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 1, 6, 6)
        h = self.features(x).mean((2, 3))
        return self.head(torch.tanh(F.linear(h, self.w)))


class UntraceableNet(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3))
        if h.mean() > 0:  # data-dependent
            h = -h
        return self.head(h)


def converted(bnn: nn.Module) -> list[str]:
    return [layer.name for layer in bnn.conversion_report.converted]


def reasons(bnn: nn.Module) -> dict[str, str | None]:
    return {layer.name: layer.reason for layer in bnn.conversion_report.layers}


# -- which layers --------------------------------------------------------------------------------


def test_by_default_every_layer_is_bayesian():
    assert converted(vinn.bayesify(Net())) == ["head", "features.0", "features.2", "w"]


def test_selection_by_type():
    config = BayesConfig().set_global(None).set_type(nn.Linear, LayerSpec())
    bnn = vinn.bayesify(Net(), config)
    assert converted(bnn) == ["head", "w"]  # the functional F.linear counts as nn.Linear
    assert reasons(bnn)["features.0"] == "excluded by config (global)"
    bnn = vinn.bayesify(Net(), BayesConfig().set_type(nn.Conv2d, None))
    assert converted(bnn) == ["head", "w"]
    assert reasons(bnn)["features.2"] == "excluded by config (type Conv2d)"


def test_selection_by_name_pattern_and_precedence():
    spec = LayerSpec(init_scale=0.05)
    config = (
        BayesConfig()
        .set_global(None)
        .set_type(nn.Conv2d, LayerSpec())
        .set_name("features.*", None)  # name beats type
        .set_name("features.2", spec)  # a later pattern beats an earlier one
    )
    bnn = vinn.bayesify(Net(), config)
    assert converted(bnn) == ["features.2"]
    assert reasons(bnn) == {
        "head": "excluded by config (global)",
        "features.0": "excluded by config (name 'features.*')",
        "features.2": None,
        "w": "excluded by config (global)",
    }
    torch.testing.assert_close(bnn.get_submodule("features.2").weight_scale, torch.full_like(bnn.get_submodule("features.2").weight, 0.05))
    # setting a pattern again moves it last: it now wins over "features.2"
    config.set_name("features.*", None)
    with pytest.warns(UserWarning, match="converted no layer"):
        assert converted(vinn.bayesify(Net(), config)) == []
    assert config.spec_for("features.2", nn.Conv2d) == (None, "name 'features.*'")
    assert config.spec_for("head", nn.Linear) == (None, "global")
    assert "set_name('features.*', None)" in repr(config)


def test_which_name_patterns_address_parameters():
    spec = LayerSpec()
    config = BayesConfig().set_name("features.*", spec).set_name("*", spec).set_name("*_token", spec).set_name("pos", None)
    assert config.spec_for_parameter("features.0.weight") is None  # ending in *: layers only
    assert config.spec_for_parameter("class_token") == (spec, "name '*_token'")
    assert config.spec_for_parameter("pos") == (None, "name 'pos'")
    assert config.spec_for_parameter("other") is None  # neither global nor type rules reach parameters
    assert config.spec_for("features.0", nn.Conv2d) == (spec, "name '*'")  # every pattern still addresses layers
    layers = [("features.0", nn.Conv2d)]
    assert config.unused_rules(layers, ["class_token"]) == ["set_name('pos', ...)"]
    assert config.unused_rules(layers, ["class_token", "pos"]) == []


def test_last_k_follows_execution_order():
    bnn = vinn.bayesify(Net(), last=2)
    assert converted(bnn) == ["head", "w"]  # head is registered first but runs last
    assert reasons(bnn)["features.2"] == "excluded by last=2"
    assert converted(vinn.bayesify(Net(), last=1)) == ["head"]
    assert converted(vinn.bayesify(Net(), last=99)) == ["head", "features.0", "features.2", "w"]


def test_last_k_applies_on_top_of_the_config():
    config = BayesConfig().set_name("head", None)
    bnn = vinn.bayesify(Net(), config, last=2)
    assert converted(bnn) == ["features.2", "w"]
    assert reasons(bnn)["head"] == "excluded by config (name 'head')"
    assert reasons(bnn)["features.0"] == "excluded by last=2"


def test_last_k_in_the_fallback_follows_registration_order():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bnn = vinn.bayesify(UntraceableNet(), last=2)
    assert converted(bnn) == ["features.0", "features.2"]
    assert reasons(bnn)["head"] == "excluded by last=2"


# -- how: posterior, initial scale, prior --------------------------------------------------------


def test_posterior_and_initial_scale():
    torch.manual_seed(0)
    bnn = vinn.bayesify(Net(), posterior=Laplace, init_scale=2e-3)
    for layer in (bnn.head, bnn.w, bnn.get_submodule("features.0")):
        assert isinstance(layer.weight_posterior, Laplace)
        torch.testing.assert_close(layer.weight_scale, torch.full_like(layer.weight, 2e-3))
    relative = vinn.bayesify(Net(), init_scale=vinn.RelativeScale(0.1, floor=1e-4))
    head = relative.head
    torch.testing.assert_close(head.weight_scale, (0.1 * head.weight.abs()).clamp_min(1e-4))
    default = vinn.bayesify(Net())
    torch.testing.assert_close(default.head.weight_scale, torch.full_like(default.head.weight, 1e-3))


def test_estimator():
    bnn = vinn.bayesify(Net(), posterior=Laplace, estimator="flipout")
    assert {bnn.head.estimator, bnn.w.estimator, bnn.get_submodule("features.0").estimator} == {"flipout"}
    assert vinn.bayesify(Net()).head.estimator == "lrt"
    with pytest.raises(ValueError, match="estimator"):
        vinn.bayesify(Net(), posterior=Laplace, estimator="lrt")


def test_priors():
    torch.manual_seed(0)
    model = Net()
    default = vinn.bayesify(model).head.weight_prior
    assert isinstance(default, Normal) and float(default.loc) == 0.0 and float(default.scale) == 1.0

    laplace = vinn.bayesify(model, prior=Laplace(0.0, 0.5)).head
    assert isinstance(laplace.weight_prior, Laplace) and float(laplace.bias_prior.scale) == 0.5

    bnn = vinn.bayesify(model, prior=PretrainedPrior(scale=0.05))
    for name in ("head", "features.0"):
        layer, original = bnn.get_submodule(name), model.get_submodule(name)
        for parameter in ("weight", "bias"):
            prior = getattr(layer, f"{parameter}_prior")
            torch.testing.assert_close(prior.loc, getattr(original, parameter), atol=0, rtol=0)
            torch.testing.assert_close(prior.scale, torch.full_like(prior.loc, 0.05))
    torch.testing.assert_close(bnn.w.weight_prior.loc, model.w, atol=0, rtol=0)
    # the prior stays at the pretrained weights when the posterior moves
    with torch.no_grad():
        bnn.head.weight.add_(1.0)
    torch.testing.assert_close(bnn.head.weight_prior.loc, model.head.weight, atol=0, rtol=0)
    # centred on the weights, the prior's KL is that of N(w, s) || N(w, 0.05): no pull on the loc
    keys = bnn.state_dict().keys()
    assert {"head.weight_prior_loc", "head.weight_prior_scale", "head.bias_prior_loc", "w.weight_prior_loc"} <= keys


def test_per_type_specs():
    config = BayesConfig().set_type(nn.Conv2d, LayerSpec(posterior=Laplace, prior=PretrainedPrior(0.2), init_scale=0.01))
    bnn = vinn.bayesify(Net(), config)
    assert isinstance(bnn.get_submodule("features.0").weight_posterior, Laplace)
    assert isinstance(bnn.head.weight_posterior, Normal)
    torch.testing.assert_close(bnn.get_submodule("features.0").weight_prior.loc, bnn.get_submodule("features.0").weight.detach())


# -- the configuration objects ------------------------------------------------------------------


def test_pretrained_prior_object():
    prior = PretrainedPrior(0.5)
    assert prior == PretrainedPrior(0.5) and prior != PretrainedPrior(0.1) and hash(prior) == hash(PretrainedPrior(0.5))
    assert repr(prior) == "PretrainedPrior(scale=0.5)"
    assert pickle.loads(pickle.dumps(prior)) == prior
    layer = vinn.Linear(3, 2, bias=False)
    priors = prior.priors(layer)
    assert priors.keys() == {"weight"} and priors["weight"].loc.requires_grad is False
    for bad, error in [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("big", TypeError)]:
        with pytest.raises(error, match="scale"):
            PretrainedPrior(bad)


def test_layer_spec_validates_and_is_frozen():
    spec = LayerSpec()
    assert spec.posterior is Normal and spec.init_scale == 1e-3 and isinstance(spec.prior, Normal)
    with pytest.raises(AttributeError):
        spec.init_scale = 0.1
    with pytest.raises(TypeError, match="posterior"):
        LayerSpec(posterior="Normal")
    with pytest.raises(TypeError, match="prior"):
        LayerSpec(prior=1.0)
    with pytest.raises(TypeError, match="init_scale"):
        LayerSpec(init_scale=None)
    with pytest.raises(ValueError, match="init_scale"):
        LayerSpec(init_scale=0.0)
    with pytest.raises(ValueError, match="estimator"):
        LayerSpec(estimator="mc")


def test_bayes_config_validates():
    config = BayesConfig()
    with pytest.raises(ValueError, match="nn.Linear"):
        config.set_type(nn.ReLU, LayerSpec())
    with pytest.raises(ValueError, match="ScaledLinear|NonDynamicallyQuantizableLinear"):
        config.set_type(nn.modules.linear.NonDynamicallyQuantizableLinear, None)
    with pytest.raises(TypeError, match="module_type"):
        config.set_type("Linear", LayerSpec())
    with pytest.raises(TypeError, match="pattern"):
        config.set_name(3, None)
    for setter in (config.set_global, lambda s: config.set_name("x", s), lambda s: config.set_type(nn.Linear, s)):
        with pytest.raises(TypeError, match="spec"):
            setter({"init_scale": 0.1})
