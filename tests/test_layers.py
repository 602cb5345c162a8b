"""vinn layers: argument parity with torch.nn, the LRT output distribution, posterior, prior, state."""

import copy
import io
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import Categorical, Laplace, MixtureSameFamily, Normal, StudentT, kl_divergence

import vinn

CONV_PAIRS = [
    (vinn.Conv1d, nn.Conv1d, 1),
    (vinn.Conv2d, nn.Conv2d, 2),
    (vinn.Conv3d, nn.Conv3d, 3),
]
TRANSPOSE_PAIRS = [
    (vinn.ConvTranspose1d, nn.ConvTranspose1d, 1),
    (vinn.ConvTranspose2d, nn.ConvTranspose2d, 2),
    (vinn.ConvTranspose3d, nn.ConvTranspose3d, 3),
]


def assert_same_config(bayesian: nn.Module, reference: nn.Module) -> None:
    # every torch.nn constructor argument, read back from both modules
    assert type(bayesian)._config(bayesian) == type(bayesian)._config(reference)
    assert bayesian.weight.shape == reference.weight.shape


def check_parity(vinn_cls, torch_cls, args, kwargs, x, **forward_kwargs) -> None:
    """Same constructor arguments give the same configuration; at the posterior loc, the same output."""
    torch.manual_seed(0)
    reference = torch_cls(*args, **kwargs)
    built = vinn_cls(*args, **kwargs)
    assert_same_config(built, reference)
    converted = vinn_cls.from_torch(reference)
    assert_same_config(converted, reference)
    expected = reference(x, **forward_kwargs)
    with vinn.deterministic():
        torch.testing.assert_close(converted(x, **forward_kwargs), expected, rtol=1e-5, atol=1e-6)
    sampled = converted(x, **forward_kwargs)
    assert sampled.shape == expected.shape
    assert not torch.equal(sampled, expected), "outside deterministic() every call samples"
    torch.testing.assert_close(converted.to_torch()(x, **forward_kwargs), expected)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(CONV_PAIRS),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
)
def test_conv_parity(pair, groups, kernel, stride, dilation, padding, padding_mode, bias):
    vinn_cls, torch_cls, dims = pair
    if padding == "same":
        stride = 1  # torch.nn refuses "same" with stride > 1
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    x = torch.randn(2, 4, *([7] * dims))
    check_parity(vinn_cls, torch_cls, (4, 6, kernel), kwargs, x)


@settings(max_examples=30, deadline=None)
@given(
    pair=st.sampled_from(TRANSPOSE_PAIRS),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 1),
    bias=st.booleans(),
)
def test_conv_transpose_parity(pair, groups, kernel, stride, dilation, padding, bias):
    vinn_cls, torch_cls, dims = pair
    output_padding = stride - 1  # the largest torch accepts (it must be below stride or dilation)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, bias=bias, dilation=dilation)
    if output_padding >= max(stride, dilation):
        kwargs["output_padding"] = 0
    x = torch.randn(2, 4, *([5] * dims))
    check_parity(vinn_cls, torch_cls, (4, 6, kernel), kwargs, x)


def test_conv_transpose_output_size_argument():
    x = torch.randn(1, 2, 5, 5)
    check_parity(vinn.ConvTranspose2d, nn.ConvTranspose2d, (2, 3, 3), dict(stride=2), x, output_size=[12, 12])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (5,), (2, 3, 5)])
def test_linear_parity(bias, shape):
    check_parity(vinn.Linear, nn.Linear, (5, 4), dict(bias=bias), torch.randn(*shape))


def test_tuple_and_unbatched_arguments():
    check_parity(vinn.Conv2d, nn.Conv2d, (3, 4, (3, 1)), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2)), torch.randn(3, 9, 9))


