"""Monte Carlo samples of the predictive distribution: `vinn.sample` and `vinn.predict`."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BayesianLayer
from .sampling import seeded

# Largest number of input elements in one folded forward pass when no chunk_size is given. On a
# CPU, passes whose activations stay within a few hundred MB run fastest (measured: 256 rows of
# 3x32x32 beat 1024 by 15% on ResNet-18); a GPU wants large passes to hide kernel launches, and
# 64 MB of float32 input still keeps ImageNet-sized convnets within a few GB.
_AUTO_CHUNK_ELEMENTS_CPU = 1 << 20
_AUTO_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24

Output = Tensor | Sequence[Tensor]


def _split(y: Output, samples: int) -> Output:
    if isinstance(y, Tensor):
        return y.reshape(samples, y.shape[0] // samples, *y.shape[1:])
    return type(y)(_split(v, samples) for v in y)


def _cat(chunks: list[Output]) -> Output:
    if isinstance(chunks[0], Tensor):
        return torch.cat(chunks)
    return type(chunks[0])(_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


def _per_example_noise(model: nn.Module) -> bool:
    return all(m.per_example_noise for m in model.modules() if isinstance(m, BayesianLayer))


# Graph nodes that draw random numbers besides vinn layers: an eval-mode graph holding one of these
# after the trunk is random there too.
_RANDOM_FUNCTIONS = {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.normal, torch.poisson, torch.multinomial, torch.dropout,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "cauchy_", "log_normal_"}


# model -> (what the split was built from, the split): building one costs milliseconds of code
# generation, more than a whole prediction of a small model on a GPU.
_splits: weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple[object, object]] = weakref.WeakKeyDictionary()


def _cached_split(model: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None:
    """`_split_at_first_sample`, rebuilt only when the model's code or any of its modules changed."""
    key = (model.code, tuple(map(id, model.modules())))
    cached = _splits.get(model)
    if cached is None or cached[0] != key:
        cached = _splits[model] = (key, _split_at_first_sample(model))
    return cached[1]


