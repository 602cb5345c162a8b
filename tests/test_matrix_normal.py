"""vinn.MatrixNormal: the distribution, its KL, and vinn.Linear(posterior=vinn.MatrixNormal)."""

import math

import pytest
import torch
from test_layers import SAMPLES, Z, assert_moments
from torch import nn
from torch.distributions import Laplace, MultivariateNormal, Normal, kl_divergence

import vinn


def random_matrix_normal(rows: int = 3, columns: int = 4, seed: int = 0) -> vinn.MatrixNormal:
    generator = torch.Generator().manual_seed(seed)
    tril = torch.randn(columns, columns, generator=generator).tril(-1) + torch.diag(torch.rand(columns, generator=generator) + 0.5)
    loc = torch.randn(rows, columns, generator=generator)
    return vinn.MatrixNormal(loc.double(), (torch.rand(rows, generator=generator) + 0.2).double(), tril.double())


def as_multivariate(q: vinn.MatrixNormal) -> MultivariateNormal:
    """The same Gaussian over the row-major flattened matrix: covariance diag(row_scale²) ⊗ V."""
    column_cov = q.column_scale_tril @ q.column_scale_tril.T
    return MultivariateNormal(q.loc.flatten(), torch.kron(torch.diag(q.row_scale.square()), column_cov))


def test_density_entropy_and_moments_equal_the_flattened_gaussian():
    q = random_matrix_normal()
    reference = as_multivariate(q)
    w = q.rsample((5,))
    assert w.shape == (5, 3, 4)
    assert torch.allclose(q.log_prob(w), reference.log_prob(w.flatten(1)))
    assert torch.allclose(q.entropy(), reference.entropy())
    assert torch.allclose(q.variance.flatten(), reference.covariance_matrix.diagonal())
    assert torch.equal(q.mean, q.loc)


def test_samples_have_the_kronecker_covariance():
    torch.manual_seed(0)
    q = random_matrix_normal(2, 3)
    draws = q.sample((SAMPLES,)).flatten(1)
    cov = as_multivariate(q).covariance_matrix
    sample_cov = torch.cov(draws.T)
    # Var of a sample covariance of Gaussians: (Σ_ij² + Σ_ii Σ_jj) / (S - 1)
    standard_error = ((cov.square() + torch.outer(cov.diagonal(), cov.diagonal())) / (SAMPLES - 1)).sqrt()
    assert ((sample_cov - cov).abs() / standard_error).max() < Z
    assert (draws.mean(0) - q.loc.flatten()).abs().div((cov.diagonal() / SAMPLES).sqrt()).max() < Z


@pytest.mark.parametrize("prior", [Normal(0.0, 1.0), Normal(torch.randn(3, 4).double(), torch.rand(3, 4).double() + 0.5)])
def test_closed_form_kl_equals_the_multivariate_one_with_gradients(prior):
    q = random_matrix_normal()
    parameters = [q.loc.requires_grad_(), q.row_scale.requires_grad_(), q.column_scale_tril.requires_grad_()]
    kl = kl_divergence(q, prior)
    prior_flat = MultivariateNormal(prior.loc.expand(3, 4).flatten(), torch.diag(prior.scale.expand(3, 4).flatten().square()))
    reference = kl_divergence(as_multivariate(q), prior_flat)
    assert kl.shape == () and torch.allclose(kl, reference)
    ours, theirs = torch.autograd.grad(kl, parameters), torch.autograd.grad(reference, parameters)
    assert torch.allclose(ours[0], theirs[0]) and torch.allclose(ours[1], theirs[1])
    # the reference reads the factor's upper triangle too (L Lᵀ as a dense product): compare the lower
    assert torch.allclose(ours[2].tril(), theirs[2].tril())


def test_monte_carlo_kl_for_a_laplace_prior_is_unbiased():
    """No closed form: the layer estimates log q(w) - Σ log p(w); E|w| of each Gaussian marginal gives the truth."""
    torch.manual_seed(0)
    layer = vinn.Linear(4, 2, bias=False, posterior=vinn.MatrixNormal, prior=Laplace(0.0, 0.5), init_scale=0.3)
    with torch.no_grad():
        layer.weight_column_tril.normal_()
    with torch.no_grad():
        q = layer.weight_posterior
    mu, sigma = q.loc.detach(), q.variance.sqrt()  # loc is the layer's weight parameter itself
    mean_abs = sigma * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * sigma**2)) + mu * torch.erf(mu / (sigma * math.sqrt(2)))
    truth = float(-q.entropy() + (math.log(2 * 0.5) + mean_abs / 0.5).sum())
    with torch.no_grad():
        estimates = torch.stack([layer.kl for _ in range(1000)]).double()
    standard_error = float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(estimates.mean()) - truth) < Z * standard_error
    # tight enough to see log q(w) summed per element instead of once: off by (o·d - 1) H(q)
    assert abs(7 * float(q.entropy())) > 50 * standard_error