def test_factory_kwargs_and_dtype(device):
    layer = vinn.Linear(3, 2, dtype=torch.float64, device=device)
    assert layer.weight.dtype == layer.weight_log_sigma2.dtype == layer.weight_prior_loc.dtype == torch.float64
    assert layer.weight.device.type == layer.weight_log_sigma2.device.type == layer.weight_prior_loc.device.type == device.type
    assert layer(torch.randn(4, 3, dtype=torch.float64, device=device)).dtype == torch.float64
    assert layer.kl.dtype == torch.float64


def test_is_the_torch_layer_and_keeps_its_signature():
    import inspect

    assert isinstance(vinn.Conv2d(1, 2, 3), nn.Conv2d)
    params = inspect.signature(vinn.Conv2d).parameters
    assert list(params)[:9] == list(inspect.signature(nn.Conv2d).parameters)[:9]
    assert {"posterior", "prior", "init_scale", "device", "dtype"} <= set(params)


# -- the local reparameterization trick --------------------------------------------------------------

SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors: fails by chance with probability ~1e-6 per element


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """draws (S, ...) from a Normal with the given mean and variance: check both within Z standard errors."""
    s = draws.shape[0]
    mean_error = (draws.mean(0) - mean).abs() / (var / s).sqrt()
    var_error = (draws.var(0) - var).abs() / (var * math.sqrt(2 / (s - 1)))
    assert mean_error.max() < Z, f"sample mean off by {mean_error.max():.1f} standard errors"
    assert var_error.max() < Z, f"sample variance off by {var_error.max():.1f} standard errors"


@pytest.mark.parametrize("estimator", vinn.layers.ESTIMATORS)
def test_linear_output_moments(estimator, device):
    """Every estimator draws outputs with the mean and variance that weight sampling implies."""
    torch.manual_seed(1)
    layer = vinn.Linear(4, 3, init_scale=0.3, estimator=estimator, device=device)
    with torch.no_grad():
        layer.bias_log_sigma2.fill_(-1.0)  # a bias scale different from the weights' shows a missing term
    x = torch.randn(2, 4, device=device)
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(SAMPLES)])
    w_scale, b_scale = layer.weight_scale.detach(), layer.bias_scale.detach()
    mean = x @ layer.weight.detach().T + layer.bias.detach()
    var = (x**2) @ (w_scale**2).T + b_scale**2
    assert_moments(draws, mean, var)


def test_lrt_rows_of_a_batch_are_independent():
    torch.manual_seed(1)
    layer = vinn.Linear(4, 3, init_scale=0.3)
    x = torch.randn(1, 4)
    # identical inputs in one batch, uncorrelated outputs
    same = layer(x[:1].expand(SAMPLES * 2, 4)).detach().reshape(SAMPLES, 2, 3)
    corr = torch.stack([torch.corrcoef(same[:, :, j].T)[0, 1] for j in range(3)])
    assert corr.abs().max() < Z / math.sqrt(SAMPLES)


def test_conv2d_lrt_moments_match_unfolded_weights(device):
    torch.manual_seed(2)
    layer = vinn.Conv2d(2, 3, 3, padding=1, stride=2, init_scale=0.2, device=device)
    x = torch.randn(1, 2, 5, 5, device=device)
    draws = layer(x.expand(SAMPLES, -1, -1, -1)).detach()
    # the output as explicit sums over receptive fields, independently of conv2d
    patches = F.unfold(x, 3, padding=1, stride=2)[0]  # (C*k*k, L)
    w = layer.weight.detach().reshape(3, -1)
    s2 = layer.weight_scale.detach().reshape(3, -1) ** 2
    mean = (w @ patches + layer.bias.detach()[:, None]).reshape(3, 3, 3)
    var = (s2 @ patches**2 + layer.bias_scale.detach()[:, None] ** 2).reshape(3, 3, 3)
    assert_moments(draws, mean, var)


