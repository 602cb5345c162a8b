"""Monte Carlo samples of the predictive distribution: `vinn.sample` and `vinn.predict`."""

from __future__ import annotations

import copy
import dataclasses
import sys
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx import Node
from torch.utils._python_dispatch import TorchDispatchMode

from . import validation
from .layers import BayesianLayer
from .sampling import deterministic, preserved_rng, sampling_enabled, seeded, weight_draws

if TYPE_CHECKING:
    from .mixture import Mixture

# Largest output of one operation in a folded forward pass, in elements, when no chunk_size is
# given; peak memory is a small multiple of it. On a CPU, passes whose activations stay within a
# few hundred MB run fastest (measured: 256 rows of 3x32x32 beat 1024 by 15% on ResNet-18, whose
# largest activation is 64x32x32 a row: 16M elements); a GPU wants large passes to hide kernel
# launches, and 512 MB of float32 activation keeps ImageNet-sized convnets within a few GB.
_AUTO_CHUNK_ELEMENTS_CPU = 1 << 24
_AUTO_CHUNK_ELEMENTS_ACCELERATOR = 1 << 27

# What vinn.sample weighs, in seconds on a CPU, measured on an AMD EPYC with torch 2.14: a multiply-add
# of a convolution or matmul on one thread (25 to 40 G a second), a normal number drawn and scaled
# into a weight or a pre-activation (5 to 9 ns: torch draws them in one thread, whatever
# torch.get_num_threads()), and the calls that draw one sample's weights of a layer and apply them
# to its rows (Python and dispatch). The layers of ResNet-18 on a batch of 64 images of 32x32 on
# one thread choose alike for a normal number anywhere from 3 to 9 ns.
_MULTIPLY_ADD_SECONDS = 1 / 30e9
_NORMAL_SECONDS = 7e-9
_WEIGHT_DRAW_CALL_SECONDS = 20e-6

DRAWS = ("outputs", "weights")
_ACCEPTED_DRAW = "None (vinn chooses for each layer), 'outputs' or 'weights'"

_ACCEPTED_X = "a batched torch.Tensor (N, ...), a tuple of them or a mapping of names to them (all batch-first)"


# -- the batch: a tensor, a tuple of tensors (model(*x)) or a mapping of tensors (model(**x)) ----


