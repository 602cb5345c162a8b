"""vinn.sample's two ways of drawing a folded batch, ``draw="outputs"`` (local reparameterization) and
``draw="weights"`` (a weight draw per sample), and the choice between them: moments, which draws are
independent of which, forcing, reproducibility, the measuring pass."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Laplace

import vinn
from vinn.sampling import sampling_enabled, weight_draws_of

DRAWS = ["outputs", "weights"]


def within(estimate, expected, standard_error, z=5.0):
    """Every element of ``estimate`` within ``z`` standard errors of ``expected``."""
    return bool(((estimate - expected).abs() <= z * standard_error).all())


def check_moments(draws, mean, var):
    """(T, ...) draws against the closed-form mean and variance of each element: the mean within 5
    standard errors (sqrt(var / T)), the variance within 5 of its own (var sqrt(2 / T), Normal draws)."""
    t = draws.shape[0]
    assert within(draws.mean(0), mean, (var / t).sqrt())
    assert within(draws.var(0), var, var * math.sqrt(2 / t))


def lag_one_correlation(series):
    return torch.corrcoef(torch.stack([series[:-1], series[1:]]))[0, 1]


def watch_draws(*layers):
    """Per layer, how many weight draws each of its sampling calls made (0: it drew outputs)."""
    seen = {layer: [] for layer in layers}
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: seen[module].append(weight_draws_of(module)) if sampling_enabled() else None)
    return seen


# -- moments: either way, each example's T outputs are draws of its predictive distribution -------


@pytest.mark.parametrize("draw", DRAWS)
def test_linear_moments(draw):
    torch.manual_seed(0)
    layer = vinn.Linear(3, 2, init_scale=0.3).eval()
    x = torch.randn(4, 3)
    draws = vinn.sample(layer, x, samples=20_000, draw=draw, generator=0)
    w, b = layer.weight.detach(), layer.bias.detach()
    mean = x @ w.T + b
    var = x**2 @ (layer.weight_scale.detach() ** 2).T + layer.bias_scale.detach() ** 2
    check_moments(draws, mean, var)


@pytest.mark.parametrize("draw", DRAWS)
def test_conv_moments(draw):
    torch.manual_seed(1)
    layer = vinn.Conv2d(2, 3, 3, padding=1, init_scale=0.3).eval()
    x = torch.randn(2, 2, 5, 5)
    draws = vinn.sample(layer, x, samples=5000, draw=draw, generator=1)
    mean = F.conv2d(x, layer.weight.detach(), layer.bias.detach(), padding=1)
    var = F.conv2d(x**2, layer.weight_scale.detach() ** 2, layer.bias_scale.detach() ** 2, padding=1)
    check_moments(draws, mean, var)


@pytest.mark.parametrize("draw", [None, *DRAWS])
def test_two_layer_moments_whichever_way_each_layer_draws(draw):
    """Two linear layers without a nonlinearity: the output's mean and variance in closed form, h = W1 x + b1
    having independent elements of mean m and variance v: Var y_k = sum_j (mu_kj^2 v_j + s_kj^2 (m_j^2 + v_j)) + s_b,k^2.
    By default, for 40 examples, the first layer draws weights and the second outputs."""
    torch.manual_seed(2)
    net = nn.Sequential(vinn.Linear(2, 128, init_scale=0.3), vinn.Linear(128, 2, init_scale=0.3)).eval()
    first, second = net
    seen = watch_draws(first, second)
    x = torch.randn(40, 2)
    draws = vinn.sample(net, x, samples=10_000, draw=draw, generator=2)
    expected = {None: (True, False), "outputs": (False, False), "weights": (True, True)}[draw]
    assert (all(seen[first]), any(seen[second])) == expected
    m = x @ first.weight.detach().T + first.bias.detach()
    v = x**2 @ (first.weight_scale.detach() ** 2).T + first.bias_scale.detach() ** 2
    mu2, s2 = second.weight.detach(), second.weight_scale.detach() ** 2
    mean = m @ mu2.T + second.bias.detach()
    var = v @ (mu2**2).T + (m**2 + v) @ s2.T + second.bias_scale.detach() ** 2
    # the output is not Normal (a product of Normals): its variance's standard error from its fourth moment
    t = draws.shape[0]
    assert within(draws.mean(0), mean, (var / t).sqrt())
    kurtosis = ((draws - draws.mean(0)) ** 4).mean(0) / draws.var(0) ** 2
    assert within(draws.var(0), var, var * ((kurtosis - 1) / t).sqrt())


# -- independence: across samples always; across the examples of a sample only drawing outputs ----


@pytest.mark.parametrize("draw", DRAWS)
def test_samples_are_independent(draw):
    torch.manual_seed(3)
    layer = vinn.Linear(3, 2, init_scale=0.3).eval()
    t = 20_000
    draws = vinn.sample(layer, torch.randn(2, 3), samples=t, draw=draw, generator=3)
    for example in range(2):
        assert abs(lag_one_correlation(draws[:, example, 0])) < 5 / math.sqrt(t)


def test_drawing_outputs_makes_the_examples_of_a_sample_independent():
    torch.manual_seed(4)
    layer = vinn.Linear(3, 2, init_scale=0.3).eval()
    t = 20_000
    x = torch.randn(1, 3).expand(2, 3)  # the same example twice
    draws = vinn.sample(layer, x, samples=t, draw="outputs", generator=4)
    assert abs(torch.corrcoef(draws[:, :, 0].T)[0, 1]) < 5 / math.sqrt(t)


def test_drawing_weights_makes_each_sample_one_network():
    """Within a sample the examples share the weights: the same example twice gives the same output, and
    two examples are correlated as one draw of W makes them: Cov(y_0, y_1) = sum_i x0_i x1_i s_i^2 + s_b^2."""
    torch.manual_seed(5)
    layer = vinn.Linear(3, 1, init_scale=0.3).eval()
    t = 20_000
    twice = vinn.sample(layer, torch.randn(1, 3).expand(2, 3), samples=t, draw="weights", generator=5)
    assert torch.equal(twice[:, 0], twice[:, 1]) and not torch.equal(twice[0], twice[1])
    x = torch.randn(2, 3)
    draws = vinn.sample(layer, x, samples=t, draw="weights", generator=6)[:, :, 0]
    s2, b2 = layer.weight_scale.detach()[0] ** 2, layer.bias_scale.detach()[0] ** 2
    cov = (x[0] * x[1] * s2).sum() + b2
    rho = cov / ((x[0] ** 2 * s2).sum() + b2).sqrt() / ((x[1] ** 2 * s2).sum() + b2).sqrt()
    assert abs(torch.corrcoef(draws.T)[0, 1] - rho) < 5 * (1 - rho**2) / math.sqrt(t)


# -- the choice ------------------------------------------------------------------------------------


def test_each_layer_draws_the_cheaper_way_for_the_batch():
    """Weights cost the same for any batch, outputs grow with it: a layer draws weights once its
    outputs for one sample are many more normal numbers than its weights, and their calls' overhead
    (about 20 µs a sample: 3000 numbers) is small beside them."""
    torch.manual_seed(6)
    net = nn.Sequential(vinn.Linear(2, 64), nn.ReLU(), vinn.Linear(64, 2)).eval()
    seen = watch_draws(net[0], net[2])
    for n, expected in [(1, (0, 0)), (200, (4, 0)), (5000, (4, 4))]:
        for calls in seen.values():
            calls.clear()
        vinn.sample(net, torch.randn(n, 2), samples=4, chunk_size=4)
        assert (seen[net[0]], seen[net[2]]) == ([expected[0]], [expected[1]]), f"N = {n}"


def test_layers_that_cannot_draw_outputs_draw_weights_on_the_folded_batch():
    """A Laplace posterior (estimator 'sample'): one folded pass of T weight draws, not T passes."""
    layer = vinn.Linear(3, 2, posterior=Laplace).eval()
    rows = []
    layer.register_forward_hook(lambda module, args, out: rows.append((args[0].shape[0], weight_draws_of(module))))
    vinn.sample(layer, torch.randn(5, 3), samples=6, chunk_size=6)
    assert rows[-1] == (30, 6)


def test_the_cost_is_measured_once_per_model_and_input_shape():
    net = nn.Sequential(vinn.Linear(2, 8), nn.ReLU(), vinn.Linear(8, 2)).eval()
    measured = []
    net[0].register_forward_hook(lambda module, args, out: None if sampling_enabled() else measured.append(args[0].shape[0]))
    for n in (3, 3, 5, 3):
        vinn.sample(net, torch.randn(n, 2), samples=4)
    assert measured == [6, 10], "one pass at the posterior loc on two samples, per input shape"
    vinn.sample(net, torch.randn(3, 2), samples=4, draw="weights")
    vinn.sample(copy.deepcopy(net), torch.randn(3, 2), samples=4, draw="outputs")
    assert measured == [6, 10], "a forced draw measures nothing"


class Gumbel(nn.Module):
    """A random operation in eval mode: the measuring pass draws from the RNG too. (Before a vinn
    layer it would keep the layer drawing outputs: the measuring pass could not see its input's
    two samples equal.)"""

    def forward(self, x):
        return F.gumbel_softmax(x, tau=1.0)


def test_the_choice_draws_nothing_the_numbers_are_those_of_the_way_chosen():
    torch.manual_seed(7)
    net = nn.Sequential(vinn.Linear(2, 128), Gumbel()).eval()
    x = torch.randn(50, 2)  # the layer draws weights for 50 examples
    first = vinn.sample(copy.deepcopy(net), x, samples=5, generator=8)  # measures, then samples
    torch.testing.assert_close(first, vinn.sample(net, x, samples=5, draw="weights", generator=8), rtol=0, atol=0)
    torch.testing.assert_close(first, vinn.sample(net, x, samples=5, generator=8), rtol=0, atol=0)
    # without a generator, the global RNG advances as if the way had been forced
    fresh = copy.deepcopy(net)
    torch.manual_seed(9)
    measuring = vinn.sample(fresh, x, samples=5), torch.rand(3)
    torch.manual_seed(9)
    forced = vinn.sample(fresh, x, samples=5, draw="weights"), torch.rand(3)
    assert all(torch.equal(a, b) for a, b in zip(measuring, forced))


@pytest.mark.parametrize("draw", [None, *DRAWS])
def test_a_generator_gives_the_same_numbers(draw):
    net = nn.Sequential(vinn.Linear(2, 8), nn.ReLU(), vinn.Linear(8, 2)).eval()
    x = torch.randn(20, 2)
    first = vinn.sample(net, x, samples=4, draw=draw, generator=10)
    assert torch.equal(first, vinn.sample(net, x, samples=4, draw=draw, generator=10))
    assert not torch.equal(first[0], first[1])


class SequenceFirst(nn.Module):
    """A layer seeing (L, N, features), as in torch's sequence-first transformer blocks."""

    def __init__(self, estimator=None):
        super().__init__()
        self.linear = vinn.Linear(4, 4, estimator=estimator)

    def forward(self, x):  # x: (N, L, 4)
        return self.linear(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_whose_input_is_not_batch_first_never_draws_weights():
    torch.manual_seed(11)
    x = torch.randn(300, 6, 4)  # weights would be cheaper for 300 examples
    lrt = SequenceFirst().eval()
    seen = watch_draws(lrt.linear)
    out = vinn.sample(lrt, x, samples=4, chunk_size=4)
    assert seen[lrt.linear] == [0] and out.shape == (4, 300, 6, 4)
    # a layer that cannot draw outputs: T passes, each of one weight draw
    shared = SequenceFirst(estimator="sample").eval()
    rows = []
    shared.linear.register_forward_hook(lambda module, args, out: rows.append(args[0].shape) if sampling_enabled() else None)
    vinn.sample(shared, x, samples=4, chunk_size=4)
    assert rows == [(6, 300, 4)] * 4
    with pytest.raises(ValueError, match=r"Linear was to draw 4 weight sets.*shape \(6, 1200, 4\).*batch must be its first dimension"):
        vinn.sample(lrt, x, samples=4, chunk_size=4, draw="weights")


def test_the_shared_trunk_runs_once_either_way():
    torch.manual_seed(12)
    bnn = vinn.bayesify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), last=1).eval()
    calls = []
    bnn.get_submodule("0").register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(1, 3).expand(2, 3)
    for draw in [None, *DRAWS]:
        calls.clear()
        draws = vinn.sample(bnn, x, samples=6, draw=draw)
        assert calls == [2], draw
        assert torch.equal(draws[:, 0], draws[:, 1]) == (draw == "weights")


