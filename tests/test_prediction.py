"""vinn.sample and vinn.predict: shapes, batching, independence of the draws, bad input."""

import dataclasses
import math
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.distributions import Laplace

import vinn


def mlp(posterior=None):
    kwargs = {} if posterior is None else {"posterior": posterior}
    return nn.Sequential(vinn.Linear(4, 8, **kwargs), nn.ReLU(), vinn.Linear(8, 3, **kwargs)).eval()


def test_shapes_and_probabilities():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    assert vinn.sample(mlp(), x, samples=7).shape == (7, 5, 3)
    p = vinn.predict(mlp(), x, samples=7)
    assert p.shape == (7, 5, 3) and not p.requires_grad
    torch.testing.assert_close(p.sum(-1), torch.ones(7, 5))


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("posterior", [None, Laplace])
def test_samples_are_independent_draws_of_the_predictive(chunk_size, posterior, device):
    """One layer: for each example the T outputs have the layer's output mean and variance."""
    torch.manual_seed(1)
    layer = vinn.Linear(3, 2, init_scale=0.3, device=device, **({} if posterior is None else {"posterior": posterior}))
    x = torch.randn(2, 3, device=device)
    t = 4000
    draws = vinn.sample(layer, x, samples=t, chunk_size=chunk_size)
    scale2 = layer.weight_scale.detach() ** 2 * (2 if posterior is Laplace else 1)
    bias2 = layer.bias_scale.detach() ** 2 * (2 if posterior is Laplace else 1)
    mean = x @ layer.weight.detach().T + layer.bias.detach()
    var = x**2 @ scale2.T + bias2
    assert ((draws.mean(0) - mean).abs() / (var / t).sqrt()).max() < 5
    assert ((draws.var(0) / var) - 1).abs().max() < 0.15
    # consecutive samples are uncorrelated (a shared draw across T would give correlation 1)
    corr = torch.corrcoef(torch.stack([draws[:-1, 0, 0], draws[1:, 0, 0]]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(t)


def test_tuple_outputs():
    class Heteroscedastic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = vinn.Linear(2, 2)

        def forward(self, x):
            out = self.body(x)
            return out[:, :1], out[:, 1:].exp()

    mean, var = vinn.sample(Heteroscedastic(), torch.randn(6, 2), samples=4, chunk_size=3)
    assert mean.shape == var.shape == (4, 6, 1)


def test_deterministic_layers_only_and_train_mode_left_alone():
    net = nn.Sequential(nn.Linear(3, 2)).train()
    out = vinn.sample(net, torch.randn(4, 3), samples=3)
    assert out.shape == (3, 4, 2) and torch.equal(out[0], out[1]) and net.training


def test_bad_input():
    with pytest.raises(ValueError, match="samples must be a positive int"):
        vinn.predict(mlp(), torch.randn(2, 4), samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        vinn.sample(mlp(), torch.randn(2, 4), samples=2, chunk_size=0)
    with pytest.raises(TypeError, match="x must be a batched torch.Tensor"):
        vinn.sample(mlp(), [[0.0] * 4], samples=2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vinn.sample(lambda x: x, torch.randn(2, 4), samples=2)


def test_trunk_before_the_first_bayesian_layer_runs_once(device):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(device)
    bnn = vinn.bayesify(net, last=1, init_scale=0.3).eval()
    calls = []
    bnn.get_submodule("0").register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(2, 3, device=device)
    t = 4000
    draws = vinn.sample(bnn, x, samples=t, chunk_size=1000)
    assert calls == [2], "the deterministic trunk saw the batch once, not once per sample"
    head = bnn.get_submodule("2")
    h = net[1](net[0](x)).detach()
    mean = h @ head.weight.detach().T + head.bias.detach()
    var = h**2 @ (head.weight_scale.detach() ** 2).T + head.bias_scale.detach() ** 2
    assert ((draws.mean(0) - mean).abs() / (var / t).sqrt()).max() < 5
    assert ((draws.var(0) / var) - 1).abs().max() < 0.15
    corr = torch.corrcoef(torch.stack([draws[:-1, 0, 0], draws[1:, 0, 0]]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(t)
    # in train mode (batch statistics, dropout) nothing is shared
    calls.clear()
    vinn.sample(bnn.train(), x, samples=3, chunk_size=3)
    assert calls == [6]


def test_a_model_with_forward_hooks_of_its_own_runs_whole():
    # hooks on the model itself expect its every call (FSDP2's fully_shard gathers the parameters in them)
    bnn = vinn.bayesify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), last=1).eval()
    calls = []
    bnn.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    vinn.sample(bnn, torch.randn(2, 3), samples=3, chunk_size=3)
    assert calls == [4, 6], "whole: the pass measuring what each layer should draw (2 samples), then the 3 samples"


def test_shared_trunk_follows_module_changes():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bnn = vinn.bayesify(net, last=1).eval()
    x = torch.randn(2, 3)
    vinn.sample(bnn, x, samples=2)
    replacement = nn.Linear(3, 4).eval()  # in train mode nothing would be shared
    calls = []
    replacement.register_forward_hook(lambda module, args, out: calls.append(1))
    setattr(bnn, "0", replacement)
    vinn.sample(bnn, x, samples=2)
    assert calls == [1], "the cached trunk uses the module now in the model"


@pytest.mark.parametrize("posterior", [None, Laplace])  # noise drawn by vinn / by rsample
def test_generator_makes_predictions_reproducible_without_touching_the_global_rng(posterior, device):
    net = mlp(posterior).to(device)
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    expected_global = torch.rand(3, device=device), torch.rand(3)
    torch.manual_seed(3)
    first = vinn.predict(net, x, samples=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3, device=device), expected_global[0]), "the global RNG is restored"
    assert torch.equal(torch.rand(3), expected_global[1])
    again = vinn.predict(net, x, samples=4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    assert torch.equal(first, vinn.predict(net, x, samples=4, generator=7)), "an int seed is a fresh generator"
    # a generator advances like torch's own: its next call gives new, different samples
    generator = torch.Generator().manual_seed(7)
    vinn.predict(net, x, samples=4, generator=generator)
    assert not torch.equal(first, vinn.predict(net, x, samples=4, generator=generator))
    assert not torch.equal(first[0], first[1]), "the samples within one call still differ"


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None"):
        vinn.predict(mlp(), torch.randn(2, 4), generator="seed")
    with pytest.raises(ValueError, match="non-negative int"):
        vinn.predict(mlp(), torch.randn(2, 4), generator=-1)


# -- inputs and outputs of any structure (API.md §7) ----------------------------------------------


class Pair(NamedTuple):
    mean: torch.Tensor
    extra: torch.Tensor | None


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: list


class Structured(nn.Module):
    """Two inputs, and one output structure chosen by ``kind``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = vinn.Linear(4, 3)

    def forward(self, a, b=None):
        out = self.body(a if b is None else a + b)
        return {
            "tensor": lambda: out,
            "dict": lambda: {"logits": out, "none": None, "nested": (out[:, :1], [out])},
            "namedtuple": lambda: Pair(out, None),
            "dataclass": lambda: Output(out, [out * 2, None]),
            "list": lambda: [out, out.exp()],
        }[self.kind]()


@pytest.mark.parametrize("kind", ["tensor", "dict", "namedtuple", "dataclass", "list"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_outputs_of_any_structure_are_stacked_alike(kind, chunk_size):
    torch.manual_seed(0)
    model = Structured(kind)
    a = torch.randn(5, 4)
    out = vinn.sample(model, a, samples=3, chunk_size=chunk_size, generator=0)
    plain = Structured("tensor")
    plain.body = model.body
    reference = vinn.sample(plain, a, samples=3, chunk_size=chunk_size, generator=0)
    assert isinstance(out, type(model(a)))
    leaves = {
        "tensor": lambda: [out],
        "dict": lambda: [out["logits"], out["nested"][0], out["nested"][1][0]],
        "namedtuple": lambda: [out.mean],
        "dataclass": lambda: [out.logits, out.hidden[0]],
        "list": lambda: out,
    }[kind]()
    assert all(leaf.shape[:2] == (3, 5) for leaf in leaves)
    main = leaves[0]
    torch.testing.assert_close(main, reference)
    assert not torch.equal(main[0], main[1]), "the T samples differ"
    if kind == "dict":
        assert out["none"] is None
    if kind == "namedtuple":
        assert out.extra is None
    if kind == "dataclass":
        assert out.hidden[1] is None
        torch.testing.assert_close(out.hidden[0], 2 * out.logits)


@pytest.mark.parametrize("pack", ["tuple", "mapping"])
def test_inputs_as_a_tuple_or_a_mapping_are_folded_alike(pack):
    torch.manual_seed(0)
    model = Structured("tensor")
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    x = (a, b) if pack == "tuple" else {"a": a, "b": b}
    out = vinn.sample(model, x, samples=4, generator=1)
    assert out.shape == (4, 5, 3)
    torch.testing.assert_close(out, vinn.sample(model, a + b, samples=4, generator=1))


@pytest.mark.parametrize(
    "x, error, match",
    [
        ([torch.randn(2, 4)], TypeError, r"x must be a batched torch.Tensor.*got list.*pass a tuple"),
        (torch.tensor(1.0), ValueError, r"x must be a batched torch.Tensor"),
        ((), ValueError, r"x must be"),
        ((torch.randn(2, 4), "b"), TypeError, r"x\[1\] must be a batched torch.Tensor"),
        ({"a": torch.randn(2, 4), "b": torch.randn(3, 4)}, ValueError, r"one batch size N.*'a'.*2.*'b'.*3"),
        ("abc", TypeError, r"x must be a batched torch.Tensor"),
        (None, TypeError, r"x must be a batched torch.Tensor"),
    ],
)
def test_bad_batches(x, error, match):
    with pytest.raises(error, match=match):
        vinn.sample(Structured("tensor"), x, samples=2)


class BadOutput(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.body = kind, vinn.Linear(4, 3)

    def forward(self, x):
        out = self.body(x)
        return {"pooled": lambda: out.mean(0), "scalar": lambda: out.sum(), "string": lambda: (out, "name"),
                "transposed": lambda: out.T}[self.kind]()


@pytest.mark.parametrize("kind, error, match", [
    ("pooled", ValueError, r"batch-first.*output has shape \(3,\)"),
    ("scalar", ValueError, r"batch-first.*output has shape \(\)"),
    ("transposed", ValueError, r"batch-first.*output has shape \(3, 5\)"),
    ("string", TypeError, r"output\[1\] must be a tensor or a tuple, list, dict"),
])  # fmt: skip
def test_outputs_that_cannot_be_stacked_are_refused(kind, error, match):
    with pytest.raises(error, match=match):
        vinn.sample(BadOutput(kind), torch.randn(5, 4), samples=2)


# -- predict: where the logits are, and binary classifiers with one logit --------------------------


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "dataclass"])
def test_predict_takes_the_logits_field(kind):
    model = Structured(kind)
    x = torch.randn(5, 4)
    expected = vinn.sample(model, x, samples=3, generator=0)
    logits = expected["logits"] if kind == "dict" else getattr(expected, "logits", getattr(expected, "mean", None))
    if kind == "namedtuple":  # no logits field: refused
        with pytest.raises(TypeError, match="'logits' key or attribute"):
            vinn.predict(model, x, samples=3)
        return
    torch.testing.assert_close(vinn.predict(model, x, samples=3, generator=0), logits.softmax(2))


@pytest.mark.parametrize("shape", [(), (1,)])
def test_one_logit_binary_classifier_gets_the_sigmoid(shape):
    torch.manual_seed(0)
    model = nn.Sequential(vinn.Linear(4, 1), nn.Flatten(0) if shape == () else nn.Identity())
    x = torch.randn(6, 4)
    logits = vinn.sample(model, x, samples=3, generator=0).reshape(3, 6)
    p = vinn.predict(model, x, samples=3, generator=0)
    assert p.shape == (3, 6, 2)
    torch.testing.assert_close(p[..., 1], logits.sigmoid())
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 6))
    assert (p[..., 1] < 0.99).any() and (p[..., 1] > 0.01).any(), "not 1.0 everywhere"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_predict_refuses_nan_probabilities(bad):
    model = nn.Sequential(vinn.Linear(4, 3), Lambda(lambda y: torch.full_like(y, bad)))
    with pytest.raises(ValueError, match="finite logits"):
        vinn.predict(model, torch.randn(2, 4), samples=2)


def test_predict_refuses_integer_outputs():
    model = nn.Sequential(vinn.Linear(4, 3), Lambda(lambda y: y.argmax(1)))
    with pytest.raises(TypeError, match="logits.*must be floating point"):
        vinn.predict(model, torch.randn(2, 4), samples=2)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# -- random operations and memory -----------------------------------------------------------------


class GumbelFirst(nn.Module):
    """A random operation vinn lists nowhere before the first Bayesian layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(nn.functional.gumbel_softmax(self.features(x), tau=1.0))


def test_random_op_before_the_first_bayesian_layer_is_drawn_per_sample():
    torch.manual_seed(0)
    bnn = vinn.bayesify(GumbelFirst().eval(), last=1, init_scale=1e-6)  # the head barely samples
    x = torch.randn(1, 4)
    draws = vinn.sample(bnn, x, samples=64)
    # shared gumbel noise would make the 64 draws equal up to the head's tiny scale
    assert draws.std(0).min() > 1e-3


def test_automatic_chunks_bound_the_activations_not_only_the_input():
    """A model widening to 8192 units: each pass's largest activation stays within the budget."""
    from vinn import prediction

    net = nn.Sequential(vinn.Linear(4, 8192), nn.ReLU(), vinn.Linear(8192, 2)).eval()
    rows = []
    net[0].register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    x = torch.randn(10, 4)
    out = vinn.sample(net, x, samples=2000, draw="outputs")  # no measuring pass among the rows counted
    assert out.shape == (2000, 10, 2) and sum(rows) == 20000
    assert max(rows) * 8192 <= prediction._AUTO_CHUNK_ELEMENTS_CPU
    assert len(rows) < 20, "still folded: passes of many samples"


def test_a_split_made_inside_deterministic_is_not_reused_outside():
    torch.manual_seed(0)
    inner = nn.Sequential(vinn.Linear(4, 4, init_scale=0.5))
    inner.register_forward_hook(lambda module, args, out: out)  # traced whole, as a leaf holding a vinn layer
    with pytest.warns(UserWarning, match="converted no layer"):  # the head stays deterministic
        bnn = vinn.bayesify(nn.Sequential(inner, nn.Linear(4, 2)).eval(), vinn.BayesConfig().set_global(None))
    x = torch.randn(1, 4)
    with vinn.deterministic():
        same = vinn.sample(bnn, x, samples=4)
    assert torch.equal(same[0], same[1])
    draws = vinn.sample(bnn, x, samples=4)
    assert not torch.equal(draws[0], draws[1]), "the leaf's vinn layer samples again"


class HeadLast(nn.Module):
    """A model that is no torch.fx graph (data-dependent control flow), deterministic up to its
    one vinn layer, whose output it returns with other values, as a transformers classifier does."""

    def __init__(self, after: str = "nothing") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = vinn.Linear(4, 2, init_scale=0.3)
        self.after = after

    def forward(self, x):
        if x.sum() > 1e9:  # untraceable, as transformers models are
            x = -x
        if self.after == "noise before":
            x = x + 0.0 * torch.randn_like(x)
        hidden = self.body(x)
        logits = self.head(hidden)
        if self.after == "scaled":
            logits = logits * 2
        return {"logits": logits, "hidden": hidden, "none": None}


def test_a_model_whose_only_vinn_layer_is_last_runs_its_trunk_once():
    torch.manual_seed(4)
    model = HeadLast().eval()
    calls = []
    model.body.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(2, 3)
    t = 4000
    out = vinn.sample(model, x, samples=t, chunk_size=1000)
    assert calls == [2], "the trunk saw the batch once, not once per sample"
    hidden = model.body(x).detach()
    assert out["none"] is None and out["hidden"].shape == (t, 2, 4) and torch.equal(out["hidden"][-1], hidden)
    head = model.head
    mean = hidden @ head.weight.detach().T + head.bias.detach()
    var = hidden**2 @ (head.weight_scale.detach() ** 2).T + head.bias_scale.detach() ** 2
    draws = out["logits"]
    assert ((draws.mean(0) - mean).abs() / (var / t).sqrt()).max() < 5
    assert ((draws.var(0) / var) - 1).abs().max() < 5 * math.sqrt(2 / t)  # the relative SE of a variance
    corr = torch.corrcoef(torch.stack([draws[:-1, 0, 0], draws[1:, 0, 0]]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(t)
    corr = torch.corrcoef(torch.stack([draws[:, 0, 0], draws[:, 1, 0]]))[0, 1]
    assert abs(corr) < 5 / math.sqrt(t), "each example has noise of its own"
    calls.clear()
    vinn.sample(model, x, samples=8, generator=0)
    assert calls == [2]


@pytest.mark.parametrize("after", ["scaled", "noise before"])
def test_a_model_computing_after_its_vinn_layer_or_drawing_before_it_runs_whole(after):
    torch.manual_seed(5)
    model = HeadLast(after).eval()
    calls = []
    model.body.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(2, 3)
    out = vinn.sample(model, x, samples=3, chunk_size=3)
    # one pass found the trunk not shareable, one (of two samples) counted the work, then the folded batch
    assert calls == [2, 4, 6]
    assert not torch.equal(out["logits"][0], out["logits"][1])
    calls.clear()
    vinn.sample(model, x, samples=3, chunk_size=3)
    assert calls == [6], "the verdict is kept"


def test_a_transformers_classifier_with_a_bayesian_head_runs_its_body_once():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(6)
    with pytest.warns(UserWarning, match="could not trace"):
        bnn = vinn.bayesify(transformers.BertForSequenceClassification(config).eval(), last=1)
    calls = []
    bnn.bert.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    tokens = {"input_ids": torch.randint(0, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    p = vinn.predict(bnn, tokens, samples=16)
    assert calls == [1] and p.shape == (16, 3, 2)
    assert not torch.equal(p[0], p[1])


def test_attention_in_eval_mode_is_shared_trunk():
    """torch tags attention kernels as random (their dropout) even with dropout_p=0: in eval mode
    they draw nothing, and a ViT's encoder is still shared by all samples."""
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)
    bnn = vinn.bayesify(vit.eval(), last=1)
    calls = []
    bnn.get_submodule("encoder.layers.encoder_layer_0.self_attention").register_forward_hook(lambda *args: calls.append(1))
    vinn.predict(bnn, torch.randn(2, 3, 16, 16), samples=8)
    assert calls == [1]


def test_a_causal_lm_kv_cache_is_no_sample():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32)
    torch.manual_seed(8)
    with pytest.warns(UserWarning, match="could not trace"):
        bnn = vinn.bayesify(transformers.LlamaForCausalLM(config).eval())
    tokens = {"input_ids": torch.randint(0, 50, (3, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    with torch.no_grad():
        assert bnn(**tokens).past_key_values is not None  # what the model returns in eval mode
    out = vinn.sample(bnn, tokens, samples=4)
    assert out.logits.shape == (4, 3, 5, 50) and out.past_key_values is None