@dataclasses.dataclass
class _Batch:
    args: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]

    @property
    def size(self) -> int:
        return next(iter(self.tensors())).shape[0]

    def tensors(self) -> list[Tensor]:
        return [*self.args, *self.kwargs.values()]

    def map(self, fn: Callable[[Tensor], Tensor]) -> _Batch:
        return _Batch(tuple(map(fn, self.args)), {k: fn(v) for k, v in self.kwargs.items()})

    def folded(self, samples: int) -> _Batch:
        """Each (N, ...) tensor repeated ``samples`` times along the batch: (samples * N, ...), sample-major."""
        return self.map(lambda v: v.expand(samples, *v.shape).reshape(samples * v.shape[0], *v.shape[1:]))

    def __call__(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def _batch(x: object) -> _Batch:
    """``x`` checked and unpacked (API.md §7): every tensor batch-first, of one batch size N."""
    if isinstance(x, Tensor):
        batch, named = _Batch((x,), {}), {"x": x}
    elif isinstance(x, tuple):
        batch, named = _Batch(x, {}), {f"x[{i}]": v for i, v in enumerate(x)}
    elif isinstance(x, Mapping):
        batch, named = _Batch((), dict(x)), {f"x[{k!r}]": v for k, v in x.items()}
    else:
        hint = "for a model taking several tensors, pass a tuple (model(*x))" if isinstance(x, list) else ""
        raise validation.wrong_type("x", _ACCEPTED_X, x, hint)
    if not named:
        raise validation.wrong_value("x", _ACCEPTED_X, x)
    return _checked(batch, named, "x")


def _checked(batch: _Batch, named: Mapping[str, Any], what: str) -> _Batch:
    """``batch``, whose inputs ``named`` {name: value} (``what``, for the message, holds them) must
    all be batch-first tensors of one batch size N."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise validation.wrong_type(name, "a batched torch.Tensor (N, ...)", value)
        if value.dim() == 0:
            raise validation.wrong_value(name, "a batched torch.Tensor (N, ...)", value)
    sizes = {name: value.shape[0] for name, value in named.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{what} must hold tensors of one batch size N (all batch-first), got batch sizes {sizes}")
    return batch


# -- model outputs: tensors in any nesting of tuples, lists, dicts, namedtuples and dataclasses ---


def _map_outputs(fn: Callable[[list[Tensor], str], Tensor], trees: list[Any], path: str = "output") -> Any:
    """The structure of ``trees[0]`` with each tensor leaf ``fn(leaves, path)``, ``leaves`` that
    leaf in every tree; None leaves stay None, and so become transformers' KV caches (`_is_cache`)."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(trees, path)
    if first is None or _is_cache(first):
        return None
    if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple
        return type(first)(*(_map_outputs(fn, [t[i] for t in trees], f"{path}.{f}") for i, f in enumerate(first._fields)))
    if isinstance(first, (tuple, list)):
        return type(first)(_map_outputs(fn, [t[i] for t in trees], f"{path}[{i}]") for i in range(len(first)))
    if isinstance(first, Mapping):
        mapping: MutableMapping[Any, Any] = copy.copy(first) if isinstance(first, MutableMapping) else {}
        for key in first:
            mapping[key] = _map_outputs(fn, [t[key] for t in trees], f"{path}[{key!r}]")
        return mapping
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        instance = copy.copy(first)
        for field in dataclasses.fields(first):
            value = _map_outputs(fn, [getattr(t, field.name) for t in trees], f"{path}.{field.name}")
            object.__setattr__(instance, field.name, value)  # frozen dataclasses too
        return instance
    raise validation.wrong_type(
        path, "a tensor or a tuple, list, dict, namedtuple or dataclass of tensors (None kept)", first,
        "vinn.sample stacks the tensors of T forward passes",
    )


def _is_cache(value: object) -> bool:
    """Whether ``value`` is a transformers KV cache (what a causal LM returns in eval mode): the keys
    and values one pass computed, for generating from, of a folded batch; no sample of anything."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _split(y: Any, samples: int, n: int) -> Any:
    """Each (samples * N, ...) tensor of ``y`` as (samples, N, ...)."""

    def split(leaves: list[Tensor], path: str) -> Tensor:
        (leaf,) = leaves
        if leaf.dim() == 0 or leaf.shape[0] != samples * n:
            raise ValueError(
                f"model outputs must be batch-first, one row per input example: {path} has shape "
                f"{tuple(leaf.shape)} for a batch of {samples * n} rows ({samples} sample(s) of N = {n}); "
                "vinn.sample stacks the outputs of T passes into (T, N, ...)"
            )
        return leaf.reshape(samples, n, *leaf.shape[1:])

    return _map_outputs(split, [y])


def _cat(chunks: list[Any]) -> Any:
    return _map_outputs(lambda leaves, path: torch.cat(leaves), chunks)


# -- what the operations of a pass do ------------------------------------------------------------


class _Watch(TorchDispatchMode):
    """Sees every aten operation run inside it: whether one draws random numbers (torch tags those
    ``nondeterministic_seeded``, whatever Python function called them) and the largest output."""

    def __init__(self) -> None:
        super().__init__()
        self.random = False
        self.largest = 0
        self.operations = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.operations += 1
        self.random = self.random or _draws_random_numbers(func, args, kwargs or {})
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _draws_random_numbers(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the aten operation ``func`` draws random numbers on these arguments.

    torch tags its random operations ``nondeterministic_seeded``, attention kernels among them
    (for their dropout) whatever the dropout probability: one run with ``dropout_p=0`` (eval mode)
    or a dropout with ``train=False`` draws nothing.
    """
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    values = {
        argument.name: kwargs.get(argument.name, args[i] if i < len(args) else argument.default_value)
        for i, argument in enumerate(func._schema.arguments)
    }
    return not (values.get("dropout_p", None) == 0 or values.get("train", None) is False)


# -- the shared trunk of a torch.fx model -------------------------------------------------------


class _FindRandom(torch.fx.Interpreter):
    """Runs the part of a graph that draws no random numbers, finding the nodes that do.

    A node is random if it is a vinn layer (not run), depends on a random node (not run), or
    draws random numbers when run (`_Watch`). ``kept`` holds the values that random nodes and the
    output read from deterministic ones: what the trunk hands to the rest.
    """

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.random: set[Node] = set()
        self.kept: dict[Node, Any] = {}

    def run_node(self, node: Node) -> Any:
        inputs = node.all_input_nodes
        random = node.op == "output" or any(i in self.random for i in inputs) or (
            node.op == "call_module" and isinstance(self.module.get_submodule(str(node.target)), BayesianLayer)
        )
        value = None
        if not random:
            with _Watch() as watch:
                value = super().run_node(node)
            random = watch.random
        if random:
            self.random.add(node)
            self.kept.update((i, self.env[i]) for i in inputs if i not in self.random)
            return None
        return value


# model -> (what the split was built from, the split): building one costs milliseconds of code
# generation, more than a whole prediction of a small model on a GPU.
_Split = tuple[torch.fx.GraphModule, torch.fx.GraphModule]
_splits: weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple[object, _Split | None]] = weakref.WeakKeyDictionary()


