"""Parameters made Bayesian on request (vinn.BayesianParameter, a parametrization) and tied weights sharing
one posterior: the draws, the KL, gradients, state_dict, to_deterministic, through torch.fx and the module tree."""

from __future__ import annotations

import copy
import importlib
import io
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.distributions import Laplace, Normal, kl_divergence
from torch.nn.utils import parametrize

import vinn
from vinn import BayesConfig, LayerSpec
from vinn.parametrization import BayesianParameter

conversion = importlib.import_module("vinn.convert.bayesify")  # the module, which vinn.convert.bayesify (the function) hides


class Holder(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(shape))


def _refuse(*args: object, **kwargs: object) -> None:
    raise torch.fx.proxy.TraceError("refused for the test")


def _bayesify(model: nn.Module, config: BayesConfig | None, traced: bool, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """``vinn.bayesify(model, config)``, through torch.fx or (``traced`` False) the module-tree fallback."""
    if traced:
        return vinn.bayesify(model, config)
    with monkeypatch.context() as patch:
        patch.setattr(conversion._HookKeepingTracer, "trace", _refuse)
        with pytest.warns(UserWarning, match="could not trace"):
            return vinn.bayesify(model, config)


# -- the parametrization on its own ------------------------------------------------------------


@pytest.mark.parametrize(("posterior", "kurtosis"), [(Normal, 3.0), (Laplace, 6.0)])
def test_each_read_is_a_draw_with_the_posterior_moments(posterior, kurtosis):
    torch.manual_seed(0)
    module = Holder((50,))
    parametrization = BayesianParameter.register(module, "p", posterior=posterior, init_scale=0.3)
    loc = module.parametrizations.p.original
    assert parametrization.weight is loc and parametrization.estimator == "sample"
    n = 4000
    with torch.no_grad():
        draws = torch.stack([module.p for _ in range(n)])
    q = parametrization.weight_posterior
    # standard errors of the mean and of the sample variance (which depends on the kurtosis)
    assert ((draws.mean(0) - q.mean).abs() < 4.5 * (q.variance / n).sqrt()).all()
    assert ((draws.var(0) / q.variance - 1).abs() < 4.5 * math.sqrt((kurtosis - 1) / n)).all()
    with vinn.deterministic():
        assert module.p is loc  # the loc itself, no noise
    with parametrize.cached():
        assert torch.equal(module.p, module.p)  # one draw per cached block, as torch's parametrizations


@pytest.mark.parametrize(
    "prior",
    [Normal(0.3, 1.5), Normal(torch.zeros(5, 3), torch.full((5, 3), 2.0)), vinn.PretrainedPrior(0.1)],
    ids=["scalar", "elementwise", "pretrained"],
)
def test_kl_is_torchs_and_counted_by_vinn_kl(prior):
    torch.manual_seed(0)
    module = Holder((5, 3))
    parametrization = BayesianParameter.register(module, "p", prior=prior, init_scale=0.2)
    loc = module.parametrizations.p.original
    torch_prior = Normal(loc.detach().clone(), 0.1) if isinstance(prior, vinn.PretrainedPrior) else prior
    expected = kl_divergence(Normal(loc, 0.2), torch_prior).sum()
    torch.testing.assert_close(parametrization.kl, expected)
    torch.testing.assert_close(vinn.kl(module), expected)
    assert vinn.kl(module).dim() == 0


def test_gradients_reach_the_loc_and_the_log_variance():
    torch.manual_seed(0)
    module = Holder((4, 3))
    parametrization = BayesianParameter.register(module, "p", init_scale=0.1)
    weights = torch.randn(4, 3)
    loss = (module.p * weights).square().sum() + vinn.kl(module)
    loss.backward()
    for parameter in (module.parametrizations.p.original, parametrization.weight_log_sigma2):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0 and parameter.grad.isfinite().all()
    scales = vinn.param_groups(module, lr=1e-3)[1]["params"]
    assert len(scales) == 1 and scales[0] is parametrization.weight_log_sigma2  # learns at the scales' rate
    frozen = Holder((2,))
    frozen.p.requires_grad_(False)
    assert not BayesianParameter.register(frozen, "p").weight_log_sigma2.requires_grad  # frozen with its loc


def test_a_parameter_is_drawn_whole():
    with pytest.raises(ValueError, match="estimator must be 'sample'"):
        BayesianParameter(torch.zeros(3), estimator="lrt")
    with pytest.raises(ValueError, match="no parameter 'q'"):
        BayesianParameter.register(Holder((2,)), "q")


# -- through bayesify: a torchvision ViT ------------------------------------------------------------


def _vit() -> nn.Module:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts it at zero: the output would be constant
    return vit.eval()


TOKENS = BayesConfig().set_name("class_token", LayerSpec(init_scale=0.05)).set_name("encoder.pos_embedding", LayerSpec(init_scale=0.05))


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "module_tree"])
def test_vit_class_token_and_position_embedding_become_bayesian(traced, monkeypatch):
    vit = _vit()
    bnn = _bayesify(vit, TOKENS, traced, monkeypatch)
    report = bnn.conversion_report
    assert report.traced == traced
    rows = {layer.name: layer for layer in report.layers if layer.kind == "Parameter"}
    assert {name: (row.parameters, row.converted) for name, row in rows.items()} == {
        "class_token": (32, True), "encoder.pos_embedding": (17 * 32, True),
    }
    assert report.bayesian_parameters == sum(layer.parameters for layer in report.converted)
    lines = str(report).splitlines()
    assert "and 2 of 2 named parameters Bayesian" in lines[0]
    assert ["class_token", "Parameter", "32", "yes"] in [line.split() for line in lines]

    tokens = bnn.get_submodule("parametrizations.class_token")
    position = bnn.get_submodule("encoder.parametrizations.pos_embedding")
    assert torch.equal(tokens.original, vit.class_token) and isinstance(tokens[0], BayesianParameter)
    assert tokens[0].weight is tokens.original and position[0].weight is position.original
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        with vinn.deterministic():
            torch.testing.assert_close(bnn(x), vit(x), atol=1e-6, rtol=0)
        assert not torch.allclose(bnn(x), bnn(x))
        assert vinn.sample(bnn, x, samples=4).shape == (4, 3, 10)
    # each parameter's KL is torch's, and the model's KL is the layers' plus theirs
    for holder in (tokens, position):
        torch.testing.assert_close(holder[0].kl, kl_divergence(Normal(holder.original, 0.05), Normal(0.0, 1.0)).sum())
    assert sum(isinstance(m, BayesianParameter) for m in bnn.modules()) == 2
    layers_only = _bayesify(vit, None, traced, monkeypatch)
    torch.testing.assert_close(bnn.kl, layers_only.kl + tokens[0].kl + position[0].kl)

    # an ELBO step reaches both parameters of each posterior
    loss = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=100)(bnn(x), torch.tensor([1, 2, 3]))
    loss.backward()
    for holder in (tokens, position):
        assert holder.original.grad.abs().sum() > 0 and holder[0].weight_log_sigma2.grad.abs().sum() > 0

    # copies: deepcopy always; whole-module pickling where torch allows it (parametrize refuses it)
    torch.testing.assert_close(copy.deepcopy(bnn).kl, bnn.kl)
    buffer = io.BytesIO()
    if traced:  # the graph calls the parametrizations: no parametrized class
        torch.save(bnn, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False).kl, bnn.kl)
    else:
        assert type(bnn).__name__ == "ParametrizedVisionTransformer" and isinstance(bnn, type(vit))
        with pytest.raises(RuntimeError, match="only supported through state_dict"):
            torch.save(bnn, buffer)


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "module_tree"])
def test_vit_state_dict_and_the_way_back(traced, monkeypatch):
    vit = _vit()
    bnn = _bayesify(vit, TOKENS, traced, monkeypatch)
    keys = set(bnn.state_dict())
    assert {
        "parametrizations.class_token.original",
        "parametrizations.class_token.0.weight_log_sigma2",
        "parametrizations.class_token.0.weight_prior_loc",
        "parametrizations.class_token.0.weight_prior_scale",
        "encoder.parametrizations.pos_embedding.original",
    } <= keys
    assert not {"class_token", "encoder.pos_embedding"} & keys

    # a deterministic checkpoint loads, the parameters from their own keys
    other = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    with torch.no_grad():
        other.class_token.normal_()
    missing, unexpected = bnn.load_state_dict(other.state_dict(), strict=False)
    assert not unexpected and missing and all(key.endswith(("_log_sigma2", "_prior_loc", "_prior_scale")) for key in missing)
    assert torch.equal(bnn.get_submodule("parametrizations.class_token").original, other.class_token)
    with pytest.raises(RuntimeError, match="comes from a deterministic model"):
        bnn.load_state_dict(other.state_dict())  # strict: the posterior scales are missing

    # the Bayesian state round-trips into a fresh conversion
    with torch.no_grad():
        bnn.get_submodule("parametrizations.class_token.0").weight_log_sigma2.fill_(-3.0)
    again = _bayesify(vit, TOKENS, traced, monkeypatch)
    again.load_state_dict(bnn.state_dict())
    for key, value in bnn.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # back to torch.nn: plain parameters under their own names, holding the loc
    net = vinn.to_deterministic(bnn)
    assert not any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert set(net.state_dict()) == set(vit.state_dict())
    assert isinstance(net.class_token, nn.Parameter) and torch.equal(net.class_token, other.class_token)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vinn.deterministic():
        assert torch.equal(net(x), bnn(x))
        assert torch.equal(vinn.to_deterministic(bnn)(x), net(x))  # bnn itself untouched by the way back
    assert type(net) is type(vit) or (traced and isinstance(net, torch.fx.GraphModule))


