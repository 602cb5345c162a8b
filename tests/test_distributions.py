"""KL(q || p): closed form where torch knows the pair, an unbiased Monte Carlo estimate otherwise."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Cauchy, Laplace, MixtureSameFamily, Normal, StudentT, kl_divergence

import vinn
from vinn.distributions import MAX_SCALE, MIN_SCALE, normal_draw, normal_kl


def scale_mixture(pi=0.25, sigma1=1.0, sigma2=math.exp(-6)):
    """Blundell et al.'s scale-mixture prior as a MixtureSameFamily."""
    return MixtureSameFamily(Categorical(torch.tensor([pi, 1 - pi])), Normal(torch.zeros(2), torch.tensor([sigma1, sigma2])))


@pytest.mark.parametrize(
    "posterior, prior",
    [
        (Normal, Normal(0.0, 1.0)),
        (Normal, Normal(0.3, 2.0)),
        (Normal, Laplace(0.0, 0.5)),
        (Laplace, Laplace(0.0, 1.0)),
        (Laplace, Normal(0.0, 1.0)),
        (Cauchy, Cauchy(0.0, 1.0)),
    ],
)
def test_closed_form_equals_kl_divergence_sum(posterior, prior):
    torch.manual_seed(0)
    layer = vinn.Conv2d(2, 3, 3, posterior=posterior, prior=prior, init_scale=0.1)
    expected = kl_divergence(layer.weight_posterior, prior.expand(layer.weight.shape)).sum()
    expected = expected + kl_divergence(layer.bias_posterior, prior.expand(layer.bias.shape)).sum()
    torch.testing.assert_close(layer.kl, expected)
    assert torch.equal(layer.kl, layer.kl), "a closed form is not random"


def test_closed_form_is_a_sum_not_a_mean():
    layer = vinn.Linear(10, 10, bias=False, init_scale=0.5)
    with torch.no_grad():
        layer.weight.zero_()
    per_element = 0.5 * (0.25 - 1 - math.log(0.25))  # KL(N(0, 0.5²) || N(0, 1))
    torch.testing.assert_close(layer.kl, torch.tensor(100 * per_element), rtol=1e-5, atol=1e-5)


def test_elementwise_prior_kl():
    prior_loc = torch.randn(3, 4)
    layer = vinn.Linear(4, 3, bias=False, prior=Normal(prior_loc, 0.1))
    torch.testing.assert_close(layer.kl, kl_divergence(layer.weight_posterior, Normal(prior_loc, 0.1)).sum())


def gauss_hermite_kl(loc, scale, prior, points=200):
    """E_q[log q - log p] per element by Gauss-Hermite quadrature, in float64: the reference."""
    x, w = np.polynomial.hermite_e.hermegauss(points)
    x, w = torch.tensor(x), torch.tensor(w) / math.sqrt(2 * math.pi)
    z = loc.double()[..., None] + scale.double()[..., None] * x
    q = Normal(loc.double()[..., None], scale.double()[..., None])
    integrand = q.log_prob(z) - prior.log_prob(z.float()).double()
    return (integrand * w).sum(-1)


def test_monte_carlo_kl_is_unbiased_for_a_scale_mixture_prior():
    torch.manual_seed(0)
    prior = scale_mixture()
    layer = vinn.Linear(3, 2, prior=prior, init_scale=0.05)
    reference = float(gauss_hermite_kl(layer.weight, layer.weight_scale, prior).sum() + gauss_hermite_kl(layer.bias, layer.bias_scale, prior).sum())
    with torch.no_grad():
        estimates = torch.stack([layer.kl for _ in range(4000)]).double()
    standard_error = float(estimates.std() / math.sqrt(len(estimates)))
    assert standard_error > 0, "a Monte Carlo estimate varies"
    assert abs(float(estimates.mean()) - reference) < 5 * standard_error
    # and the tolerance is tight enough to see a wrong answer: a mean instead of a sum is far off
    assert abs(reference / 8 - reference) > 50 * standard_error