@pytest.mark.parametrize("estimator", ["sample", "flipout"])
def test_conv_estimators_keep_shapes_and_moments(estimator, device):
    torch.manual_seed(4)
    layer = vinn.Conv2d(2, 3, 3, padding=1, init_scale=0.2, estimator=estimator, device=device)
    x = torch.randn(1, 2, 4, 4, device=device)
    with torch.no_grad():
        draws = torch.stack([layer(x)[0] for _ in range(SAMPLES // 4)])
    patches = F.unfold(x, 3, padding=1)[0]
    mean = (layer.weight.detach().reshape(3, -1) @ patches + layer.bias.detach()[:, None]).reshape(3, 4, 4)
    s2 = layer.weight_scale.detach().reshape(3, -1) ** 2
    var = (s2 @ patches**2 + layer.bias_scale.detach()[:, None] ** 2).reshape(3, 4, 4)
    assert_moments(draws, mean, var)


@pytest.mark.parametrize("shape", [(4000, 7), (3, 5, 1, 1), (1,)])
def test_random_signs_are_exactly_plus_or_minus_one_of_the_shape_asked(shape, device):
    torch.manual_seed(0)
    like = torch.empty((), dtype=torch.float64, device=device)
    signs = vinn.layers.random_signs(shape, like)
    assert signs.shape == shape and signs.dtype == torch.float64 and signs.device == like.device
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}


def test_random_signs_are_fair_and_independent(device):
    """Flipout's signs, unpacked 31 to a random word: each fair, and no two correlated, neighbours
    within a word and across words' boundaries alike."""
    torch.manual_seed(0)
    like = torch.empty((), dtype=torch.float64, device=device)
    draws = torch.stack([vinn.layers.random_signs((4000, 7), like).flatten() for _ in range(8)])  # 8 x 28000
    n = draws.numel()
    assert draws.mean().abs() < Z / math.sqrt(n)
    for lag in (1, 2, 30, 31, 32):  # within a word, at and across a word's end
        correlation = (draws[:, lag:] * draws[:, :-lag]).mean()
        assert correlation.abs() < Z / math.sqrt(draws[:, lag:].numel())
    # each bit of a word on its own is fair (a biased top bit would show here)
    per_bit = draws[:, : 31 * 900].reshape(8, 900, 31).mean(dim=(0, 1))
    assert per_bit.abs().max() < Z / math.sqrt(8 * 900)


def test_estimator_defaults_and_bad_values():
    assert vinn.Linear(2, 2).estimator == "lrt" and vinn.Linear(2, 2, posterior=Laplace).estimator == "sample"
    assert vinn.Linear(2, 2, posterior=Laplace, estimator="flipout").estimator == "flipout"
    with pytest.raises(ValueError, match="estimator must be one of"):
        vinn.Linear(2, 2, estimator="bbb")
    with pytest.raises(ValueError, match="needs a Normal or MatrixNormal posterior"):
        vinn.Linear(2, 2, posterior=Laplace, estimator="lrt")
    with pytest.raises(ValueError, match="symmetric"):
        vinn.Linear(2, 2, posterior=torch.distributions.Gumbel, estimator="flipout")


def test_non_normal_posterior_samples_weights():
    torch.manual_seed(3)
    layer = vinn.Linear(3, 2, posterior=Laplace, init_scale=0.5)
    assert not layer.per_example_noise
    x = torch.randn(1, 3)
    draws = torch.stack([layer(x).detach()[0] for _ in range(SAMPLES // 4)])
    q = layer.weight_posterior
    # Laplace(loc, b) has variance 2 b²: check that the layer uses the family, not a Normal
    mean = x @ layer.weight.detach().T + layer.bias.detach()
    var = (x**2) @ (2 * q.scale.detach() ** 2).T + 2 * layer.bias_scale.detach() ** 2
    s = draws.shape[0]
    assert ((draws.mean(0) - mean[0]).abs() / (var[0] / s).sqrt()).max() < Z
    # the variance of a sum of Laplace variables has a heavier tail: use a looser, still informative bound
    assert ((draws.var(0) / var[0]) - 1).abs().max() < 0.15


def test_gradients_reach_loc_and_scale():
    layer = vinn.Conv2d(2, 3, 3, padding="same")
    (layer(torch.randn(4, 2, 6, 6)).square().sum() + layer.kl).backward()
    for name in ("weight", "bias", "weight_log_sigma2", "bias_log_sigma2"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0 and grad.isfinite().all(), name


def test_extreme_log_sigma2_stays_finite():
    layer = vinn.Linear(3, 2)
    with torch.no_grad():
        layer.weight_log_sigma2[0].fill_(-1e4)
        layer.weight_log_sigma2[1].fill_(1e4)
    torch.testing.assert_close(layer.weight_scale[0], torch.full((3,), vinn.MIN_SCALE))
    torch.testing.assert_close(layer.weight_scale[1], torch.full((3,), vinn.MAX_SCALE))
    x = torch.zeros(5, 3)  # zero input: variance exactly 0 without the bias, where sqrt' is infinite
    out = vinn.Linear(3, 2, bias=False)(x)
    out.sum().backward()
    loss = layer(torch.randn(5, 3)).sum() + layer.kl
    loss.backward()
    assert loss.isfinite() and layer.weight_log_sigma2.grad.isfinite().all()


def test_deterministic_context_is_nestable_and_thread_local():
    import threading

    layer = vinn.Linear(3, 2)
    x = torch.randn(1, 3)
    with vinn.deterministic():
        with vinn.deterministic():
            assert torch.equal(layer(x), layer(x))
        assert torch.equal(layer(x), layer(x))
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.equal(layer(x), layer(x))))
        thread.start()
        thread.join()
        assert seen == [False], "another thread keeps sampling"
    assert not torch.equal(layer(x), layer(x))
    assert not torch.equal(layer.eval()(x), layer(x)), "eval() samples too"


# -- posterior, prior, initialisation -----------------------------------------------------------------


@pytest.mark.parametrize("family", [Normal, Laplace, partial(StudentT, 4.0)])
def test_posterior_distributions(family):
    layer = vinn.Conv1d(2, 3, 3, posterior=family)
    q = layer.weight_posterior
    assert q.batch_shape == layer.weight.shape and q.loc is layer.weight
    torch.testing.assert_close(q.scale, (layer.weight_log_sigma2 / 2).exp())
    assert layer.bias_posterior.batch_shape == (3,)
    assert vinn.Conv1d(2, 3, 3, bias=False, posterior=family).bias_posterior is None


def test_init_scale_float_callable_and_reset():
    layer = vinn.Linear(10, 5, init_scale=0.05)
    torch.testing.assert_close(layer.weight_scale, torch.full((5, 10), 0.05))
    layer.reset_scale(vinn.RelativeScale(0.1, floor=1e-3))
    torch.testing.assert_close(layer.weight_scale, (0.1 * layer.weight.abs()).clamp_min(1e-3))
    torch.testing.assert_close(layer.bias_scale, (0.1 * layer.bias.abs()).clamp_min(1e-3))


def test_from_torch_copies_weights_and_leaves_module_alone():
    source = nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="circular").eval()
    before = copy.deepcopy(source.state_dict())
    layer = vinn.Conv2d.from_torch(source, init_scale=vinn.RelativeScale(0.1))
    assert not layer.training
    torch.testing.assert_close(layer.weight, source.weight)
    assert layer.weight.data_ptr() != source.weight.data_ptr()
    torch.testing.assert_close(layer.weight_scale, (0.1 * source.weight.abs()).clamp_min(1e-4))
    for key, value in source.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(TypeError, match="takes a Conv2d"):
        vinn.Conv2d.from_torch(nn.Conv1d(1, 1, 1))


def test_from_torch_assign_takes_the_module_tensors_without_copying():
    source = nn.Conv2d(3, 4, 3)
    weight, bias = source.weight.detach().clone(), source.bias.detach().clone()
    layer = vinn.Conv2d.from_torch(source, init_scale=0.01, assign=True)
    assert layer.weight.data_ptr() == source.weight.data_ptr() and layer.bias.data_ptr() == source.bias.data_ptr()
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    torch.testing.assert_close(layer.weight_scale, torch.full_like(weight, 0.01))
    # a running statistic is taken too
    norm = nn.BatchNorm1d(3)
    norm.running_mean.normal_()
    assert vinn.BatchNorm1d.from_torch(norm, assign=True).running_mean.data_ptr() == norm.running_mean.data_ptr()


def test_bayesify_assigns_its_private_copy_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    pointers = {p.data_ptr() for p in model.parameters()}
    before = copy.deepcopy(model.state_dict())
    bnn = vinn.bayesify(model)
    assert not pointers & {p.data_ptr() for p in bnn.parameters()}
    with torch.no_grad():
        for p in bnn.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_scalar_prior_is_not_copied_per_element():
    layer = vinn.Linear(100, 50)
    assert layer.weight_prior_loc.numel() == layer.weight_prior_scale.numel() == 1
    assert sum(b.numel() for b in layer.buffers()) == 4


def test_elementwise_prior_and_mapping():
    loc = torch.randn(5, 4)
    layer = vinn.Linear(4, 5, prior=Normal(loc, 0.5))
    assert torch.equal(layer.weight_prior.loc, loc) and layer.weight_prior.batch_shape == (5, 4)
    assert layer.bias_prior.batch_shape == () and float(layer.bias_prior.scale) == 1.0
    layer = vinn.Linear(4, 5, prior={"weight": Normal(loc, 0.5), "bias": Laplace(torch.zeros(5), 2.0)})
    assert isinstance(layer.bias_prior, Laplace) and layer.bias_prior.batch_shape == (5,)


def test_prior_buffers_round_trip_and_follow_to():
    mixture = MixtureSameFamily(Categorical(torch.tensor([0.25, 0.75])), Normal(torch.zeros(2), torch.tensor([1.0, 0.01])))
    layer = vinn.Linear(3, 2, prior=mixture)
    state = layer.state_dict()
    assert any(key.startswith("weight_prior_") for key in state)
    other = vinn.Linear(3, 2, prior=MixtureSameFamily(Categorical(torch.tensor([0.5, 0.5])), Normal(torch.ones(2), torch.ones(2))))
    other.load_state_dict(state)
    torch.testing.assert_close(other.weight_prior.component_distribution.scale, torch.tensor([1.0, 0.01]))
    torch.testing.assert_close(other.weight_prior.mixture_distribution.probs, torch.tensor([0.25, 0.75]))
    double = other.double()
    assert double.weight_prior.component_distribution.scale.dtype == torch.float64
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.weight_prior.component_distribution.scale, torch.tensor([1.0, 0.01]))


def test_default_prior_instance_is_never_written_through():
    layer = vinn.Linear(2, 2)
    layer.load_state_dict({**layer.state_dict(), "weight_prior_loc": torch.tensor(3.0)})
    assert float(vinn.Linear(2, 2).weight_prior.loc) == 0.0


def test_deepcopy_and_repr():
    layer = vinn.Conv2d(1, 2, 3, posterior=partial(StudentT, 3.0))
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.weight, layer.weight) and clone.weight is not layer.weight
    text = repr(layer)
    assert "posterior=partial(StudentT, 3.0)" in text and "prior=Normal" in text


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "posterior, match",
    [
        (Normal(0.0, 1.0), "pass the class"),
        (torch.distributions.Bernoulli, "loc= and scale="),
        (torch.distributions.Dirichlet, "loc= and scale="),
        ("Normal", "loc= and scale="),
    ],
)
def test_bad_posterior(posterior, match):
    with pytest.raises(TypeError, match=match):
        vinn.Linear(3, 2, posterior=posterior)


