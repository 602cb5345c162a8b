"""vinn.LSTM, vinn.GRU, vinn.RNN: drop-ins of torch's recurrent layers, their two estimators, KL and conversion."""

import copy
import inspect
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import Gumbel, Laplace, Normal, kl_divergence
from torch.nn.utils.rnn import pack_padded_sequence

import vinn

PAIRS = [(vinn.LSTM, nn.LSTM), (vinn.GRU, nn.GRU), (vinn.RNN, nn.RNN)]
SAMPLES = 8_000  # forward passes for a moment check: each draws one network
Z = 5.0  # tolerance in standard errors: fails by chance with probability ~1e-6 per element


def torch_kwargs(torch_cls, draw_bool, proj: int = 0) -> dict:
    """The arguments particular to one type: LSTM's proj_size, RNN's nonlinearity."""
    if torch_cls is nn.LSTM:
        return {"proj_size": proj}
    if torch_cls is nn.RNN:
        return {"nonlinearity": "relu" if draw_bool else "tanh"}
    return {}


def states(hidden):
    """h, or (h, c), as a tuple."""
    return hidden if isinstance(hidden, tuple) else (hidden,)


def assert_equal_outputs(actual, expected):
    (output, hidden), (expected_output, expected_hidden) = actual, expected
    output = output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output
    expected_output = expected_output.data if isinstance(expected_output, nn.utils.rnn.PackedSequence) else expected_output
    torch.testing.assert_close(output, expected_output, atol=0, rtol=0)
    for a, b in zip(states(hidden), states(expected_hidden), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def zero_perturbation(layer):
    """Make flipout's draws of w - loc zero: its explicit loop then computes the torch layer's function."""
    draw = layer._draw
    layer._draw = lambda centred=False: {name: torch.zeros_like(d) for name, d in draw(centred).items()}
    return layer


# -- a drop-in: arguments, state, forward at the loc -------------------------------------------------


def test_is_the_torch_layer_registered_and_keeps_its_signature():
    for vinn_cls, torch_cls in PAIRS:
        assert issubclass(vinn_cls, torch_cls) and issubclass(vinn_cls, vinn.BayesianLayer)
        assert vinn.layer_types()[torch_cls] is vinn_cls and vinn_cls.__name__ in vinn.__all__
    parameters = inspect.signature(vinn.LSTM).parameters
    assert list(parameters)[:8] == [
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size",
    ]  # fmt: skip
    assert list(inspect.signature(vinn.RNN).parameters)[3] == "nonlinearity"
    assert {"posterior", "prior", "init_scale", "estimator", "device", "dtype"} <= set(parameters)
    assert isinstance(vinn.RNN(3, 4, 1, "relu"), nn.RNN) and vinn.RNN(3, 4, 1, "relu").nonlinearity == "relu"
    with pytest.raises(TypeError, match="pass posterior=.* by keyword"):
        vinn.GRU(3, 4, 1, True, False, 0.0, False, Laplace)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(PAIRS),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    bias=st.booleans(),
    batch_first=st.booleans(),
    flag=st.booleans(),
    proj=st.sampled_from([0, 2]),
    batched=st.booleans(),
    with_hidden=st.booleans(),
)
def test_parity_with_torch(pair, num_layers, bidirectional, bias, batch_first, flag, proj, batched, with_hidden):
    """Every configuration: the same parameters, the torch layer's output at the loc, and the way back."""
    vinn_cls, torch_cls = pair
    proj = proj if torch_cls is nn.LSTM else 0
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=batch_first,
                  **torch_kwargs(torch_cls, flag, proj))  # fmt: skip
    torch.manual_seed(0)
    reference = torch_cls(3, 4, **kwargs)
    built = vinn_cls(3, 4, **kwargs)
    assert vinn_cls._config(built) == vinn_cls._config(reference)
    layer = vinn_cls.from_torch(reference)
    assert layer.parameter_names == tuple(reference._flat_weights_names)
    assert {name for name, _ in layer.named_parameters()} == set(reference._flat_weights_names) | {
        f"{name}_log_sigma2" for name in reference._flat_weights_names
    }
    x = torch.randn(5, 3)  # 5 steps of 3 features
    if batched:  # a batch of 2
        x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    hx = None
    if with_hidden:
        shapes = [(num_layers * (1 + bidirectional), 2, proj or 4), (num_layers * (1 + bidirectional), 2, 4)]
        hx = tuple(torch.randn(shape if batched else shape[:1] + shape[2:]) for shape in shapes)
        hx = hx if torch_cls is nn.LSTM else hx[0]
    expected = reference(x, hx)
    with vinn.deterministic():
        assert_equal_outputs(layer(x, hx), expected)
    sampled = layer(x, hx)
    assert sampled[0].shape == expected[0].shape and not torch.equal(sampled[0], expected[0])
    assert [s.shape for s in states(sampled[1])] == [s.shape for s in states(expected[1])]
    back = layer.to_torch()
    assert type(back) is torch_cls and vinn_cls._config(back) == vinn_cls._config(reference)
    assert back.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert_equal_outputs(back(x, hx), expected)