@pytest.mark.parametrize("prior", [Normal(0.0, 1.0), scale_mixture()])
@pytest.mark.parametrize("posterior", [Normal, partial(StudentT, 5.0)])
def test_kl_gradients_reach_loc_and_scale(posterior, prior):
    layer = vinn.Conv1d(2, 2, 3, posterior=posterior, prior=prior)
    layer.kl.backward()
    for name in ("weight", "weight_log_sigma2", "bias", "bias_log_sigma2"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("prior_loc, prior_scale", [(0.0, 1.0), (0.3, 2.0), ("elementwise", "elementwise")])
def test_normal_kl_gradient_in_closed_form_equals_autograd_through_kl_divergence(prior_loc, prior_scale):
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 5, dtype=torch.float64, generator=generator).requires_grad_()
    log_sigma2 = (torch.randn(4, 5, dtype=torch.float64, generator=generator) - 3).requires_grad_()
    if prior_loc == "elementwise":
        prior_loc, prior_scale = torch.randn(4, 5, dtype=torch.float64, generator=generator), torch.rand(4, 5, dtype=torch.float64, generator=generator) + 0.5
    prior = Normal(torch.as_tensor(prior_loc, dtype=torch.float64), torch.as_tensor(prior_scale, dtype=torch.float64))
    got = normal_kl(loc, log_sigma2, prior.loc, prior.scale)
    want = kl_divergence(Normal(loc, (0.5 * log_sigma2).exp()), prior.expand(loc.shape)).sum()
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [loc, log_sigma2]), torch.autograd.grad(want, [loc, log_sigma2])):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(lambda m, s: normal_kl(m, s, prior.loc, prior.scale), (loc, log_sigma2))


def kl_and_gradients(layer):
    layer.zero_grad(set_to_none=True)
    kl = layer.kl
    kl.backward()
    return kl.detach(), [p.grad.clone() for p in (layer.weight, layer.weight_log_sigma2)]


def reference_kl(layer):
    q = Normal(layer.weight, layer.weight_scale)
    return kl_divergence(q, Normal(0.0, 1.0)).sum() + kl_divergence(Normal(layer.bias, layer.bias_scale), Normal(0.0, 1.0)).sum()