def test_bad_prior():
    with pytest.raises(TypeError, match="prior must be a torch.distributions.Distribution"):
        vinn.Linear(3, 2, prior=1.0)
    with pytest.raises(ValueError, match=r"batch shape \(3, 3\).*parameter shape \(2, 3\)"):
        vinn.Linear(3, 2, prior=Normal(torch.zeros(3, 3), 1.0))
    with pytest.raises(ValueError, match="event_shape"):
        vinn.Linear(3, 2, prior=torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3)))
    with pytest.raises(ValueError, match="prior mapping keys"):
        vinn.Linear(3, 2, prior={"weights": Normal(0.0, 1.0)})


@pytest.mark.parametrize(
    "init_scale, error",
    [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("small", TypeError),
     (True, TypeError), (None, TypeError)],
)  # fmt: skip
def test_bad_init_scale(init_scale, error):
    with pytest.raises(error, match=r"init_scale must be a float in \(1e-08, 10000.0\) or a callable"):
        vinn.Linear(3, 2, init_scale=init_scale)


@pytest.mark.parametrize("estimator, error", [("bbb", ValueError), (1, TypeError), (True, TypeError)])
def test_bad_estimator(estimator, error):
    with pytest.raises(error, match="estimator must be one of 'lrt', 'sample', 'flipout'"):
        vinn.Linear(2, 2, estimator=estimator)


