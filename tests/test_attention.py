"""vinn.MultiheadAttention: torch's layer and arguments, its state, its KL, and sampled projections
whose moments are the closed form's."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import Laplace, Normal

import vinn
from vinn.attention import OutProjection

SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors: fails by chance with probability ~1e-6 per element

CONFIGS = [
    {},
    {"bias": False},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"kdim": 5, "vdim": 3},
    {"kdim": 5, "vdim": 3, "bias": False, "add_bias_kv": True},
]


def torch_layer(embed_dim=8, num_heads=2, **kwargs) -> nn.MultiheadAttention:
    """A torch layer with every parameter random, bias_k and out_proj.bias included (torch zeroes biases)."""
    layer = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.5)
    return layer


def test_is_torchs_layer_registered_and_exported():
    layer = vinn.MultiheadAttention(8, 2)
    assert isinstance(layer, nn.MultiheadAttention) and isinstance(layer, vinn.BayesianLayer)
    assert isinstance(layer.out_proj, OutProjection) and isinstance(layer.out_proj, vinn.Linear)
    assert isinstance(layer.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert vinn.layer_types()[nn.MultiheadAttention] is vinn.MultiheadAttention
    assert vinn.MultiheadAttention.converted_by_default and "MultiheadAttention" in vinn.__all__
    assert layer.estimator == "lrt" and vinn.MultiheadAttention(8, 2, posterior=Laplace).estimator == "sample"
    assert layer.out_proj.estimator == "lrt" and layer.out_proj.init_scale == layer.init_scale


@pytest.mark.parametrize("kwargs", CONFIGS + [{"dropout": 0.1, "batch_first": True}])
def test_every_constructor_argument_and_torchs_state(kwargs, device):
    torch.manual_seed(0)
    layer = vinn.MultiheadAttention(8, 2, **kwargs, init_scale=0.05, device=device, dtype=torch.float64)
    reference = nn.MultiheadAttention(8, 2, **kwargs, device=device, dtype=torch.float64)
    assert vinn.MultiheadAttention._config(layer) == vinn.MultiheadAttention._config(reference)
    assert layer.out_proj.weight.dtype == torch.float64 and layer.out_proj.weight.device.type == device.type
    torch_keys = set(reference.state_dict())
    assert torch_keys < set(layer.state_dict())
    extra = set(layer.state_dict()) - torch_keys
    assert all(key.endswith("_log_sigma2") or "_prior_" in key for key in extra)
    # a deterministic checkpoint loads, the posterior scales and priors staying as they were
    source = torch_layer(**kwargs).to(device, torch.float64)
    scales = {k: v.clone() for k, v in layer.state_dict().items() if k in extra}
    result = layer.load_state_dict(source.state_dict(), strict=False)
    assert set(result.missing_keys) == extra and not result.unexpected_keys
    for key, value in source.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value)
    for key, value in scales.items():
        assert torch.equal(layer.state_dict()[key], value)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_from_torch_and_to_torch_round_trip_exactly(kwargs):
    torch.manual_seed(0)
    source = torch_layer(**kwargs, batch_first=True).eval()
    before = copy.deepcopy(source.state_dict())
    layer = vinn.MultiheadAttention.from_torch(source, init_scale=0.02)
    assert not layer.training and layer.batch_first
    back = layer.to_torch()
    assert type(back) is nn.MultiheadAttention and type(back.out_proj) is type(source.out_proj)
    for state in (source.state_dict(), back.state_dict()):
        assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert torch.allclose(layer.out_proj.weight_scale, torch.tensor(0.02))
    with pytest.raises(TypeError, match="takes a MultiheadAttention"):
        vinn.MultiheadAttention.from_torch(nn.Linear(2, 2))


def test_kl_counts_every_random_parameter_once():
    torch.manual_seed(0)
    for kwargs in CONFIGS:
        layer = vinn.MultiheadAttention(8, 2, **kwargs, init_scale=0.1)
        names = {n: p for n, p in layer.named_parameters() if n.endswith("weight") or n.endswith("bias")}
        names.pop("bias_k", None), names.pop("bias_v", None)  # deterministic
        expected = sum(
            torch.distributions.kl_divergence(Normal(p, layer.get_parameter(f"{n}_log_sigma2").exp().sqrt()), Normal(0.0, 1.0)).sum()
            for n, p in names.items()
        )
        torch.testing.assert_close(layer.kl, expected)
        for model in (layer, nn.Sequential(layer, nn.ReLU()), nn.ModuleList([layer, layer])):
            torch.testing.assert_close(vinn.kl(model), expected)
        layer.kl.backward()
        assert layer.out_proj.weight_log_sigma2.grad is not None


def test_reset_scale_and_priors_cover_out_proj():
    torch.manual_seed(0)
    layer = vinn.MultiheadAttention(8, 2)
    layer.reset_scale(0.2)
    assert torch.allclose(layer.out_proj.weight_scale, torch.tensor(0.2))
    assert torch.allclose(layer._scale("in_proj_weight"), torch.tensor(0.2))
    laplace = Laplace(0.0, 2.0)
    mapped = vinn.MultiheadAttention(8, 2, prior={"in_proj_weight": laplace, "out_proj.bias": laplace})
    assert mapped._prior("in_proj_weight") is not None and type(mapped._prior("in_proj_weight")) is Laplace
    assert type(mapped._prior("in_proj_bias")) is Normal and type(mapped.out_proj.bias_prior) is Laplace
    assert type(mapped.out_proj.weight_prior) is Normal
    with pytest.raises(ValueError, match="prior mapping keys"):
        vinn.MultiheadAttention(8, 2, prior={"weight": laplace})
    source = torch_layer()
    pretrained = vinn.MultiheadAttention.from_torch(source, prior=vinn.PretrainedPrior(0.1))
    assert torch.equal(pretrained.out_proj.weight_prior.loc, source.out_proj.weight)
    assert torch.equal(pretrained.in_proj_weight_prior_loc, source.in_proj_weight)
    per_unit = vinn.MultiheadAttention(8, 2, prior=vinn.EmpiricalBayesPrior(per="unit"))
    assert per_unit.in_proj_weight_prior_scale.shape == (24, 1) and per_unit.out_proj.weight_prior_scale.shape == (8, 1)
    assert vinn.MultiheadAttention(8, 2, kdim=4, prior=vinn.FanInPrior()).fan_in == 8


# -- the forward pass: torch's, for every argument ---------------------------------------------------


@st.composite
def attention_cases(draw):
    """A layer configuration and a forward call of it: every argument of torch's, the masks kept such
    that every query attends at least one key (no NaN rows)."""
    config = draw(st.sampled_from(CONFIGS)) | {"batch_first": draw(st.booleans()), "dropout": draw(st.sampled_from([0.0, 0.3]))}
    batched, self_attention = draw(st.booleans()), draw(st.booleans()) and "kdim" not in config
    length, source = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if self_attention:
        source = length
    heads, n = 2, 3
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def tensor(*shape):
        return torch.randn(*shape, generator=generator)

    def sequence(steps, features):
        if not batched:
            return tensor(steps, features)
        return tensor(n, steps, features) if config["batch_first"] else tensor(steps, n, features)

    query = sequence(length, 8)
    key = query if self_attention else sequence(source, config.get("kdim", 8))
    value = query if self_attention else sequence(source, config.get("vdim", 8))
    kind = draw(st.sampled_from(["bool", "float"]))
    causal = draw(st.booleans()) and length == source
    masks = {}
    if draw(st.booleans()):
        padding = torch.rand(n if batched else 1, source, generator=generator) < 0.4
        padding[:, 0] = False
        masks["key_padding_mask"] = padding if batched else padding[0]
    if causal or draw(st.booleans()):
        blocked = torch.ones(length, source).triu(1).bool() if causal else torch.rand(length, source, generator=generator) < 0.4
        blocked[:, 0] = False
        if not causal and draw(st.booleans()):  # one mask per example and head
            blocked = blocked | (torch.rand((n if batched else 1) * heads, length, source, generator=generator) < 0.3)
            blocked[..., 0] = False
        masks["attn_mask"] = blocked
    if kind == "float":
        masks = {k: torch.zeros(m.shape).masked_fill(m, -math.inf) + 0.1 * tensor(*m.shape) for k, m in masks.items()}
    forward = masks | {
        "need_weights": draw(st.booleans()),
        "average_attn_weights": draw(st.booleans()),
        "is_causal": causal and draw(st.booleans()),
    }
    return config, (query, key, value), forward


@settings(max_examples=80, deadline=None)
@given(case=attention_cases())
def test_forward_is_torchs_at_the_loc_and_near_it_for_tiny_scales(case):
    """Inside deterministic(), exactly torch's outputs and weights; sampling with posterior scales of 1e-7,
    the sampled path (its own attention) within float error of them."""
    config, inputs, forward = case
    torch.manual_seed(0)
    source = torch_layer(**config).eval()
    layer = vinn.MultiheadAttention.from_torch(source, init_scale=1e-7)
    expected = source(*inputs, **forward)
    with vinn.deterministic():
        output = layer(*inputs, **forward)
    for got, want in zip(output, expected):
        assert (got is None and want is None) or torch.equal(got, want)
    sampled = layer(*inputs, **forward)
    for got, want in zip(sampled, expected):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_in_training_mode_drops_attention_weights():
    torch.manual_seed(0)
    layer = vinn.MultiheadAttention(8, 2, dropout=0.5, init_scale=1e-7)
    x = torch.randn(6, 3, 8)
    _, weights = layer(x, x, x, average_attn_weights=False)
    assert (weights == 0).any() and ((weights == 0) | (weights > 0)).all()
    layer.eval()
    _, weights = layer(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 6))


def test_nested_input_and_a_causal_hint_without_mask_are_refused():
    layer = vinn.MultiheadAttention(8, 2, batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)], layout=torch.jagged)
    with pytest.raises(ValueError, match="enable_nested_tensor=False"):
        layer(nested, nested, nested)
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="is_causal"):
        layer(x, x, x, is_causal=True)


# -- sampling: the closed form's moments -------------------------------------------------------------


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """draws (S, ...) of variables with the given mean and variance: both within Z standard errors, that of
    the variance from the draws' own fourth moment (the outputs are sums of products, not Normal)."""
    s = draws.shape[0]
    centred = draws - draws.mean(0)
    fourth = centred.pow(4).mean(0)
    mean_error = (draws.mean(0) - mean).abs() / (var / s).sqrt()
    var_error = (draws.var(0) - var).abs() / ((fourth - var**2).clamp_min(0) / s).sqrt()
    assert mean_error.max() < Z, f"sample mean off by {mean_error.max():.1f} standard errors"
    assert var_error.max() < Z, f"sample variance off by {var_error.max():.1f} standard errors"