def _split_at_first_sample(model: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None:
    """(trunk, rest): the deterministic computation on the input, and what follows the first sampling.

    ``trunk(x)`` returns the tuple of values that ``rest(*values)`` needs; ``rest`` gives the
    model's output. None when there is no trunk to share (the first node already samples) or the
    graph takes more than one input.
    """
    nodes = list(model.graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) != 1:
        return None
    modules = dict(model.named_modules())
    random, batched = set(), set()  # nodes that draw random numbers / that depend on the input
    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder" or any(i in batched for i in inputs):
            batched.add(node)
        if (
            any(i in random for i in inputs)
            or (node.op == "call_module" and isinstance(modules[node.target], BayesianLayer))
            or (node.op == "call_function" and node.target in _RANDOM_FUNCTIONS)
            or (node.op == "call_method" and node.target in _RANDOM_METHODS)
        ):
            random.add(node)
    trunk_nodes = [n for n in nodes if n.op != "output" and n not in random]
    shared = [n for n in trunk_nodes if n in batched and any(u in random or u.op == "output" for u in n.users)]
    if all(n.op == "placeholder" for n in shared):
        return None
    trunk, rest = torch.fx.Graph(), torch.fx.Graph()
    in_trunk: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in trunk_nodes:
        in_trunk[node] = trunk.node_copy(node, in_trunk.__getitem__)
    trunk.output(tuple(in_trunk[n] for n in shared))
    in_rest = {n: rest.placeholder(f"shared_{i}") for i, n in enumerate(shared)}
    for node in nodes:
        if node not in in_rest and not (node in batched and node not in random):
            in_rest[node] = rest.node_copy(node, in_rest.__getitem__)
    parts = torch.fx.GraphModule(model, trunk), torch.fx.GraphModule(model, rest)
    for part in parts:
        part.graph.eliminate_dead_code()
        part.recompile()
    return parts


def _folded(values: Sequence[Tensor], samples: int) -> list[Tensor]:
    """Each (N, ...) value repeated ``samples`` times along the batch: (samples * N, ...), sample-major."""
    return [v.expand(samples, *v.shape).reshape(samples * v.shape[0], *v.shape[1:]) for v in values]


@torch.no_grad()
def sample(
    model: nn.Module,
    x: Tensor,
    samples: int = 16,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | int | None = None,
) -> Output:
    """Outputs of ``samples`` sampled forward passes: shape (T, N, ...), T = ``samples``.

    ``x`` is a batch (N, ...), moved to the model's device. Each of the T outputs of every example
    is an independent draw of the predictive distribution. When every vinn layer draws fresh noise
    per example (Normal posterior, local reparameterization), the T passes are folded into the
    batch and run as ``ceil(T / chunk_size)`` forward passes of ``chunk_size * N`` rows; otherwise
    each pass draws its own weights, T passes in all. ``chunk_size`` (samples per pass) bounds the
    working set; by default it is chosen so that one pass sees at most about 1M input elements
    on a CPU, 16M on an accelerator.
    A model returning a tuple of tensors gets a tuple of (T, N, ...) tensors back.

    For a torch.fx model in eval mode (what `vinn.bayesify` returns), the deterministic trunk
    before the first sampling node runs once on the N examples and only the rest of the graph on
    the folded batch: with only the last layer Bayesian, T samples cost little more than one pass.
    This assumes the tensors handed from trunk to rest are batch-first (N, ...), as checked.

    Runs without gradients and does not change ``model.training``: call ``model.eval()`` first,
    as for any prediction (dropout and batch-norm behave as in the mode the model is in).

    ``generator`` (a `torch.Generator` or an int seed) makes the draws reproducible without
    touching the global RNG: the same generator state gives the same samples, and the global
    state after the call is what it was before (see `vinn.sampling.seeded`). Without it the
    global RNG is used, as by any torch layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise TypeError(f"x must be a batched torch.Tensor (N, ...), got {type(x).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (samples per forward pass) or None, got {chunk_size!r}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device)
    with seeded(generator, x.device):
        return _sample(model, x, samples, chunk_size)


def _sample(model: nn.Module, x: Tensor, samples: int, chunk_size: int | None) -> Output:
    if not _per_example_noise(model):
        return _cat([_split(model(x), 1) for _ in range(samples)])
    # The trunk before the first sampling node is computed once and shared by all samples when
    # the model is a torch.fx graph (as bayesify makes) in eval mode, whose shared values are
    # batch-first tensors; otherwise the whole model runs on the folded batch.
    split = None
    if isinstance(model, torch.fx.GraphModule) and not any(m.training for m in model.modules()):
        split = _cached_split(model)
    inputs = [x]
    if split is not None:
        trunk, rest = split
        shared = trunk(x)
        if all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == x.shape[0] for v in shared):
            model, inputs = rest, list(shared)
    cpu = inputs[0].device.type == "cpu"
    budget = _AUTO_CHUNK_ELEMENTS_CPU if cpu else _AUTO_CHUNK_ELEMENTS_ACCELERATOR
    per_pass = chunk_size or max(1, budget // max(1, sum(v.numel() for v in inputs)))
    chunks = []
    for start in range(0, samples, per_pass):
        t = min(per_pass, samples - start)
        chunks.append(_split(model(*_folded(inputs, t)), t))
    return _cat(chunks)


def predict(
    model: nn.Module,
    x: Tensor,
    samples: int = 16,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    """Class probabilities of ``samples`` sampled forward passes: (T, N, C), softmax over classes.

    The model's outputs are logits with classes in dimension 1 (N, C, ...), as for
    ``nn.CrossEntropyLoss``. Feed the result to `vinn.uncertainty` or `vinn.confidence_score`.
    See `sample` for batching, chunking, devices and ``generator``.
    """
    logits = sample(model, x, samples, chunk_size=chunk_size, generator=generator)
    if not isinstance(logits, Tensor):
        raise TypeError("predict needs a model that returns one tensor of logits; use vinn.sample for tuples")
    return logits.softmax(dim=2)