def test_naming_parameters_in_a_config(recwarn):
    vit = _vit()
    # patterns ending in * address layers only: nothing else changes
    bnn = vinn.bayesify(vit, BayesConfig().set_name("*", LayerSpec()).set_name("encoder.*", LayerSpec()))
    assert not [layer for layer in bnn.conversion_report.layers if layer.kind == "Parameter"]

    # the weight of a layer that becomes Bayesian is Bayesian with it: not a parameter of its own
    bnn = vinn.bayesify(vit, BayesConfig().set_name("heads.head.weight", LayerSpec()))
    assert not [layer for layer in bnn.conversion_report.layers if layer.kind == "Parameter"]
    assert isinstance(bnn.heads.head, vinn.Linear)

    attention = "encoder.layers.encoder_layer_0.self_attention"
    config = (
        BayesConfig()
        .set_global(None)
        .set_name("*_token", LayerSpec())          # a wildcard inside the last component still names parameters
        .set_name("*.pos_embedding", LayerSpec())
        .set_name("encoder.pos_embedding", None)   # set later: wins
        .set_name(f"{attention}.in_proj_weight", LayerSpec())  # read by nn.MultiheadAttention itself
    )
    bnn = vinn.bayesify(vit, config)
    rows = {layer.name: layer.reason for layer in bnn.conversion_report.layers if layer.kind == "Parameter"}
    assert rows == {
        "class_token": None,
        "encoder.pos_embedding": "excluded by config (name 'encoder.pos_embedding')",
        f"{attention}.in_proj_weight": None,
    }
    assert not any(isinstance(m, vinn.Linear) for m in bnn.modules())  # no layer: the global spec is None
    mha = bnn.get_submodule(attention)
    assert isinstance(mha.parametrizations.in_proj_weight[0], BayesianParameter)  # torch's parametrization
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(bnn(x), bnn(x))
        with vinn.deterministic():
            torch.testing.assert_close(bnn(x), vit(x), atol=1e-6, rtol=0)
    net = vinn.to_deterministic(bnn)
    assert set(net.state_dict()) == set(vit.state_dict()) and type(net.get_submodule(attention)) is nn.MultiheadAttention

    # a typo warns as for layers; a layer-only estimator is refused for a parameter
    with pytest.warns(UserWarning, match=r"set_name\('clas_token', \.\.\.\) matches no layer"):
        vinn.bayesify(vit, BayesConfig().set_name("clas_token", LayerSpec()))
    with pytest.raises(ValueError, match="cannot convert class_token: estimator must be 'sample'"):
        vinn.bayesify(vit, BayesConfig().set_name("class_token", LayerSpec(estimator="lrt")))