@pytest.mark.parametrize("estimator", ["lrt", "sample"])
def test_linear_output_moments(estimator, device):
    """Output i of example x is Normal(loc_i·x + b_i, u_i xᵀVx + σ_b,i²) under both estimators."""
    torch.manual_seed(1)
    layer = vinn.Linear(4, 3, posterior=vinn.MatrixNormal, init_scale=0.3, estimator=estimator, device=device)
    with torch.no_grad():
        layer.weight_column_tril.normal_(0.0, 1.0)
        layer.bias_log_sigma2.fill_(-4.0)
    x = torch.randn(2, 4, device=device)
    samples = 2000  # weight sampling draws once per call: a loop
    with torch.no_grad():
        if estimator == "lrt":  # fresh noise per example: one call on the batch repeated
            draws = layer(x.repeat(SAMPLES, 1)).reshape(SAMPLES, 2, 3)
        else:
            draws = torch.stack([layer(x) for _ in range(samples)])
        q = layer.weight_posterior
        column_cov = q.column_scale_tril @ q.column_scale_tril.T
        quadratic = ((x @ column_cov) * x).sum(1, keepdim=True)
        var = quadratic * q.row_scale.square() + layer.bias_scale.square()
        mean = x @ layer.weight.T + layer.bias
        # far from what the marginal variances alone (a mean-field layer with this weight_scale) give
        mean_field_var = x.square() @ layer.weight_scale.square().T + layer.bias_scale.square()
        assert ((var - mean_field_var).abs() / var).min() > 0.2
    assert_moments(draws, mean, var)


def test_local_reparameterization_noise_is_independent_across_examples():
    torch.manual_seed(2)
    layer = vinn.Linear(4, 2, posterior=vinn.MatrixNormal, init_scale=0.3)
    same = layer(torch.randn(1, 4).expand(2 * SAMPLES, 4)).detach().reshape(SAMPLES, 2, 2)
    corr = torch.stack([torch.corrcoef(same[:, :, j].T)[0, 1] for j in range(2)])
    assert corr.abs().max() < Z / math.sqrt(SAMPLES)


def test_starts_as_the_mean_field_posterior_and_learns_its_column_covariance():
    torch.manual_seed(3)
    layer = vinn.Linear(5, 3, posterior=vinn.MatrixNormal, init_scale=0.05)
    assert torch.allclose(layer.weight_scale, torch.full((3, 5), 0.05))
    mean_field = vinn.Linear(5, 3, init_scale=0.05)
    with torch.no_grad():
        mean_field.weight.copy_(layer.weight)
        mean_field.bias.copy_(layer.bias)
    assert torch.allclose(layer.kl, mean_field.kl)
    relative = vinn.Linear(5, 3, posterior=vinn.MatrixNormal, init_scale=vinn.RelativeScale(0.5))
    variance = (0.5 * relative.weight.detach().abs()).clamp_min(1e-4).square()
    assert torch.allclose(relative.weight_scale.square(), variance.mean(1, keepdim=True).expand(3, 5))
    loss = layer(torch.randn(8, 5)).square().sum() + layer.kl
    loss.backward()
    for name in ("weight", "bias", "weight_log_sigma2", "bias_log_sigma2", "weight_column_log_sigma2", "weight_column_tril"):
        assert getattr(layer, name).grad.abs().sum() > 0, name


def test_state_dict_conversion_and_deterministic_output():
    torch.manual_seed(4)
    linear = nn.Linear(5, 3)
    layer = vinn.Linear.from_torch(linear, posterior=vinn.MatrixNormal)
    with torch.no_grad():
        layer.weight_column_tril.normal_()
    assert set(layer.state_dict()) >= {"weight", "bias", "weight_log_sigma2", "weight_column_log_sigma2", "weight_column_tril"}
    assert layer.weight_log_sigma2.shape == (3, 1)
    copy = vinn.Linear(5, 3, posterior=vinn.MatrixNormal)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.kl, layer.kl)
    x = torch.randn(2, 5)
    with vinn.deterministic():
        assert torch.equal(layer(x), linear(x))
    assert torch.equal(layer.to_torch().weight, linear.weight)


def test_bayesify_last_layer_and_learned_prior():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    bnn = vinn.bayesify(model, last=1, posterior=vinn.MatrixNormal, prior=vinn.EmpiricalBayesPrior("layer"))
    head = bnn.get_submodule("3")
    assert head.posterior is vinn.MatrixNormal and not isinstance(bnn.get_submodule("0"), vinn.BayesianLayer)
    # the learned prior's variance is the posterior's mean second moment, marginals of the matrix posterior
    bnn.kl.backward()
    second_moment = head.weight_posterior.variance + head.weight.detach().square()
    assert torch.allclose(head.weight_prior.scale.square(), second_moment.mean().expand(3, 64))
    samples = vinn.sample(bnn, torch.randn(2, 1, 6, 6), samples=3)
    assert samples.shape == (3, 2, 3)
    with pytest.raises(ValueError, match="MatrixNormal needs a layer computing"):
        vinn.bayesify(model, posterior=vinn.MatrixNormal)


def test_refusals():
    with pytest.raises(ValueError, match="symmetric"):
        vinn.Linear(3, 2, posterior=vinn.MatrixNormal, estimator="flipout")
    with pytest.raises(ValueError, match="vinn.Linear"):
        vinn.Conv1d(3, 2, 1, posterior=vinn.MatrixNormal)
    with pytest.raises(ValueError, match="rows"):
        vinn.MatrixNormal(torch.zeros(2, 3), torch.ones(3), torch.eye(3))


def test_param_groups_and_checkpoint_checks_cover_the_column_factor():
    layer = vinn.Linear(3, 2, posterior=vinn.MatrixNormal)
    slow, fast = vinn.param_groups(layer, lr=1e-3)
    assert {id(p) for p in fast["params"]} == {id(p) for p in layer.scale_parameters().values()}
    assert {id(p) for p in slow["params"]} == {id(layer.weight), id(layer.bias)}
    state = layer.state_dict()
    state["weight_column_tril"] = torch.full((3, 3), float("nan"))
    with pytest.raises(ValueError, match="weight_column_tril holds NaN"):
        layer.load_state_dict(state)