@pytest.mark.parametrize(
    "build",
    [
        lambda: vinn.Linear(3, 2, True, Laplace),
        lambda: vinn.Conv2d(1, 2, 3, 1, 0, 1, 1, True, "zeros", Laplace),
        lambda: vinn.ConvTranspose1d(1, 2, 3, 1, 0, 0, 1, True, 1, "zeros", Laplace),
    ],
)
def test_posterior_passed_positionally_is_a_clear_type_error(build):
    with pytest.raises(TypeError, match=r"takes at most \d+ positional arguments .*pass posterior=.* by keyword"):
        build()


def test_numpy_integers_are_integers():
    layer = vinn.Conv2d(np.int64(2), np.int32(3), np.int64(3), padding=np.int64(1))
    assert layer(torch.randn(1, 2, 4, 4)).shape == (1, 3, 4, 4)
    assert vinn.Linear(np.int64(3), np.int16(2))(torch.randn(1, 3)).shape == (1, 2)


# -- Embedding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"padding_idx": -2}, {"max_norm": 1.5, "norm_type": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}],
)
def test_embedding_is_a_drop_in(kwargs):
    torch.manual_seed(0)
    source = nn.Embedding(12, 5, **kwargs)
    layer = vinn.Embedding.from_torch(source)
    assert isinstance(layer, nn.Embedding) and layer.padding_idx == source.padding_idx
    assert set(source.state_dict()) < set(layer.state_dict())
    assert {"weight_log_sigma2", "weight_prior_loc", "weight_prior_scale"} <= set(layer.state_dict())
    assert not any(key.startswith("bias") for key in layer.state_dict())
    tokens = torch.randint(0, 12, (3, 7))
    with vinn.deterministic():
        torch.testing.assert_close(layer(tokens), source(tokens))
    back = layer.to_torch()
    assert type(back) is nn.Embedding and back.max_norm == source.max_norm and back.sparse == source.sparse
    built = vinn.Embedding(12, 5, **kwargs)  # the constructor takes every argument too
    assert built(tokens).shape == (3, 7, 5)
    loss = layer(tokens).square().sum() + layer.kl
    loss.backward()
    assert layer.weight_log_sigma2.grad is not None and layer.weight.grad is not None