class Gated(nn.Module):
    """A custom layer whose weight no vinn layer type holds, and a parameter forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.rand(4))
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.sigmoid(self.gate)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Gated()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "module_tree"])
def test_a_custom_layers_weight(traced, monkeypatch):
    torch.manual_seed(0)
    model = Custom()
    config = BayesConfig().set_global(None).set_name("block.gate", LayerSpec(init_scale=0.1)).set_name("block.unused", LayerSpec())
    bnn = _bayesify(model, config, traced, monkeypatch)
    rows = {layer.name: layer.reason for layer in bnn.conversion_report.layers if layer.kind == "Parameter"}
    assert rows == {"block.gate": None, "block.unused": "never used in forward" if traced else None}
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert not torch.allclose(bnn(x), bnn(x))
        with vinn.deterministic():
            torch.testing.assert_close(bnn(x), model(x), atol=1e-6, rtol=0)
    net = vinn.to_deterministic(bnn)
    assert set(net.state_dict()) <= set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=1e-6, rtol=0)


# -- tied weights: one posterior -------------------------------------------------------------------


class TiedToCustom(nn.Module):
    """An embedding whose matrix a custom module also reads: no layer to share a posterior with."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.readout = Holder((1,))
        self.readout.p = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) @ self.readout.p.T