def _shared_trunk(model: torch.fx.GraphModule, args: tuple[Tensor, ...]) -> tuple[torch.fx.GraphModule, list[Any]] | None:
    """(rest, values): the model after its deterministic trunk, and the trunk's values on ``args``.

    The split is rebuilt only when the model's code or any of its modules changed; building it
    runs the trunk, whose values are then used directly. None when there is no trunk to share.
    """
    # inside vinn.deterministic() a module holding vinn layers draws nothing: a split built there
    # would share it
    key = (model.code, tuple(map(id, model.modules())), len(args), sampling_enabled())
    cached = _splits.get(model)
    if cached is not None and cached[0] == key:
        split = cached[1]
        if split is None:
            return None
        trunk, rest = split
        return rest, list(trunk(*args))
    split, values = _split_at_first_sample(model, args)
    _splits[model] = (key, split)
    return None if split is None else (split[1], values)


def _split_at_first_sample(model: torch.fx.GraphModule, args: tuple[Tensor, ...]) -> tuple[_Split | None, list[Any]]:
    """(trunk, rest) and the trunk's values on ``args``: the deterministic computation on the input,
    and what follows the first sampling.

    ``trunk(*args)`` returns the tuple of values that ``rest(*values)`` needs; ``rest`` gives the
    model's output. Random nodes are found by running the graph on ``args`` (`_FindRandom`), so a
    random operation is recognised whatever calls it. (None, []) when there is no trunk to share
    (the first node already samples) or the graph does not take ``args`` positionally.
    """
    nodes = list(model.graph.nodes)
    if sum(node.op == "placeholder" for node in nodes) != len(args):
        return None, []
    finder = _FindRandom(model)
    finder.run(*args)
    random, kept = finder.random, finder.kept
    batched: set[Node] = set()  # nodes that depend on the input
    for node in nodes:
        if node.op == "placeholder" or any(i in batched for i in node.all_input_nodes):
            batched.add(node)
    trunk_nodes = [n for n in nodes if n not in random]
    shared = [n for n in trunk_nodes if n in batched and n in kept]
    if all(n.op == "placeholder" for n in shared):
        return None, []
    trunk, rest = torch.fx.Graph(), torch.fx.Graph()
    in_trunk: dict[Node, Node] = {}
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
    return parts, [kept[n] for n in shared]


# -- a model that is deterministic up to one vinn layer, whose output is the model's ------------


@dataclasses.dataclass
class _HeadCall:
    """What one pass of a model saw of its one vinn layer (the head): how often it ran, its inputs
    and output, whether anything random ran before it, and how many operations ran until it returned."""

    calls: int = 0
    random_before: bool = False
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: Any = None
    operations: int = 0