def random_scales(layer: vinn.MultiheadAttention) -> None:
    """Posterior scales that differ element by element, so that a missing or misplaced term shows."""
    with torch.no_grad():
        for module in (layer, layer.out_proj):
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith("_log_sigma2"):
                    parameter.uniform_(-4.0, -1.0)


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 5, "vdim": 3}])
def test_lrt_projections_have_the_closed_form_moments_per_token(kwargs):
    torch.manual_seed(0)
    layer = vinn.MultiheadAttention(8, 2, **kwargs, batch_first=True)
    random_scales(layer)
    query, key, value = torch.randn(8), torch.randn(layer.kdim), torch.randn(layer.vdim)
    expand = [x.expand(SAMPLES // 2, 2, -1) for x in (query, key, value)]  # 2 tokens each, same input
    with torch.no_grad():
        q, k, v = layer._in_projection(expand, self_attention=False)
    weights = [layer.in_proj_weight.chunk(3)] if layer.in_proj_weight is not None else []
    weights = weights[0] if weights else (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight)
    names = ["in_proj_weight"] * 3 if layer.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    rows = [slice(i * 8, (i + 1) * 8) for i in range(3)]
    for draws, x, w, name, r in zip((q, k, v), (query, key, value), weights, names, rows):
        s2 = layer._sigma2(name).detach()
        s2 = s2[r] if name == "in_proj_weight" else s2
        mean = w.detach() @ x + layer.in_proj_bias.detach()[r]
        var = s2 @ x**2 + layer._sigma2("in_proj_bias").detach()[r]
        assert_moments(draws.reshape(-1, 8), mean, var)
        # the two tokens of one sequence, like the examples of a batch, get independent noise
        corr = torch.corrcoef(draws[:, :, 0].T)[0, 1]
        assert corr.abs() < Z / math.sqrt(SAMPLES // 2)


def one_token_moments(layer: vinn.MultiheadAttention, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the output for one key (its attention weight is 1): out_proj(v) with v the value
    projection, both sampled: Var = Σ_j W_o² var_v + Σ_j σ_o² (m_v² + var_v) + σ_bo²."""
    d = layer.embed_dim
    w_v = layer.in_proj_weight.detach()[2 * d :]
    s2_v = layer._sigma2("in_proj_weight").detach()[2 * d :]
    m_v = w_v @ value + layer.in_proj_bias.detach()[2 * d :]
    var_v = s2_v @ value**2 + layer._sigma2("in_proj_bias").detach()[2 * d :]
    w_o, s2_o = layer.out_proj.weight.detach(), layer.out_proj.weight_scale.detach() ** 2
    mean = w_o @ m_v + layer.out_proj.bias.detach()
    var = w_o**2 @ var_v + s2_o @ (m_v**2 + var_v) + layer.out_proj.bias_scale.detach() ** 2
    return mean, var


@pytest.mark.parametrize("estimator", ["lrt", "sample", "flipout"])
def test_one_key_output_has_the_closed_form_moments(estimator):
    torch.manual_seed(1)
    layer = vinn.MultiheadAttention(4, 1, estimator=estimator)
    random_scales(layer)
    query, value = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    with torch.no_grad():
        if estimator == "lrt":  # every example of one batch its own noise
            draws = layer(query.expand(-1, SAMPLES, -1), value.expand(-1, SAMPLES, -1), value.expand(-1, SAMPLES, -1))[0][0]
        else:  # one weight draw per call
            draws = torch.cat([layer(query, value, value)[0][0] for _ in range(SAMPLES // 8)])
    mean, var = one_token_moments(layer, value[0, 0])
    assert_moments(draws, mean, var)


def test_examples_of_a_batch_get_independent_noise():
    torch.manual_seed(2)
    layer = vinn.MultiheadAttention(4, 2, init_scale=0.3, batch_first=True)
    x = torch.randn(1, 3, 4).expand(SAMPLES, -1, -1)
    with torch.no_grad():
        out = layer(x, x, x, need_weights=False)[0].reshape(SAMPLES // 2, 2, -1)
    corr = torch.stack([torch.corrcoef(out[:, :, j].T)[0, 1] for j in range(out.shape[-1])])
    assert corr.abs().max() < Z / math.sqrt(SAMPLES // 2)
    assert layer.per_example_noise
    shared = vinn.MultiheadAttention(4, 2, init_scale=0.3, batch_first=True, estimator="sample")
    with torch.no_grad():
        out = shared(x[:4], x[:4], x[:4])[0]
    assert torch.equal(out[0], out[3]) and not shared.per_example_noise


def test_gradients_reach_every_loc_and_scale():
    torch.manual_seed(0)
    for estimator in ("lrt", "sample", "flipout"):
        layer = vinn.MultiheadAttention(8, 2, add_bias_kv=True, estimator=estimator)
        x = torch.randn(5, 3, 8)
        (layer(x, x, x)[0].square().sum() + layer.kl).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), estimator


def test_the_sampled_forward_compiles_whole():
    torch.manual_seed(0)
    layer = vinn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    try:
        for need_weights in (False, True):
            compiled = torch.compile(lambda x, w=need_weights: layer(x, x, x, need_weights=w)[0], fullgraph=True, backend="eager")
            assert compiled(x).shape == (2, 3, 8) and not torch.equal(compiled(x), compiled(x))
    finally:
        torch._dynamo.reset()