def test_a_weight_tied_to_something_else_than_a_layer_stays_deterministic():
    with pytest.warns(UserWarning, match="converted no layer"):
        bnn = vinn.bayesify(TiedToCustom())
    assert {layer.name: layer.reason for layer in bnn.conversion_report.layers} == {
        "embed": "shared parameter (also readout.p)"
    }


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_a_shared_learned_prior_is_fitted_as_its_holder_fits_it():
    torch.manual_seed(0)
    # per unit, the embedding's units are its columns and the head's its rows: the holder's count
    bnn = vinn.bayesify(Tied(), prior=vinn.EmpiricalBayesPrior(per="unit"), init_scale=0.1)
    embed, head = bnn.embed, bnn.head
    assert head.weight_prior_scale is embed.weight_prior_scale and embed.weight_prior_scale.shape == (1, 4)
    torch.testing.assert_close(head._kl("weight"), embed.kl)
    head.reset_scale(0.2)  # refits the shared prior as the embedding does
    torch.testing.assert_close(embed.weight_scale, torch.full((10, 4), 0.2))
    torch.testing.assert_close(bnn.kl, embed.kl + head._kl("bias"))
    buffer = io.BytesIO()
    torch.save(bnn, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False).kl, bnn.kl)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.slow  # importing transformers takes seconds
