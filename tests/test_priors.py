"""Priors built from the layer: EmpiricalBayesPrior (its KL, its optimum, its gradient, its state),
FanInPrior, PretrainedPrior's compact storage, and the validation of every prior and posterior."""

import io
import math

import pytest
import torch
from torch.distributions import (
    Cauchy,
    Gamma,
    Gumbel,
    Laplace,
    LogNormal,
    Normal,
    Poisson,
    StudentT,
    Uniform,
    kl_divergence,
    register_kl,
)
from torch.distributions import kl as torch_kl

import vinn


def _trained_like(layer: vinn.BayesianLayer, seed: int = 0) -> vinn.BayesianLayer:
    """``layer`` with locs and scales spread out as after training, so every term of the KL matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, loc in layer.random_parameters().items():
            loc.copy_(torch.randn(loc.shape, generator=generator, dtype=loc.dtype) * 0.3)
            getattr(layer, f"{name}_log_sigma2").copy_(torch.rand(loc.shape, generator=generator, dtype=loc.dtype) * 4 - 6)
    return layer


def _collapsed_kl(loc, log_sigma2, centre, dims):
    """0.5 Σ_groups [n_g log s_g² - Σ log σ²], s_g² = mean over the group of σ² + (μ - m)²: the KL at the
    optimal prior, written out with autograd through s_g (its gradient is the total derivative)."""
    second = log_sigma2.exp() + (loc - centre) ** 2
    s2 = second.mean() if dims is None else second.mean(dim=dims, keepdim=True)
    return 0.5 * ((s2.log() * torch.ones_like(loc)).sum() - log_sigma2.sum())


@pytest.mark.parametrize(
    "layer, weight_dims",
    [
        (vinn.Linear(7, 5, prior=vinn.EmpiricalBayesPrior(), dtype=torch.float64), None),
        (vinn.Linear(7, 5, prior=vinn.EmpiricalBayesPrior("unit"), dtype=torch.float64), [1]),
        (vinn.Conv2d(3, 4, 3, prior=vinn.EmpiricalBayesPrior("unit"), dtype=torch.float64), [1, 2, 3]),
        (vinn.ConvTranspose2d(3, 4, 3, prior=vinn.EmpiricalBayesPrior("unit"), dtype=torch.float64), [0, 2, 3]),
    ],
    ids=["linear-layer", "linear-unit", "conv-unit", "convtranspose-unit"],
)
def test_empirical_bayes_kl_is_the_kl_at_the_optimal_prior_with_its_total_gradient(layer, weight_dims):
    layer = _trained_like(layer)
    kl = layer.kl
    kl.backward()
    expected, grads = 0.0, {}
    for name in ("weight", "bias"):
        loc = getattr(layer, name).detach().clone().requires_grad_()
        log_sigma2 = getattr(layer, f"{name}_log_sigma2").detach().clone().requires_grad_()
        term = _collapsed_kl(loc, log_sigma2, 0.0, weight_dims if name == "weight" else None)
        term.backward()
        expected = expected + term.detach()
        grads[name] = loc.grad, log_sigma2.grad
    torch.testing.assert_close(kl.detach(), expected)
    for name, (grad_loc, grad_log_sigma2) in grads.items():
        # the prior is optimal: its own dependence on q adds nothing to the gradient (envelope theorem)
        torch.testing.assert_close(getattr(layer, name).grad, grad_loc)
        torch.testing.assert_close(getattr(layer, f"{name}_log_sigma2").grad, grad_log_sigma2)
    # the fitted scale is stored, with a scale per output unit along the layer's output dimension
    scale = layer.weight_prior_scale
    if weight_dims is None:
        assert scale.dim() == 0
    else:
        assert scale.numel() == scale.shape[layer.output_dim] == layer.weight.shape[layer.output_dim]
    assert layer.bias_prior_scale.dim() == 0


@pytest.mark.parametrize("per", ["layer", "unit"])
def test_empirical_bayes_scale_is_the_minimum_of_the_kl(per):
    layer = _trained_like(vinn.Linear(6, 4, prior=vinn.EmpiricalBayesPrior(per), dtype=torch.float64))
    with torch.no_grad():
        at_optimum = float(layer.kl)
        posterior = layer.weight_posterior
        fitted = layer.weight_prior_scale
        bias_kl = float(kl_divergence(layer.bias_posterior, layer.bias_prior).sum())
        for factor in (0.9, 0.99, 1.01, 1.1):
            moved = float(kl_divergence(posterior, Normal(0.0, fitted * factor)).sum()) + bias_kl
            assert moved > at_optimum
        # the optimum in closed form: s² = mean (σ² + μ²) over the group
        second = layer.weight_scale**2 + layer.weight**2
        expected = second.mean().sqrt() if per == "layer" else second.mean(1, keepdim=True).sqrt()
        torch.testing.assert_close(fitted, expected)


def test_empirical_bayes_follows_training_and_round_trips_through_state_dict():
    torch.manual_seed(0)
    net = torch.nn.Sequential(vinn.Linear(4, 16, prior=vinn.EmpiricalBayesPrior()), torch.nn.Tanh(), vinn.Linear(16, 1, prior=vinn.EmpiricalBayesPrior("unit")))
    before = net[0].weight_prior_scale.clone()
    optimizer = torch.optim.Adam(vinn.param_groups(net, lr=1e-2))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    elbo = vinn.ELBO(net, torch.nn.MSELoss(), dataset_size=64)
    for _ in range(20):
        optimizer.zero_grad()
        elbo(net(x), y).backward()
        optimizer.step()
    kl = vinn.kl(net).detach()
    assert not torch.equal(net[0].weight_prior_scale, before)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    fresh = torch.nn.Sequential(vinn.Linear(4, 16, prior=vinn.EmpiricalBayesPrior()), torch.nn.Tanh(), vinn.Linear(16, 1, prior=vinn.EmpiricalBayesPrior("unit")))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)
    torch.testing.assert_close(vinn.kl(fresh).detach(), kl)


def test_empirical_bayes_centred_on_pretrained_weights():
    model = torch.nn.Linear(5, 3)
    bnn = vinn.bayesify(torch.nn.Sequential(model), prior=vinn.EmpiricalBayesPrior(pretrained=True), init_scale=0.01)
    layer = bnn.get_submodule("0")
    torch.testing.assert_close(layer.weight_prior_loc, model.weight.detach())
    # at conversion q sits on the prior's centre with one σ: the fitted prior is q itself, KL 0
    torch.testing.assert_close(layer.weight_prior_scale, torch.tensor(0.01))
    assert abs(float(layer.kl.detach())) < 1e-4
    with torch.no_grad():
        layer.weight.add_(0.1)
    layer.kl
    torch.testing.assert_close(layer.weight_prior_scale, torch.tensor(math.sqrt(0.01**2 + 0.1**2)))


def test_empirical_bayes_with_a_laplace_posterior_uses_its_variance():
    layer = _trained_like(vinn.Linear(6, 4, posterior=Laplace, prior=vinn.EmpiricalBayesPrior(), dtype=torch.float64))
    layer.kl
    b = layer.weight_scale.detach()
    torch.testing.assert_close(layer.weight_prior_scale, (2 * b**2 + layer.weight.detach() ** 2).mean().sqrt())


def test_empirical_bayes_needs_a_posterior_with_a_variance():
    with pytest.raises(ValueError, match="variance"):
        vinn.Linear(3, 2, posterior=Cauchy, prior=vinn.EmpiricalBayesPrior())
    with pytest.raises(ValueError, match="variance"):
        vinn.LayerSpec(posterior=Cauchy, prior=vinn.EmpiricalBayesPrior())


@pytest.mark.parametrize("per, pretrained, error", [("row", False, ValueError), (1, False, TypeError), ("layer", "yes", TypeError)])
def test_empirical_bayes_arguments(per, pretrained, error):
    with pytest.raises(error, match="per|pretrained"):
        vinn.EmpiricalBayesPrior(per, pretrained)


def test_fan_in_prior():
    assert float(vinn.Linear(30, 20, prior=vinn.FanInPrior()).weight_prior.scale) == pytest.approx(1 / math.sqrt(30))
    conv = vinn.Conv2d(6, 4, 3, groups=2, prior=vinn.FanInPrior(gain=2.0))
    assert float(conv.weight_prior.scale) == pytest.approx(2 / math.sqrt(3 * 9))
    assert float(conv.bias_prior.scale) == pytest.approx(2 / math.sqrt(3 * 9))
    assert vinn.FanInPrior(2.0) == vinn.FanInPrior(2.0) != vinn.FanInPrior(1.0)
    assert repr(vinn.FanInPrior(2.0)) == "FanInPrior(gain=2.0)"
    for bad, error in [(0.0, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)]:
        with pytest.raises(error, match="gain"):
            vinn.FanInPrior(bad)


def test_pretrained_prior_stores_its_scale_once():
    layer = vinn.Linear(50, 40, prior=vinn.PretrainedPrior(0.1))
    assert layer.weight_prior_scale.dim() == 0 and layer.weight_prior_loc.shape == (40, 50)
    assert layer.weight_prior.scale.shape == (40, 50)  # as a distribution, the full batch shape
    expected = kl_divergence(layer.weight_posterior, Normal(layer.weight.detach(), 0.1)).sum()
    expected = expected + kl_divergence(layer.bias_posterior, Normal(layer.bias.detach(), 0.1)).sum()
    torch.testing.assert_close(layer.kl, expected)


# -- every prior and posterior checked at the boundary ------------------------------------------


@pytest.mark.parametrize(
    "prior, match",
    [
        (Normal(0.0, -1.0, validate_args=False), "scale"),
        (Normal(0.0, 0.0, validate_args=False), "scale"),
        (Normal(float("nan"), 1.0, validate_args=False), "loc"),
        (Laplace(0.0, float("nan"), validate_args=False), "scale"),
        (Poisson(1.0), "continuous"),
        (Gamma(2.0, 1.0), "real line"),
        (Uniform(-1.0, 1.0), "real line"),
        (LogNormal(0.0, 1.0), "real line"),
    ],
    ids=["negative-scale", "zero-scale", "nan-loc", "nan-scale", "discrete", "gamma", "uniform", "lognormal"],
)
def test_bad_priors_fail_at_construction(prior, match):
    with pytest.raises(ValueError, match=match):
        vinn.Linear(3, 2, prior=prior)
    with pytest.raises(ValueError, match=match):
        vinn.bayesify(torch.nn.Sequential(torch.nn.Linear(3, 2)), prior=prior)


def test_a_posterior_off_the_real_line_is_refused():
    with pytest.raises(ValueError, match="real line"):
        vinn.Linear(3, 2, posterior=LogNormal)


def test_gumbel_prior_gives_a_finite_kl():
    layer = vinn.Linear(3, 2, prior=Gumbel(0.0, 1.0))
    kl = layer.kl
    assert kl.isfinite() and kl.requires_grad


def test_a_kl_rule_registered_later_is_used():
    layer = vinn.Linear(3, 2, prior=StudentT(3.0))
    first, second = float(layer.kl), float(layer.kl)
    assert first != second  # no closed form for (Normal, StudentT): Monte Carlo

    @register_kl(Normal, StudentT)
    def _fixed(p, q):  # a stand-in rule, to see that it is the one used
        return torch.full(p.batch_shape, 0.5)

    try:
        assert float(layer.kl) == pytest.approx(0.5 * (6 + 2))
    finally:
        del torch_kl._KL_REGISTRY[Normal, StudentT]
        torch_kl._KL_MEMOIZE.clear()


def test_infinite_log_sigma2_gives_a_finite_kl_that_pulls_it_back():
    layer = vinn.Linear(3, 2)
    with torch.no_grad():
        layer.weight_log_sigma2[0, 0] = float("inf")
        layer.weight_log_sigma2[0, 1] = -float("inf")
    kl = layer.kl
    assert kl.isfinite()
    kl.backward()
    grad = layer.weight_log_sigma2.grad
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent lowers +inf and raises -inf


# -- state ------------------------------------------------------------------------------------


def test_reset_scale_that_fails_changes_nothing():
    layer = vinn.Linear(3, 2)
    before = {name: value.clone() for name, value in layer.state_dict().items()}

    def bad_for_bias(loc):
        return torch.full_like(loc, 0.1 if loc.dim() == 2 else -1.0)

    with pytest.raises(ValueError, match="init_scale"):
        layer.reset_scale(bad_for_bias)
    assert layer.init_scale == vinn.layers.DEFAULT_INIT_SCALE
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_meta_device_then_to_empty_then_reset_parameters_restores_the_prior():
    layer = vinn.Linear(4, 3, device="meta", prior=Normal(0.5, 2.0))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert float(layer.weight_prior_loc) == 0.5 and float(layer.weight_prior_scale) == 2.0
    assert layer.kl.isfinite()


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("1.weight_log_sigma2", float("nan"), "NaN or infinite"),
        ("1.bias_log_sigma2", float("inf"), "NaN or infinite"),
        ("1.weight_prior_scale", -1.0, "scale"),
        ("1.weight_prior_scale", 0.0, "scale"),
    ],
)
def test_checkpoints_with_invalid_values_are_refused_before_anything_loads(key, value, match):
    model = vinn.bayesify(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["0.weight"] += 1.0
    state[key].fill_(value)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with pytest.raises(ValueError, match=match):  # a plain torch container too
        torch.nn.Sequential(*model.children()).load_state_dict(state)


@pytest.mark.parametrize(
    "factor, floor, error",
    [("0.1", 1e-4, TypeError), (0.1, None, TypeError), (-0.1, 1e-4, ValueError), (float("nan"), 1e-4, ValueError), (0.1, 0.0, ValueError)],
)
def test_relative_scale_checks_its_arguments_when_built(factor, floor, error):
    with pytest.raises(error, match="RelativeScale"):
        vinn.RelativeScale(factor, floor)