def test_kl_takes_sigma2_from_the_forward_pass_only_while_it_is_current():
    """The KL reuses the σ² that local reparameterization's forward pass computed (no exp, no
    allocation), with the same value and gradients, and computes its own once log σ² has changed."""
    torch.manual_seed(0)
    layer = vinn.Linear(5, 4, init_scale=0.2, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    kept = vinn.distributions._step_sigma2
    want, want_grads = kl_and_gradients(layer)  # no forward pass yet: computed here
    layer(x)
    assert layer.weight_log_sigma2 in kept
    got, got_grads = kl_and_gradients(layer)
    assert layer.weight_log_sigma2 not in kept  # taken by the KL
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    # twice through one graph: the shared σ² is not overwritten by the first backward
    out = layer(x)
    kl = layer.kl
    first = torch.autograd.grad(kl, layer.weight_log_sigma2, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(kl, layer.weight_log_sigma2)[0], first)
    torch.testing.assert_close(first, want_grads[1])
    out.sum().backward()  # the forward pass's own backward still has its σ²
    # an optimizer-like in-place update retires the forward's σ²
    layer(x)
    with torch.no_grad():
        layer.weight_log_sigma2.add_(0.5)
    assert vinn.distributions._current_sigma2(layer.weight_log_sigma2) is None
    torch.testing.assert_close(layer.kl, reference_kl(layer))
    # so does the backward pass: a KL computed before the next forward pass (``kl + nll(model(x))``)
    # is right after an update that leaves log σ²'s version alone (a write through .data)
    layer(x).sum().backward()
    assert layer.weight_log_sigma2 not in kept
    layer.weight_log_sigma2.data.sub_(0.7)
    torch.testing.assert_close(layer.kl, reference_kl(layer))
    # past the bounds, the forward pass's Σ log σ² is of the bounded log σ², as σ² is bounded
    with torch.no_grad():
        layer.weight_log_sigma2[0, :2] = torch.tensor([-100.0, 100.0])
    layer(x)
    assert layer.weight_log_sigma2 in kept
    torch.testing.assert_close(layer.kl, reference_kl(layer))


def test_kl_reuse_only_from_a_training_forward_pass_and_once():
    layer = vinn.Linear(5, 4)
    with torch.no_grad():
        layer(torch.randn(3, 5))  # prediction: nothing kept
    assert vinn.distributions._current_sigma2(layer.weight_log_sigma2) is None
    layer(torch.randn(3, 5))
    assert vinn.distributions._current_sigma2(layer.weight_log_sigma2) is not None
    assert vinn.distributions._current_sigma2(layer.weight_log_sigma2) is None  # taken: held no longer
    torch.testing.assert_close(layer.kl, reference_kl(layer))


def test_normal_kl_gradient_is_straight_through_past_the_scale_bounds():
    # σ² is clamped to [MIN_SCALE², MAX_SCALE²]; the gradient of log σ² keeps pulling it back inside
    log_sigma2 = torch.tensor([-100.0, 100.0], dtype=torch.float64, requires_grad=True)
    normal_kl(torch.zeros(2, dtype=torch.float64), log_sigma2, torch.tensor(0.0), torch.tensor(1.0)).backward()
    torch.testing.assert_close(log_sigma2.grad, 0.5 * (torch.tensor([MIN_SCALE, MAX_SCALE], dtype=torch.float64) ** 2 - 1))
    assert log_sigma2.grad[0] < 0 < log_sigma2.grad[1]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 4e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_sigma2_is_exp_of_log_sigma2_within_the_bounds(dtype, tolerance):
    """σ² goes through exp2 in float32 and float64 (on a CPU, faster than MKL's exp): within a few
    ulps of exp, clamped to the bounds, and finite at the top of float16's range."""
    low, high = vinn.distributions._variance_bounds(dtype)
    log_sigma2 = torch.linspace(math.log(low) - 5, math.log(high) + 5, 2001).to(dtype)
    variance = vinn.distributions.sigma2(torch.cat([log_sigma2, torch.tensor([-math.inf, math.inf], dtype=dtype)]))
    want = torch.cat([log_sigma2.double().exp().clamp(low, high), torch.tensor([low, high], dtype=torch.float64)])
    subnormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # float16's lower bound is one
    assert variance.dtype == dtype and variance.isfinite().all()
    assert ((variance.double() - want).abs() <= tolerance * want + subnormal).all()


@pytest.mark.parametrize("centred", [False, True])
def test_fused_normal_draw_has_the_posterior_moments_and_gradients(centred):
    torch.manual_seed(0)
    n = 200_000
    loc = torch.full((n,), 0.7, requires_grad=True)
    log_sigma2 = torch.full((n,), math.log(0.09), requires_grad=True)  # σ = 0.3
    draw = normal_draw(None if centred else loc, log_sigma2)
    mean = 0.0 if centred else 0.7
    assert abs(draw.mean().item() - mean) < 5 * 0.3 / math.sqrt(n)
    assert abs(draw.var().item() / 0.09 - 1) < 5 * math.sqrt(2 / n)
    upstream = torch.randn(n)
    (draw * upstream).sum().backward()
    deviation = (draw - mean).detach()
    torch.testing.assert_close(log_sigma2.grad, 0.5 * upstream * deviation)  # d(loc + σε)/dlog σ² = σε / 2
    assert (loc.grad is None) if centred else torch.equal(loc.grad, upstream)


def test_fused_normal_draw_is_bounded_with_a_straight_through_gradient():
    log_sigma2 = torch.tensor([2 * math.log(MAX_SCALE) + 10.0, 2 * math.log(MIN_SCALE) - 10.0], requires_grad=True)
    draw = normal_draw(None, log_sigma2)
    assert draw[0].abs() <= 6 * MAX_SCALE and draw[1].abs() <= 6 * MIN_SCALE
    draw.sum().backward()
    assert torch.all(log_sigma2.grad != 0), "a parameter past the bounds still feels the loss"