def test_embedding_noise_is_per_token_with_the_posterior_moments():
    torch.manual_seed(0)
    layer = vinn.Embedding(4, 3, init_scale=0.5)
    n = 20_000
    tokens = torch.full((n,), 2)
    with torch.no_grad():
        out = layer(tokens)
    loc, scale = layer.weight[2].detach(), layer.weight_scale[2].detach()
    # mean within 4.5 standard errors, variance within 4.5 of its standard error (2 σ⁴ / n)
    assert ((out.mean(0) - loc).abs() < 4.5 * scale / n**0.5).all()
    assert ((out.var(0) - scale**2).abs() < 4.5 * scale**2 * (2 / n) ** 0.5).all()
    # the same token at two positions: independent draws (correlation within 4.5 / sqrt(n) of 0)
    pairs = torch.no_grad()(layer)(torch.full((n, 2), 2))
    centred = pairs - pairs.mean(0)
    correlation = (centred[:, 0] * centred[:, 1]).mean(0) / (centred[:, 0].std(0) * centred[:, 1].std(0))
    assert (correlation.abs() < 4.5 / n**0.5).all()


def test_embedding_padding_vector_has_no_noise_and_sample_shares_one_draw():
    layer = vinn.Embedding(6, 4, padding_idx=0, init_scale=0.3)
    tokens = torch.tensor([[0, 3, 0, 3]])
    out = layer(tokens)
    # (the variance is floored at the dtype's tiny, 1e-38: noise of 1e-19)
    torch.testing.assert_close(out[0, 0], layer.weight[0].detach(), atol=1e-15, rtol=0)
    torch.testing.assert_close(out[0, 2], layer.weight[0].detach(), atol=1e-15, rtol=0)
    assert not torch.equal(out[0, 1], out[0, 3])  # lrt: the same token, fresh noise
    sampled = vinn.Embedding(6, 4, estimator="sample", init_scale=0.3)(tokens)
    assert torch.equal(sampled[0, 1], sampled[0, 3])  # one weight draw for the whole batch
    with pytest.raises(ValueError, match="estimator"):
        vinn.Embedding(6, 4, estimator="flipout")