# model -> (its modules, whether its head's output is its own): found by one pass, kept while the
# modules are the same
_heads: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], bool]] = weakref.WeakKeyDictionary()


def _head_samples(
    model: nn.Module, batch: _Batch, samples: int, chunk_size: int | None, layers: list[tuple[str, BayesianLayer]]
) -> Any | None:
    """``samples`` draws of a model whose only vinn layer computes its output last, from one pass of
    the model at the posterior loc and ``samples`` of that layer alone; None for any other model.

    The fast path that `_shared_trunk` gives a torch.fx graph, for a model that is no graph (a
    transformers model, which bayesify converts by walking its module tree): forward hooks see the
    layer's input and output in one pass, and a `_Watch` checks that nothing random ran before the
    layer and nothing at all after it, so that every other output is deterministic and the layer's
    output is what the model returns. The layer's input must be batch-first (N, ...). That pass
    draws nothing (it runs at the loc, and leaves the RNG as it was): whether the path is taken
    does not change which numbers the samples are drawn from. ``layers``: the model's vinn layers
    (`_bayesian_layers`).
    """
    inner = {id(sub) for _, layer in layers for sub in layer.modules() if sub is not layer}
    heads = [layer for _, layer in layers if id(layer) not in inner]
    key = tuple(map(id, model.modules()))
    known = _heads.get(model)
    if len(heads) != 1 or (known is not None and known[0] == key and not known[1]):
        return None
    head, seen, n = heads[0], _HeadCall(), batch.size
    with deterministic(), preserved_rng(batch.tensors()[0].device), _Watch() as watch:

        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.calls, seen.random_before, seen.args, seen.kwargs = seen.calls + 1, watch.random, args, kwargs

        def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen.output, seen.operations = output, watch.operations

        handles = [head.register_forward_pre_hook(before, with_kwargs=True), head.register_forward_hook(after)]
        try:
            first = batch(model)
        finally:
            for handle in handles:
                handle.remove()
    inputs = [v for v in (*seen.args, *seen.kwargs.values()) if isinstance(v, Tensor)]
    found: list[Tensor] = []

    def collect(leaves: list[Tensor], path: str) -> Tensor:
        found.append(leaves[0])
        return leaves[0]

    _map_outputs(collect, [first])
    usable = (
        seen.calls == 1 and not seen.random_before and seen.operations == watch.operations
        and isinstance(seen.output, Tensor) and seen.output.dim() > 0 and seen.output.shape[0] == n
        and any(leaf is seen.output for leaf in found)
        and all(v.dim() > 0 and v.shape[0] == n for v in inputs)
    )
    _heads[model] = (key, usable)
    if not usable:  # the pass is lost, once per model: the verdict is kept
        return None
    head_batch = _Batch(seen.args, seen.kwargs)
    if not head.per_example_noise:
        draws = [head_batch(head) for _ in range(samples)]
    else:
        per_pass = chunk_size or max(1, _chunk_budget(seen.output) // max(1, seen.output.numel()))
        draws = [head_batch.folded(min(per_pass, samples - start))(head) for start in range(0, samples, per_pass)]
    stacked = torch.cat(draws).reshape(samples, *seen.output.shape)

    def repeated(leaves: list[Tensor], path: str) -> Tensor:
        (leaf,) = leaves
        return stacked if leaf is seen.output else _split(leaf, 1, n).expand(samples, *leaf.shape)

    return _map_outputs(repeated, [first])


# -- what each vinn layer draws on the folded batch: its outputs or its weights -------------------


def _bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BayesianLayer)]


def _forced(draw: str, layers: list[tuple[str, BayesianLayer]]) -> frozenset[BayesianLayer]:
    """The layers that draw weights when ``draw`` says what every layer draws; ValueError if one cannot."""
    for name, layer in layers:
        which = f"{name or 'the model'} ({type(layer).__name__})"
        if draw == "outputs" and not layer.per_example_noise:
            raise ValueError(
                f"draw='outputs' needs every vinn layer to draw its outputs for each example (estimator='lrt'), but {which} "
                f"has estimator={layer.estimator!r}: pass draw='weights' or None"
            )
        if draw == "weights" and not layer.batched_draws:
            raise ValueError(
                f"draw='weights' needs every vinn layer to compute a folded batch with a weight draw per sample, which "
                f"{which} cannot (it has a forward of its own): pass draw='outputs' or None"
            )
    return frozenset(layer for _, layer in layers) if draw == "weights" else frozenset()