# -- forcing a way a layer cannot follow, and bad values --------------------------------------------


@pytest.mark.parametrize(
    "model, draw, match",
    [
        (nn.Sequential(vinn.Linear(2, 2, estimator="sample")), "outputs", r"draw='outputs'.*0 \(Linear\) has estimator='sample'"),
        (nn.Sequential(vinn.LSTM(2, 2)), "weights", r"draw='weights'.*0 \(LSTM\) cannot"),
        (vinn.Embedding(5, 2), "weights", r"draw='weights'.*the model \(Embedding\) cannot"),
    ],
)
def test_a_way_a_layer_cannot_follow_is_refused(model, draw, match):
    x = torch.zeros(2, 3, dtype=torch.long) if isinstance(model, vinn.Embedding) else torch.randn(2, 3, 2)
    with pytest.raises(ValueError, match=match):
        vinn.sample(model.eval(), x, samples=2, draw=draw)


@pytest.mark.parametrize("draw, error", [("sometimes", ValueError), ("Weights", ValueError), (1, TypeError), (True, TypeError)])
def test_bad_draw(draw, error):
    with pytest.raises(error, match=r"^draw must be None \(vinn chooses for each layer\), 'outputs' or 'weights', got"):
        vinn.predict(nn.Sequential(vinn.Linear(2, 2)), torch.randn(3, 2), samples=2, draw=draw)


def test_multiply_adds_of_convolutions():
    """What the choice counts: the products a convolution and a transposed one compute."""
    x = torch.randn(2, 4, 5, 5)
    conv = vinn.Conv2d(4, 6, 3, stride=2, groups=2)
    out = conv(x)
    assert conv._multiply_adds(out) == out.numel() * (4 // 2) * 9
    transposed = vinn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    out = transposed(x)  # every input element meets (6 / 2) * 9 weights
    assert transposed._multiply_adds(out) == pytest.approx(x.numel() * (6 // 2) * 9, rel=0.25)
