"""vinn.sample and vinn.predict: shapes, batching, independence of the draws, bad input."""

import math

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
    vinn.sample(bnn.train(), x, samples=3)
    assert calls == [6]


def test_shared_trunk_follows_module_changes():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bnn = vinn.bayesify(net, last=1).eval()
    x = torch.randn(2, 3)
    vinn.sample(bnn, x, samples=2)
    replacement = nn.Linear(3, 4)
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