@dataclasses.dataclass
class _Work:
    """What a vinn layer computes and draws for one sample in a forward pass (`_measure_work`)."""

    calls: int = 0
    multiply_adds: int = 0
    outputs: int = 0  # the normal numbers that drawing outputs draws: one per output element
    weights: int = 0  # those that drawing weights draws: one per weight and call
    sample_major: bool = True  # every input of the layer had the samples of the folded batch outermost

    def weights_cheaper(self, threads: int) -> bool:
        """Whether drawing weights costs less than drawing outputs on a CPU running ``threads``
        threads: both compute the op once, drawing outputs a second time (the variance)."""
        weights = self.weights * _NORMAL_SECONDS + self.calls * _WEIGHT_DRAW_CALL_SECONDS
        outputs = self.multiply_adds * _MULTIPLY_ADD_SECONDS / threads + self.outputs * _NORMAL_SECONDS
        return self.sample_major and weights < outputs


# model -> {(its modules, the batch's shapes and dtypes, device): the work of its layers}: measured
# once, by a forward pass; a module replaced in the model is measured again
_works: weakref.WeakKeyDictionary[nn.Module, dict[object, dict[BayesianLayer, _Work]]] = weakref.WeakKeyDictionary()


def _chosen(model: nn.Module, batch: _Batch, layers: list[tuple[str, BayesianLayer]]) -> frozenset[BayesianLayer] | None:
    """The layers that draw weights when vinn chooses, or None where T passes must be run instead.

    The layers that cannot draw outputs for each example draw weights, if they can and their input
    has the batch outermost; on a CPU, so do those for which weights cost less at this batch
    (`_Work.weights_cheaper`): drawing weights costs the same at any batch size, drawing outputs
    grows with it. Both are read from a forward pass, once per model and input shape
    (`_measure_work`). The costs are counted, not timed, so that the choice, and with it the
    numbers a ``generator`` gives, is the same in every run on as many threads. On an accelerator they were not
    measured: every layer that can draws outputs. In train mode nothing is measured (the pass would
    update batch-norm statistics): a layer that cannot draw outputs makes it T passes.
    """
    must = frozenset(layer for _, layer in layers if not layer.per_example_noise)
    if not sampling_enabled():  # every layer computes with its posterior loc
        return frozenset()
    if not all(layer.batched_draws for layer in must):
        return None
    device = batch.tensors()[0].device
    if any(m.training for m in model.modules()) or (device.type != "cpu" and not must):
        return None if must else frozenset()
    key = (tuple(map(id, model.modules())), tuple((v.shape, v.dtype) for v in batch.tensors()), tuple(batch.kwargs), device)
    cached = _works.setdefault(model, {})
    if key not in cached:
        cached[key] = _measure_work(model, batch, [layer for _, layer in layers if layer.batched_draws])
    work = cached[key]
    if not all(work[layer].sample_major for layer in must if layer in work):
        return None
    if device.type != "cpu":
        return must
    threads = torch.get_num_threads()
    return must | frozenset(layer for layer, entry in work.items() if entry.weights_cheaper(threads))