def test_gpt2_tied_embedding_and_head_share_one_posterior():
    model = _gpt2()
    with pytest.warns(UserWarning, match="could not trace"):
        bnn = vinn.bayesify(model)
    report = bnn.conversion_report
    rows = {layer.name: layer for layer in report.layers}
    assert rows["transformer.wte"].converted and rows["transformer.wte"].parameters == 100 * 32
    assert rows["lm_head"].converted and rows["lm_head"].parameters == 0
    assert rows["lm_head"].shared_with == "transformer.wte.weight"
    norms = sum(layer.parameters for layer in report.kept)
    assert {layer.kind for layer in report.kept} == {"LayerNorm"}
    assert report.bayesian_parameters == report.total_parameters - norms  # all but the (opt-in) norms, once each
    assert ["lm_head", "Linear", "0", "yes,", "sharing", "the", "posterior", "of", "transformer.wte.weight"] in [
        line.split() for line in str(report).splitlines()
    ]

    wte, head = bnn.transformer.wte, bnn.lm_head
    assert type(wte) is vinn.Embedding and type(head) is vinn.Linear
    assert head.weight is wte.weight and head.weight_log_sigma2 is wte.weight_log_sigma2
    assert head.weight_prior_loc is wte.weight_prior_loc and head.weight_prior_scale is wte.weight_prior_scale

    # the KL counts the shared matrix once: with the embedding, not again with the head
    layers = [m for m in bnn.modules() if isinstance(m, vinn.BayesianLayer)]
    torch.testing.assert_close(bnn.kl, sum(m.kl for m in layers if m is not head))
    shared = kl_divergence(Normal(wte.weight, wte.weight_scale), Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(head.kl, shared)  # the head's own KL is the shared posterior's
    torch.testing.assert_close(sum(m.kl for m in layers) - bnn.kl, shared)

    tokens = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        with vinn.deterministic():
            torch.testing.assert_close(bnn(tokens).logits, model(tokens).logits)
        assert not torch.allclose(bnn(tokens).logits, bnn(tokens).logits)

    # one ELBO step moves the one shared posterior, which both layers still hold
    bnn.train()
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=1e-2))
    before = wte.weight_log_sigma2.detach().clone(), wte.weight.detach().clone()
    logits = bnn(tokens).logits
    loss = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=100)(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    optimizer.step()
    assert not torch.equal(wte.weight_log_sigma2, before[0]) and not torch.equal(wte.weight, before[1])
    assert head.weight is wte.weight and head.weight_log_sigma2 is wte.weight_log_sigma2
    bnn.tie_weights()  # transformers' own tying keeps working
    assert head.weight is wte.weight

    # state_dict: the tied keys, each entry of the shared posterior under both names
    state = bnn.state_dict()
    assert torch.equal(state["lm_head.weight_log_sigma2"], state["transformer.wte.weight_log_sigma2"])
    missing, unexpected = bnn.load_state_dict(model.state_dict(), strict=False)  # a transformers checkpoint
    assert not unexpected and all(key.endswith(("_log_sigma2", "_prior_loc", "_prior_scale")) for key in missing)
    with pytest.warns(UserWarning, match="could not trace"):
        again = vinn.bayesify(model)
    again.load_state_dict(state)
    assert again.lm_head.weight is again.transformer.wte.weight
    assert torch.equal(again.transformer.wte.weight_log_sigma2, state["transformer.wte.weight_log_sigma2"])

    # the way back: a tied deterministic model again
    net = vinn.to_deterministic(bnn.eval())
    assert type(net.lm_head) is nn.Linear and type(net.transformer.wte) is nn.Embedding
    assert net.lm_head.weight is net.transformer.wte.weight
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(net(tokens).logits, bnn(tokens).logits)


@pytest.mark.slow
def test_gpt2_tied_layers_are_kept_together():
    model = _gpt2()
    with pytest.warns(UserWarning, match="could not trace"), pytest.warns(UserWarning, match="converted no layer"):
        bnn = vinn.bayesify(model, last=1)
    reasons = {layer.name: layer.reason for layer in bnn.conversion_report.layers}
    assert reasons["lm_head"] == "shared parameter (also transformer.wte.weight), which stays deterministic"
    assert reasons["transformer.wte"] == "excluded by last=1"
    assert bnn.lm_head.weight is bnn.transformer.wte.weight and type(bnn.lm_head) is nn.Linear