def test_embedding_kl_and_bayesify():
    layer = vinn.Embedding(6, 4, prior=Normal(0.0, 2.0))
    expected = kl_divergence(layer.weight_posterior, Normal(0.0, 2.0)).sum()
    torch.testing.assert_close(layer.kl, expected)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8, padding_idx=0)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    model = Tagger().eval()
    bnn = vinn.bayesify(model)
    assert [layer.name for layer in bnn.conversion_report.converted] == ["embed", "head"]
    assert bnn.conversion_report.bayesian_parameters == 10 * 8 + 8 * 3 + 3
    tokens = torch.randint(0, 10, (2, 5))
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(tokens), model(tokens))
    assert vinn.sample(bnn, tokens, samples=3).shape == (3, 2, 5, 3)


def test_local_reparameterization_draw_and_gradient_are_those_of_its_formula():
    """normal_sample's written-out gradient equals autograd's through mean + sqrt(clamp(var)) ε,
    0 where the variance is 0 (a ReLU's dead region without bias), on the same noise."""
    from vinn.layers import normal_sample

    torch.manual_seed(0)
    mean = torch.randn(5, 3, dtype=torch.double, requires_grad=True)
    var = torch.rand(5, 3, dtype=torch.double)
    var[0, 0] = 0.0
    var.requires_grad_()
    upstream = torch.randn(5, 3, dtype=torch.double)
    torch.manual_seed(1)
    fused = normal_sample(mean, var)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (mean, var))
    torch.manual_seed(1)
    formula = mean + var.clamp_min(torch.finfo(var.dtype).tiny).sqrt() * torch.randn_like(mean)
    formula_grads = torch.autograd.grad((formula * upstream).sum(), (mean, var))
    torch.testing.assert_close(fused, formula)
    for got, expected in zip(fused_grads, formula_grads):
        torch.testing.assert_close(got, expected)
    assert fused_grads[1][0, 0] == 0