def _measure_work(model: nn.Module, batch: _Batch, layers: list[BayesianLayer]) -> dict[BayesianLayer, _Work]:
    """The `_Work` of each of ``layers`` for one sample of ``batch``, counted by hooks in a forward pass
    at the posterior loc on the batch folded from two samples.

    The two samples being equal, a layer whose input has them outermost, as drawing weights needs
    (batch-first, or flattened with the batch outermost), sees two equal halves; one whose input is
    sequence-first, (L, 2N, ...), does not. Random operations of the pass (dropout) leave the random
    numbers drawn after it as they would have been.
    """
    work: defaultdict[BayesianLayer, _Work] = defaultdict(_Work)

    def record(layer: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        assert isinstance(layer, BayesianLayer)
        entry = work[layer]
        entry.calls += 1
        entry.multiply_adds += layer._multiply_adds(output) // 2
        entry.outputs += output.numel() // 2
        entry.weights += sum(loc.numel() for loc in layer.random_parameters().values())
        entry.sample_major = entry.sample_major and bool(args) and isinstance(args[0], Tensor) and _equal_halves(args[0])

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        with deterministic(), preserved_rng(batch.tensors()[0].device):
            batch.folded(2)(model)
    finally:
        for handle in handles:
            handle.remove()
    return dict(work)


def _equal_halves(x: Tensor) -> bool:
    """Whether the two halves of ``x`` along its first dimension are equal, up to rounding: equal rows
    computed at other places of a batch may round differently."""
    if x.dim() == 0 or x.shape[0] % 2 or x.numel() == 0:
        return False
    first, second = x.unflatten(0, (2, -1))
    if not x.is_floating_point():
        return torch.equal(first, second)
    return bool((first - second).abs().max() <= 1e-3 * first.abs().max())


# -- vinn.sample and vinn.predict ----------------------------------------------------------------


def _device(model: nn.Module) -> torch.device | None:
    tensor: Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


@torch.no_grad()
def sample(
    model: nn.Module,
    x: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    samples: int = 16,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | int | None = None,
    draw: str | None = None,
) -> Any:
    """Outputs of ``samples`` sampled forward passes: shape (T, N, ...), T = ``samples``.

    ``x`` is a batch: a tensor (N, ...) (``model(x)``), a tuple of tensors (``model(*x)``) or a
    mapping of names to tensors (``model(**x)``, a tokenizer's batch), all batch-first with the
    same N, moved to the model's device. The model's output may be a tensor or any nesting of
    tuples, lists, dicts, namedtuples and dataclasses of tensors (None entries kept; a transformers KV
    cache, which a causal LM returns in eval mode, becomes None: it is the state of one pass of the
    folded batch for generating, no sample): the result
    has the same structure, each tensor (N, ...) becoming (T, N, ...). Every output tensor must be
    batch-first, one row per example (ValueError otherwise).

    Each of the T outputs of every example is an independent draw of the predictive distribution.
    The T samples are folded into the batch and run as ``ceil(T / chunk_size)`` forward passes of
    ``chunk_size * N`` rows, in which every vinn layer draws one of two ways, as ``draw`` says:

    - ``"outputs"``: fresh noise for every output element of every row (local reparameterization,
      estimator ``"lrt"``): the examples are independent within a sample too. The op computed
      twice (mean and variance), noise as large as the activations.
    - ``"weights"``: a weight draw per sample, shared by the sample's N examples (each sample is
      the output of one network drawn from the posterior), any posterior and estimator. The op
      computed once per sample on its N rows, T draws of the weights. The layers' inputs must have
      the batch as their first dimension (or outermost in it).
    - None (default): each layer the cheaper way for this batch: drawing weights costs the same
      for 1 example as for 1000, drawing outputs grows with the batch. Counted once per model and
      input shape by a forward pass at the posterior loc (which also checks that each layer's input
      has the batch outermost), not timed: on a CPU the choice is the same in every run on as many
      threads (``torch.get_num_threads()``); on an accelerator, and in train mode, every layer that
      can draws outputs. Layers that cannot draw
      outputs (a posterior other than Normal, estimator ``"sample"`` or ``"flipout"``) draw weights.

    Either way each example's T outputs are the same independent draws of its predictive
    distribution; only how the examples of one sample relate differs. A model with a layer that can
    do neither (a recurrent layer or attention with estimator ``"sample"`` or ``"flipout"``, a
    `vinn.BayesianParameter`) runs T passes of N rows instead, each drawing its own weights; a
    ``draw`` that a layer cannot follow is a ValueError naming it.

    ``chunk_size`` (samples per pass) bounds the working set; by default a first pass of one
    sample measures the largest output of any operation, and the other passes are sized so that
    it stays within about 16M elements on a CPU, 128M on an accelerator: memory stays bounded
    however wide the model's activations are.

    For a torch.fx model in eval mode (what `vinn.bayesify` returns) called with positional
    inputs, the deterministic trunk before the first random operation runs once on the N examples
    and only the rest of the graph on the folded batch: with only the last layer Bayesian, T
    samples cost little more than one pass. Any other model in eval mode whose only vinn layer
    computes its output last (nothing random before it, nothing at all after it, as found by one
    pass with hooks on it; a transformers classifier converted with ``last=1``) runs once, and that
    layer alone again for the other samples; its other outputs are repeated. Random operations are recognised by what they run
    (torch tags its random operations ``nondeterministic_seeded``): ``F.gumbel_softmax``, dropout
    or a module drawing noise of its own is never shared across samples. This assumes the tensors
    handed from trunk to rest are batch-first (N, ...), as checked.

    A `vinn.Mixture` draws a member for each of the T samples (shared by the sample's N examples, as
    a network drawn whole); each member's samples are computed as above, as it would be alone.

    Runs without gradients and does not change ``model.training``: call ``model.eval()`` first,
    as for any prediction (dropout and batch-norm behave as in the mode the model is in).

    ``generator`` (a `torch.Generator` or an int seed) makes the draws reproducible without
    touching the global RNG: the same generator state gives the same samples, and the global
    state after the call is what it was before (see `vinn.sampling.seeded`). Without it the
    global RNG is used, as by any torch layer. Choosing how to draw draws nothing: a first call
    gives the numbers a later one gives.
    """
    validation.module(model)
    batch = _batch(x)
    samples = validation.integer(samples, "samples", what="forward passes")
    chunk_size = validation.optional_integer(chunk_size, "chunk_size", what="samples per forward pass")
    if draw is not None and draw not in DRAWS:
        raise (validation.wrong_value if isinstance(draw, str) else validation.wrong_type)("draw", _ACCEPTED_DRAW, draw)
    device = _device(model)
    if device is not None:
        batch = batch.map(lambda v: v.to(device))
    with seeded(generator, batch.tensors()[0].device):
        return _sample(model, batch, samples, chunk_size, draw)


def _chunk_budget(tensor: Tensor) -> int:
    """The largest output of one operation of a folded pass, in elements, on ``tensor``'s device."""
    return _AUTO_CHUNK_ELEMENTS_CPU if tensor.device.type == "cpu" else _AUTO_CHUNK_ELEMENTS_ACCELERATOR


def _sample(model: nn.Module, batch: _Batch, samples: int, chunk_size: int | None, draw: str | None) -> Any:
    from .mixture import Mixture  # which builds on this module

    if isinstance(model, Mixture):
        return _mixture_samples(model, batch, samples, chunk_size, draw)
    n = batch.size
    layers = _bayesian_layers(model)
    drawing = None if draw is None else _forced(draw, layers)
    # In eval mode, the computation before the first sampling is shared by all samples: for a
    # torch.fx graph (as bayesify makes) the trunk before the first sampling node, when the values
    # it hands on are batch-first tensors; for any other model whose only vinn layer computes its
    # output last, everything before that layer. Otherwise the whole model runs on the folded
    # batch. A model with forward hooks of its own runs whole: they expect its every call (FSDP2's
    # fully_shard gathers the parameters in them).
    hooked = bool(model._forward_pre_hooks or model._forward_hooks)
    evaluating = not any(m.training for m in model.modules())
    if draw is None and evaluating and not hooked and not isinstance(model, torch.fx.GraphModule):
        drawn = _head_samples(model, batch, samples, chunk_size, layers)
        if drawn is not None:
            return drawn
    if isinstance(model, torch.fx.GraphModule) and not (batch.kwargs or hooked) and evaluating:
        found = _shared_trunk(model, batch.args)
        if found is not None and all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n for v in found[1]):
            model, batch = found[0], _Batch(tuple(found[1]), {})
    if draw is None:
        drawing = _chosen(model, batch, layers)
    if drawing is None:
        return _cat([_split(batch(model), 1, n) for _ in range(samples)])
    return _folded(model, batch, samples, chunk_size, drawing)