@pytest.mark.parametrize("vinn_cls, torch_cls", PAIRS)
def test_state_dict_is_torchs_plus_scales_and_priors(vinn_cls, torch_cls):
    reference = torch_cls(3, 4, num_layers=2, bidirectional=True)
    layer = vinn_cls.from_torch(reference)
    names = reference._flat_weights_names
    assert any(name.endswith("_reverse") for name in names)
    vinn_keys = {f"{name}_{suffix}" for name in names for suffix in ("log_sigma2", "prior_loc", "prior_scale")}
    assert set(layer.state_dict()) == set(reference.state_dict()) | vinn_keys
    # a deterministic checkpoint loads with strict=False; a Bayesian one round-trips
    result = vinn_cls(3, 4, num_layers=2, bidirectional=True).load_state_dict(reference.state_dict(), strict=False)
    assert set(result.missing_keys) == vinn_keys and not result.unexpected_keys
    fresh = vinn_cls(3, 4, num_layers=2, bidirectional=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(6, 2, 3)
    with vinn.deterministic():
        assert_equal_outputs(fresh(x), reference(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(layer).double()
    with vinn.deterministic():
        assert_equal_outputs(loaded(x), reference(x))
        assert clone(x.double())[0].dtype == torch.float64
    assert "estimator='sample'" in repr(layer) and "prior=Normal" in repr(layer)


def test_lstm_with_projection_and_cell_state():
    torch.manual_seed(0)
    reference = nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True, batch_first=True)
    layer = vinn.LSTM.from_torch(reference)
    assert "weight_hr_l1_reverse" in layer.parameter_names and layer.weight_hr_l1_reverse_log_sigma2.shape == (2, 6)
    x = torch.randn(3, 4, 3)
    hx = (torch.randn(4, 3, 2), torch.randn(4, 3, 6))
    with vinn.deterministic():
        assert_equal_outputs(layer(x, hx), reference(x, hx))
    output, (h, c) = layer(x, hx)
    assert output.shape == (3, 4, 4) and h.shape == (4, 3, 2) and c.shape == (4, 3, 6)


@pytest.mark.parametrize("vinn_cls, torch_cls", PAIRS)
@pytest.mark.parametrize("estimator", ["sample", "flipout"])
def test_packed_sequences(vinn_cls, torch_cls, estimator):
    torch.manual_seed(0)
    reference = torch_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    layer = vinn_cls.from_torch(reference, estimator=estimator, init_scale=0.1)
    x = torch.randn(4, 6, 3)
    packed = pack_padded_sequence(x, torch.tensor([3, 6, 1, 4]), batch_first=True, enforce_sorted=False)
    with vinn.deterministic():
        assert_equal_outputs(layer(packed), reference(packed))
    output, hidden = layer(packed)
    expected_output, expected_hidden = reference(packed)
    assert isinstance(output, nn.utils.rnn.PackedSequence) and torch.equal(output.batch_sizes, expected_output.batch_sizes)
    assert output.data.shape == expected_output.data.shape and not torch.equal(output.data, expected_output.data)
    assert [s.shape for s in states(hidden)] == [s.shape for s in states(expected_hidden)]


def test_dropout_between_layers_as_torch():
    torch.manual_seed(0)
    reference = nn.GRU(3, 4, num_layers=3, dropout=0.5)
    layer = vinn.GRU.from_torch(reference)
    x = torch.randn(5, 2, 3)
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)  # the same kernel with the same weights draws the same dropout masks
    with vinn.deterministic():
        assert_equal_outputs(layer(x), expected)
    flipout = vinn.GRU.from_torch(reference, estimator="flipout").eval()
    with vinn.deterministic():
        assert_equal_outputs(flipout(x), reference.eval()(x))


def test_bad_input_is_refused_as_torch_refuses_it():
    layer = vinn.LSTM(3, 4)
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        layer(torch.randn(1, 2, 3, 3))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        layer(torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size"):
        layer(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(RuntimeError, match="input_size"):
        layer(torch.randn(5, 2, 7))


# -- estimators ------------------------------------------------------------------------------------


def test_estimator_defaults_and_refusals():
    assert vinn.LSTM(2, 3).estimator == "sample" and vinn.GRU(2, 3, posterior=Laplace).estimator == "sample"
    assert vinn.RNN(2, 3, estimator="flipout", posterior=Laplace).estimator == "flipout"
    assert not vinn.LSTM(2, 3).per_example_noise and not vinn.LSTM(2, 3, estimator="flipout").per_example_noise
    with pytest.raises(ValueError, match="'lrt' is not available for a LSTM"):
        vinn.LSTM(2, 3, estimator="lrt")
    with pytest.raises(ValueError, match="symmetric"):
        vinn.GRU(2, 3, posterior=Gumbel, estimator="flipout")
    with pytest.raises(ValueError, match="cannot convert 0: estimator='lrt' is not available"):
        vinn.bayesify(nn.Sequential(nn.LSTM(2, 3)), estimator="lrt")
    assert vinn.Linear(2, 2).estimator == "lrt", "layers that allow LRT keep it as their default"


def test_sample_draws_one_network_for_the_whole_batch():
    torch.manual_seed(0)
    layer = vinn.LSTM(3, 4, init_scale=0.3)
    x = torch.randn(6, 1, 3).expand(6, 2, 3)  # two identical sequences
    output, _ = layer(x)
    assert torch.equal(output[:, 0], output[:, 1])
    assert not torch.equal(layer(x)[0], output), "a new draw at every call"


def assert_moments(draws, mean, var):
    s = draws.shape[0]
    mean_error = (draws.mean(0) - mean).abs() / (var / s).sqrt()
    var_error = (draws.var(0) - var).abs() / (var * math.sqrt(2 / (s - 1)))
    assert mean_error.max() < Z, f"sample mean off by {mean_error.max():.1f} standard errors"
    assert var_error.max() < Z, f"sample variance off by {var_error.max():.1f} standard errors"


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["sample", "flipout"])
def test_one_step_pre_activation_moments(estimator):
    """One step from a zero state: the pre-activation a = W_ih x + b_ih + b_hh (W_hh meets only zeros)
    is Normal with mean loc_W x + loc_b and variance σ_W² x² + σ_bih² + σ_bhh², whatever the
    estimator; a tanh RNN gives it back exactly as atanh of its output."""
    torch.manual_seed(2)
    layer = vinn.RNN(3, 2, estimator=estimator, init_scale=0.2, dtype=torch.float64)
    with torch.no_grad():  # each parameter a scale of its own, each a sizeable share: a missing term shows
        layer.bias_ih_l0_log_sigma2.fill_(math.log(0.3**2))
        layer.bias_hh_l0_log_sigma2.fill_(math.log(0.2**2))
        layer.weight_hh_l0_log_sigma2.fill_(math.log(0.5))
    x = torch.randn(1, 2, 3, dtype=torch.float64)  # (steps, batch, features)
    with torch.no_grad():
        a = torch.atanh(torch.stack([layer(x)[0][0] for _ in range(SAMPLES)]))  # (samples, batch, hidden)
    w, b = layer.weight_ih_l0.detach(), layer.bias_ih_l0.detach() + layer.bias_hh_l0.detach()
    mean = x[0] @ w.T + b
    var = x[0].square() @ (0.2**2 * torch.ones_like(w)).T + 0.3**2 + 0.2**2
    assert_moments(a, mean, var)


@pytest.mark.slow
def test_flipout_gives_each_sequence_its_own_perturbation_fixed_over_its_steps():
    torch.manual_seed(3)
    layer = vinn.RNN(3, 2, estimator="flipout", init_scale=0.3, dtype=torch.float64)
    with torch.no_grad():  # no recurrence: h_t = tanh(W_ih x_t + b) shows the weights of step t alone
        layer.weight_hh_l0.zero_()
        layer.weight_hh_l0_log_sigma2.fill_(-1e4)
    x = torch.randn(1, 1, 3, dtype=torch.float64).expand(4, 2, 3)  # one input, repeated: 4 steps, 2 sequences
    with torch.no_grad():
        draws = torch.stack([layer(x)[0] for _ in range(SAMPLES // 2)])  # (samples, steps, sequences, 2)
    # the same weights at every step of a sequence (up to W_hh's perturbation, at most σ = 1e-8) ...
    torch.testing.assert_close(draws, draws[:, :1].expand_as(draws), atol=1e-6, rtol=0)
    # ... and another perturbation for the other sequence, uncorrelated with the first
    perturbation = torch.atanh(draws[:, 0]) - torch.atanh(draws[:, 0]).mean(0)  # (samples, sequences, 2)
    assert not torch.equal(draws[:, :, 0], draws[:, :, 1])
    correlation = (perturbation[:, 0] * perturbation[:, 1]).mean(0) / perturbation.std(0).prod(0)
    assert correlation.abs().max() < Z / math.sqrt(draws.shape[0])


def test_flipout_loop_computes_the_torch_layer_at_zero_perturbation():
    """The explicit loop over time, every cell, projection, direction and the packed layout, against torch's kernel."""
    torch.manual_seed(4)
    x = torch.randn(3, 5, 2)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 4]), batch_first=True, enforce_sorted=False)
    for reference in (
        nn.LSTM(2, 4, num_layers=2, proj_size=3, bidirectional=True, batch_first=True),
        nn.LSTM(2, 4, bias=False, batch_first=True),
        nn.GRU(2, 4, num_layers=2, bidirectional=True, batch_first=True),
        nn.RNN(2, 4, nonlinearity="relu", batch_first=True, bidirectional=True),
        nn.RNN(2, 4, num_layers=2, batch_first=True),
    ):
        layer = zero_perturbation(vinn.layer_types()[type(reference)].from_torch(reference, estimator="flipout"))
        for inputs in (x, packed, x[0]):
            expected, actual = reference(inputs), layer(inputs)
            torch.testing.assert_close(*[o.data if isinstance(o, nn.utils.rnn.PackedSequence) else o for o in (actual[0], expected[0])])
            for a, b in zip(states(actual[1]), states(expected[1]), strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("estimator", ["sample", "flipout"])
@pytest.mark.parametrize("vinn_cls", [vinn.LSTM, vinn.GRU, vinn.RNN])
def test_gradients_reach_every_loc_and_scale(vinn_cls, estimator):
    layer = vinn_cls(3, 4, num_layers=2, bidirectional=True, estimator=estimator)
    output, hidden = layer(torch.randn(5, 2, 3))
    (output.square().sum() + layer.kl).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0 and parameter.grad.isfinite().all(), name


# -- KL and priors ------------------------------------------------------------------------------------


def test_kl_is_the_sum_of_elementwise_normal_kls_over_every_flat_weight():
    torch.manual_seed(5)
    layer = vinn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, prior=Normal(0.0, 0.5), init_scale=0.1)
    with torch.no_grad():
        for name in layer.parameter_names:
            getattr(layer, f"{name}_log_sigma2").uniform_(-6, -2)
    expected = sum(
        kl_divergence(Normal(getattr(layer, name), layer._scale(name)), Normal(0.0, 0.5)).sum() for name in layer.parameter_names
    )
    assert len(layer.parameter_names) == 2 * 2 * 5
    torch.testing.assert_close(layer.kl, expected)
    laplace = vinn.GRU(3, 4, posterior=Laplace, prior=Laplace(0.0, 1.0))
    expected = sum(kl_divergence(laplace._posterior(name), Laplace(0.0, 1.0)).sum() for name in laplace.parameter_names)
    torch.testing.assert_close(laplace.kl, expected)


def test_priors_built_from_the_layer():
    layer = vinn.GRU(3, 16, num_layers=2, prior=vinn.FanInPrior())
    assert float(layer._prior("weight_hh_l1").scale) == pytest.approx(1 / 4)  # torch's init: 1/sqrt(hidden_size)
    layer = vinn.LSTM(3, 4, prior=vinn.EmpiricalBayesPrior(per="unit"))
    assert layer.weight_ih_l0_prior_scale.shape == (16, 1) and layer.bias_ih_l0_prior_scale.shape == ()
    source = nn.RNN(3, 4)
    layer = vinn.RNN.from_torch(source, prior=vinn.PretrainedPrior(0.1))
    assert torch.equal(layer._prior("weight_hh_l0").loc, source.weight_hh_l0.detach())
    elementwise = vinn.RNN(3, 4, prior=Normal(torch.zeros(4, 3), 2.0))  # of the first weight's shape: that weight's
    assert elementwise._prior("weight_ih_l0").batch_shape == (4, 3) and float(elementwise._prior("weight_hh_l0").scale) == 1.0
    mapping = vinn.RNN(3, 4, prior={"weight_hh_l0": Laplace(0.0, 0.1)})
    assert isinstance(mapping._prior("weight_hh_l0"), Laplace) and isinstance(mapping._prior("bias_ih_l0"), Normal)
    with pytest.raises(ValueError, match="prior mapping keys must be 'weight_ih_l0'"):
        vinn.RNN(3, 4, prior={"weight": Normal(0.0, 1.0)})
    layer.reset_parameters()  # torch's initialisation of the loc, then the scale and prior anew
    torch.testing.assert_close(layer._scale("weight_ih_l0"), torch.full((4, 3), 0.01))


# -- bayesify ---------------------------------------------------------------------------------------


class Tagger(nn.Module):
    """Embedding, a recurrent layer, a head: the usual sequence model."""

    def __init__(self, recurrent: type[nn.RNNBase], **kwargs):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.recurrent = recurrent(8, 6, batch_first=True, **kwargs)
        self.head = nn.Linear(6 * (1 + kwargs.get("bidirectional", False)), 3)

    def forward(self, tokens):
        output, _ = self.recurrent(self.embed(tokens))
        return self.head(output[:, -1])


@pytest.mark.parametrize("recurrent, kwargs", [(nn.LSTM, {"num_layers": 2}), (nn.GRU, {"bidirectional": True}), (nn.RNN, {})])
def test_bayesify_converts_samples_trains_and_goes_back(recurrent, kwargs):
    torch.manual_seed(6)
    model = Tagger(recurrent, **kwargs).eval()
    bnn = vinn.bayesify(model)
    report = bnn.conversion_report
    assert report.traced and [layer.name for layer in report.converted] == ["embed", "recurrent", "head"]
    layer = bnn.get_submodule("recurrent")
    assert type(layer) is vinn.layer_types()[recurrent] and layer.estimator == "sample"
    assert next(r for r in report.layers if r.name == "recurrent").parameters == sum(p.numel() for p in model.recurrent.parameters())
    assert report.bayesian_parameters == report.total_parameters == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 20, (4, 7))
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(bnn(tokens), model(tokens), atol=0, rtol=0)
    samples = vinn.sample(bnn, tokens, samples=3)
    assert samples.shape == (3, 4, 3) and samples.std(0).min() > 0
    bnn.train()
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=100)
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=1e-2))
    before = copy.deepcopy(layer.state_dict())
    elbo(bnn(tokens), torch.randint(0, 3, (4,))).backward()
    optimizer.step()
    assert all(not torch.equal(layer.state_dict()[f"{name}_log_sigma2"], before[f"{name}_log_sigma2"]) for name in layer.parameter_names)
    net = vinn.to_deterministic(bnn)
    assert type(net.get_submodule("recurrent")) is recurrent
    assert not any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(net(tokens), bnn(tokens), atol=0, rtol=0)


def test_bayesify_flipout_and_config_by_type():
    model = Tagger(nn.LSTM).eval()
    config = vinn.BayesConfig().set_global(None).set_type(nn.LSTM, vinn.LayerSpec(estimator="flipout", init_scale=1e-2))
    bnn = vinn.bayesify(model, config)
    assert [layer.name for layer in bnn.conversion_report.converted] == ["recurrent"]
    assert bnn.recurrent.estimator == "flipout"
    frozen = Tagger(nn.GRU).eval()
    frozen.recurrent.weight_hh_l0.requires_grad_(False)
    layer = vinn.bayesify(frozen).recurrent
    assert not layer.weight_hh_l0.requires_grad and not layer.weight_hh_l0_log_sigma2.requires_grad
    assert layer.weight_ih_l0_log_sigma2.requires_grad