def _mixture_samples(mixture: Mixture, batch: _Batch, samples: int, chunk_size: int | None, draw: str | None) -> Any:
    """The outputs of ``samples`` samples of a `vinn.Mixture`, each from a member drawn uniformly
    for it, the member's samples computed together as the member alone would be sampled."""
    drawn = torch.randint(len(mixture.members), (samples,), device=batch.tensors()[0].device)
    counts = torch.bincount(drawn, minlength=len(mixture.members)).tolist()
    outputs = [_sample(member, batch, c, chunk_size, draw) for member, c in zip(mixture.members, counts) if c]
    index = drawn.argsort(stable=True).argsort()  # sample t's place among the members' samples, member-major
    return _map_outputs(lambda leaves, path: leaves[0][index], [_cat(outputs)])


def _folded(model: nn.Module, batch: _Batch, samples: int, chunk_size: int | None, drawing: frozenset[BayesianLayer]) -> Any:
    """The outputs of ``samples`` samples, computed on the batch folded ``chunk_size`` samples at a time,
    ``drawing`` drawing weights and the other vinn layers outputs."""
    n = batch.size

    def folded(t: int) -> Any:
        with weight_draws(t, drawing):
            return _split(batch.folded(t)(model), t, n)

    chunks, done, per_pass = [], 0, chunk_size
    if per_pass is None:
        # one sample first, to see how large the activations of a sample are
        with _Watch() as watch:
            chunks.append(folded(1))
        done = 1
        per_pass = max(1, _chunk_budget(batch.tensors()[0]) // max(1, watch.largest))
    for start in range(done, samples, per_pass):
        t = min(per_pass, samples - start)
        chunks.append(folded(t))
    return _cat(chunks)


def predict(
    model: nn.Module,
    x: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor],
    samples: int = 16,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | int | None = None,
    draw: str | None = None,
) -> Tensor:
    """Class probabilities of ``samples`` sampled forward passes: (T, N, C), softmax over classes.

    The model's outputs are logits with classes in dimension 1 (N, C, ...), as for
    ``nn.CrossEntropyLoss``: a tensor, or an output with a ``logits`` key or attribute (a dict,
    a namedtuple, a dataclass, a Hugging Face ``ModelOutput``). A binary classifier with one
    logit per example, output (N,) or (N, 1, ...) as for ``nn.BCEWithLogitsLoss``, gets the
    sigmoid: (T, N, 2, ...) probabilities of classes 0 and 1. Logits that give NaN probabilities
    (NaN or +inf) raise ValueError. Feed the result to `vinn.uncertainty` or
    `vinn.confidence_score`. See `sample` for inputs, batching, chunking, devices, ``generator``
    and ``draw``.
    """
    logits = _logits(sample(model, x, samples, chunk_size=chunk_size, generator=generator, draw=draw))
    if logits.dim() == 2:  # (T, N): one logit per example
        logits = logits.unsqueeze(2)
    if logits.shape[2] == 1:
        probabilities = torch.cat([(-logits).sigmoid(), logits.sigmoid()], dim=2)
    else:
        probabilities = logits.softmax(dim=2)
    if bool(probabilities.isnan().any()):
        raise ValueError(
            "model outputs must be finite logits, got NaN or +inf (NaN probabilities): check the model for "
            "divergence, or its input for NaN"
        )
    return probabilities


def _logits(output: Any) -> Tensor:
    """The logits of a model output: the tensor itself, or its ``logits`` key or attribute, (T, N, ...)."""
    logits = output
    if isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
        logits = output.logits
    accepted = "a tensor of logits, or an output with a 'logits' key or attribute; use vinn.sample for other outputs"
    if not isinstance(logits, Tensor):
        raise validation.wrong_type("the model's output (in vinn.predict)", accepted, output)
    if not logits.is_floating_point():
        raise validation.wrong_type("the model's logits (in vinn.predict)", "floating point", logits)
    return logits
