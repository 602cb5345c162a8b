"""`vinn.bayesify`: a trained torch.nn model becomes a Bayesian one; `vinn.to_deterministic`: the way back.

The pass reads like ``torch.fx.experimental.optimization.fuse``: trace the model, walk the graph,
match the layers that have a vinn counterpart, replace them, return. A model that torch.fx cannot
trace is converted by walking its module tree instead.

Names and ``state_dict`` keys of the result:

- A converted module keeps its qualified name and its ``weight`` / ``bias`` keys, which now hold
  the posterior loc, and gains the vinn layer's own entries beside them: its posterior-scale
  parameters and its prior's buffers (``<name>.weight_prior_loc``, ``<name>.weight_prior_scale``,
  ...). A deterministic checkpoint of the input model therefore loads into the result with
  ``strict=False``.
- A functional call ``F.linear(x, self.block.w, self.block.b)`` (or ``F.conv*d``) becomes a vinn
  layer named after its weight: the parameters ``block.w`` and ``block.b`` are replaced by the
  module ``block.w``, whose keys are ``block.w.weight``, ``block.w.bias`` and the layer's own.
- A parameter that a `BayesConfig` rule names becomes Bayesian through a `vinn.BayesianParameter`
  parametrization: its loc is ``<owner>.parametrizations.<name>.original`` (``parametrize``'s
  key), its scale and prior are under ``<owner>.parametrizations.<name>.0``, and a `vinn.Module`
  loads the loc from ``<owner>.<name>`` too. Through torch.fx the graph calls that
  parametrization where it read the parameter; read by a module's own code (or untraced), the
  owner gets torch's parametrized property.
- Through torch.fx, the result holds only what ``forward`` uses: a module or tensor that
  ``forward`` never reads is not part of it (``GraphModule`` semantics).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import field
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Normal
from torch.fx import Graph, Node
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from .. import validation
from ..distributions import MatrixNormal, PosteriorFamily
from ..layers import BayesianLayer, InitScale, layer_types
from ..mixture import Mixture
from ..module import Module
from ..parametrization import BayesianParameter, bayesian_parametrizations
from ..priors import PriorSpec
from .config import CONVERTED_INIT_SCALE, BayesConfig, LayerSpec
from .models import BayesianGraphModule, bayesian_subclass, copy_hooks, has_hooks, user_class
from .report import ConversionReport, LayerReport
from .transformer import CALLS_SUBMODULES, keep_sampling, restore


class _Functional(NamedTuple):
    layer_type: type[nn.Module]  # the torch.nn layer that computes the same
    arguments: tuple[str, ...]  # the function's arguments, in positional order
    weight_dim: int


# Functional calls that become vinn layers. F.conv2d is torch.conv2d and F.linear is
# torch._C._nn.linear: the objects symbolic tracing records as call_function targets.
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_FUNCTIONAL: dict[object, _Functional] = {
    F.linear: _Functional(nn.Linear, ("input", "weight", "bias"), 2),
    F.conv1d: _Functional(nn.Conv1d, _CONV_ARGUMENTS, 3),
    F.conv2d: _Functional(nn.Conv2d, _CONV_ARGUMENTS, 4),
    F.conv3d: _Functional(nn.Conv3d, _CONV_ARGUMENTS, 5),
}
_FUNCTIONAL_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _call_arguments(call: Node) -> dict[str, object]:
    """The arguments of a call of a `_FUNCTIONAL` function, by name, defaults included."""
    return {**_FUNCTIONAL_DEFAULTS, **dict(zip(_FUNCTIONAL[call.target].arguments, call.args)), **call.kwargs}

# torch.nn containers: never called, they are not leaves that read their children's weights
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# the default prior, one shared instance: bayesify compares against it to tell a prior= the caller
# passed from the default (each layer copies the prior's tensors into its own buffers)
_DEFAULT_PRIOR = Normal(0.0, 1.0)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with vinn layers as leaves (tracing into one would bake its sampling into the
    graph) and every layer type vinn converts (a user's own included), so that it is called as a module."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaf = isinstance(module, BayesianLayer) or type(module) in layer_types()
        return leaf or super().is_leaf_module(module, qualified_name)


class _HookKeepingTracer(_Tracer):
    """Also keeps every submodule with hooks as a leaf: called whole, its hooks run in the result."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (bool(qualified_name) and has_hooks(module)) or super().is_leaf_module(module, qualified_name)


@dataclasses.dataclass(eq=False)
class _Candidate:
    """A Linear/Conv layer of the model (a module, or a functional call on the model's parameters),
    or a parameter that a config rule names."""

    name: str  # qualified name (of the module, of the functional call's weight, of the parameter)
    kind: str  # for the report: "Conv2d", "F.linear", "Parameter"
    parameters: int  # weight and bias elements
    order: int  # position in execution order, for last=k
    reason: str | None  # why it stays deterministic; None while it may be converted
    layer: nn.Module | None = None  # the exact torch.nn layer to convert (built for a functional call)
    call: Node | None = None  # the functional call node, for a functional call
    spec: LayerSpec | None = None  # how it becomes Bayesian, once decided
    parameter: nn.Parameter | None = None  # for a parameter: the parameter itself
    # a module that vinn cannot replace by a vinn layer, but whose parameters it can make Bayesian:
    # forward reads them itself (not only by calling the module), or the module is a subclass of a
    # supported type whose forward vinn does not know; each becomes a BayesianParameter, drawn whole
    drawn_whole: bool = False
    # tied weights: attribute -> (the earlier layer whose posterior it shares, that layer's attribute)
    shares: dict[str, tuple[_Candidate, str]] = field(default_factory=dict)


def bayesify(
    model: nn.Module,
    config: BayesConfig | None = None,
    *,
    posterior: PosteriorFamily = Normal,
    prior: Distribution | PriorSpec = _DEFAULT_PRIOR,
    init_scale: InitScale = CONVERTED_INIT_SCALE,
    estimator: str | None = None,
    last: int | None = None,
    verbose: bool = False,
) -> Module:
    """A Bayesian copy of ``model``: every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Embedding``
    and ``nn.MultiheadAttention`` becomes its vinn layer (normalization layers where ``config`` names them).

    Each converted layer keeps every constructor attribute of the original (stride, padding,
    dilation, groups, output_padding, padding_mode, bias, dtype, device); its posterior loc is
    the pretrained weight and bias, so inside `vinn.deterministic()` the result computes exactly
    what ``model`` computes. ``model`` itself is not modified. The result is a `vinn.Module`
    (``.kl`` sums the KL of the converted layers) whose every module (the containers torch.fx
    creates included) is in the train/eval mode of its counterpart in ``model``. What the user
    set is kept: hooks on ``model`` and on converted layers, frozen parameters (a frozen layer's
    posterior scale is frozen too). A submodule with hooks is called whole, so that its hooks
    keep running; its layers stay deterministic (reported). A `BayesConfig` rule that matches no
    layer, and a conversion that converts nothing, warn (``UserWarning``). TorchScript modules
    are refused (TypeError): convert the Python model before scripting it.

    How: torch.fx traces ``model``, and every call of a module of exactly a supported type is
    converted, as is every
    ``F.linear`` / ``F.conv1d/2d/3d`` call whose weight and bias are parameters of the model used
    by that call alone. The result is then a `BayesianGraphModule`. A layer whose parameters
    ``forward`` reads itself (torchvision's Swin passes its attention's ``qkv.weight`` to a
    function), and a subclass of a supported type (which may compute something else: timm's
    ``ScaledStdConv2d``), are made Bayesian by weight sampling: each parameter becomes a
    `vinn.BayesianParameter`, drawn whole wherever it is read. Kept deterministic, and
    reported: layers inside a torch.nn module that reads their weights directly (the ``out_proj``
    of an ``nn.MultiheadAttention`` kept deterministic), layers never called in ``forward``,
    parameters shared with a module that is no layer vinn converts. Layers tied to each other (one
    weight held by several converted layers: an embedding and a language-model head) share one
    posterior, the first one's in forward order: the same loc and ``*_log_sigma2`` parameters,
    counted once by `vinn.kl`; each use draws its own noise. torch's transformer blocks, which
    torch.fx cannot trace, call their layers: those are converted in place, and the blocks kept
    off their fused fast path (`vinn.convert.transformer`). If tracing fails (data-dependent
    control flow), a ``UserWarning`` says why (the report keeps it, ``trace_error``) and the
    model's module tree is walked instead: the result is then an instance of ``model``'s own class
    (with `vinn.Module` mixed in), its methods and attributes intact.

    Any other parameter becomes Bayesian where a `BayesConfig` name rule names it (a pattern not
    ending in ``*``: ``"class_token"``): a `vinn.BayesianParameter` parametrizes it
    (``torch.nn.utils.parametrize``), and every read is a draw of its posterior.

    Args:
        model: the trained torch.nn model.
        config: which layers become Bayesian and how (`BayesConfig`). Without it, every layer
            becomes Bayesian with ``LayerSpec(posterior, prior, init_scale, estimator)``; with it,
            leave those four keywords out and put them in the config's `LayerSpec` objects.
        posterior: the posterior family, a ``torch.distributions`` class built from loc and scale.
        prior: a distribution instance, or a vinn prior: `PretrainedPrior` (centred on the
            pretrained weights), `EmpiricalBayesPrior` (scale learned), `FanInPrior`.
        init_scale: the initial posterior scale: a float, or a callable loc -> scale tensor such
            as ``vinn.RelativeScale(0.1, floor=1e-4)`` (MOPED).
        estimator: how the forward pass samples (``"lrt"``, ``"flipout"``, ``"sample"``; None: the
            layers' default for the posterior).
        last: convert only the last ``last`` layers, in the order ``forward`` first uses them,
            among those the config selects (the rest are reported "excluded by last=k"). In the
            module-tree fallback the order is that of ``model.named_modules()``.
        verbose: print the `ConversionReport`.

    Returns:
        The Bayesian model; its `ConversionReport` is ``bnn.conversion_report``.
    """
    validation.module(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise validation.wrong_type(
            "model", "a Python torch.nn.Module", model,
            "TorchScript keeps no Python modules to replace: call vinn.bayesify on the model before torch.jit.script/trace",
        )
    if type(model) in layer_types():
        vinn_layer = layer_types()[type(model)].__name__
        raise TypeError(f"model is a single {type(model).__name__}: use vinn.{vinn_layer}.from_torch(model)")
    config = _resolve_config(config, LayerSpec(posterior, prior, init_scale, estimator))
    last = validation.optional_integer(last, "last", what="how many layers to convert")

    root = copy.deepcopy(model)  # all the work happens on this copy
    tied = _tied_parameters(root)
    usage: _Usage | None
    try:
        graph = _HookKeepingTracer().trace(root)
    except Exception as error:  # whatever user code raises on proxies means: not traceable
        trace_error = _first_line(error)
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({trace_error}); converting it by walking "
            "its module tree instead: every supported layer counts as used, F.linear/F.conv calls stay "
            "deterministic, and last=k follows the order of named_modules()",
            UserWarning,
            stacklevel=2,
        )
        bnn, candidates, usage = root, _module_tree_candidates(root, tied), None
    else:
        trace_error = None
        for node in graph.nodes:
            # A string annotation (`from __future__ import annotations`) becomes a str global of the
            # generated code, which GraphModule pickling rejects in some torch versions (2.11).
            if isinstance(node.type, str):
                node.type = None
        bnn = BayesianGraphModule(root, graph, class_name=type(model).__name__)  # compiles the graph's code
        usage = _graph_usage(root, graph)
        candidates = _graph_candidates(root, usage, tied)

    _decide(candidates, config, last)
    _share_tied(candidates)
    parameters = _parameter_candidates(root, config, candidates, usage, tied)
    layers = [(c.name, type(c.layer) if c.layer is not None else None) for c in candidates]
    for rule in config.unused_rules(layers, (name for name, _ in root.named_parameters(remove_duplicate=False))):
        warnings.warn(f"bayesify: the config rule {rule} matches no layer of {type(model).__name__} that vinn converts",
                      UserWarning, stacklevel=2)
    converted = [c for c in candidates + parameters if c.spec is not None]
    if not converted:
        warnings.warn(
            f"bayesify converted no layer of {type(model).__name__}: the result is deterministic and its KL is 0; "
            "see bnn.conversion_report for why each layer was kept",
            UserWarning,
            stacklevel=2,
        )
    # The modules are root's, a private copy: their tensors become the locs, uncopied, unless tied
    modules = {
        id(c.layer): _bayesian_layer(c, assign=not any(f"{c.name}.{p}" in tied for p, _ in c.layer.named_parameters()))
        for c in converted if c.layer is not None and c.call is None and not c.drawn_whole
    }
    _tie(converted, modules)
    _replace_modules(bnn, modules)
    for candidate in converted:
        if candidate.call is not None:
            _replace_functional_call(bnn, candidate, _bayesian_layer(candidate))
    _converted_with_their_owner(bnn, candidates)
    keep_sampling(bnn)
    named = [c for c in converted if c.parameter is not None] + [p for c in converted if c.drawn_whole for p in _drawn_whole(c)]
    by_tensor: dict[int, BayesianParameter] = {}  # one posterior per tensor, that tied layers drawn whole share
    for candidate in sorted(named, key=lambda c: c.order):  # built from the first holder's spec
        if id(candidate.parameter) not in by_tensor:
            by_tensor[id(candidate.parameter)] = _bayesian_parameter(candidate)
    random_parameters = [(c, by_tensor[id(c.parameter)]) for c in named]
    if isinstance(bnn, BayesianGraphModule):
        for candidate, parametrization in random_parameters:
            _parametrize_traced(bnn, candidate, parametrization, usage)
        if random_parameters or any(c.call is not None for c in converted):  # the graph changed
            bnn.graph.lint()
            bnn.recompile()
        copy_hooks(root, bnn)
    else:
        if not isinstance(bnn, Module):
            bnn.__class__ = bayesian_subclass(type(bnn))
        for candidate, parametrization in random_parameters:  # after the class swap, which they extend
            owner, _, attribute = candidate.name.rpartition(".")
            parametrization.parametrize(bnn.get_submodule(owner), attribute)

    _copy_modes(model, bnn)
    bnn.conversion_report = ConversionReport(
        layers=tuple(
            LayerReport(
                c.name, c.kind, c.parameters, converted=c.spec is not None, reason=c.reason,
                shared_with=", ".join(_qualified(source.name, name) for source, name in c.shares.values()) or None,
                drawn_whole=c.drawn_whole and c.spec is not None,
            )
            for c in candidates + parameters
        ),
        traced=trace_error is None,
        total_parameters=_numel(model.parameters()),
        trace_error=trace_error,
    )
    if verbose:
        print(bnn.conversion_report)
    return bnn


def to_deterministic(model: nn.Module) -> nn.Module:
    """A plain torch.nn copy of ``model`` in which every vinn layer is its torch.nn layer holding the posterior loc.

    Its output equals ``model``'s inside `vinn.deterministic()`. For a `bayesify` result: a
    ``torch.fx.GraphModule`` (traced models) or an instance of the user's own class (module-tree
    fallback), neither a `vinn.Module`. Works on any module containing vinn layers, such as a
    `vinn.Module` written by hand (its class is kept). Layers that share a posterior (tied weights)
    share their weight again, and a `vinn.BayesianParameter`'s parametrization is removed, leaving
    the plain parameter at its own name, holding the loc. ``model`` is not modified. A model holding
    a `vinn.Mixture`, which is no single network, is a ValueError.
    """
    validation.module(model)
    if any(isinstance(m, Mixture) for m in model.modules()):
        raise ValueError(
            "model must not hold a vinn.Mixture: a vinn.Mixture has no single deterministic network; "
            "convert its members instead, [vinn.to_deterministic(m) for m in mixture.members]"
        )
    if isinstance(model, BayesianLayer) and not isinstance(model, BayesianParameter):
        return _torch_layer(model)
    net = copy.deepcopy(model)
    _remove_bayesian_parameters(net)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, BayesianLayer)}
    # a vinn layer inside another (a MultiheadAttention's out_proj) goes back with it
    _replace_modules(net, _torch_layers([m for name, m in layers.items() if _leaf_ancestor(name, layers) is None]))
    restore(net)
    if isinstance(net, BayesianGraphModule):
        graph_module = torch.fx.GraphModule(net, net.graph, class_name=type(net).__name__)
        copy_hooks(net, graph_module)
        _copy_modes(model, graph_module)
        return graph_module
    original_class = user_class(net)
    if original_class is not None:
        net.__class__ = original_class
        del net.conversion_report
    return net


def _torch_layer(layer: BayesianLayer) -> nn.Module:
    """``layer.to_torch()`` with ``layer``'s hooks and frozen parameters."""
    module = layer.to_torch()
    _keep_settings(layer, module)
    return module


def _torch_layers(bayesian: list[BayesianLayer]) -> dict[int, nn.Module]:
    """The torch.nn layer of each vinn layer of ``bayesian``, by the vinn layer's id; layers whose loc
    is one tensor (tied weights sharing a posterior) share one tensor again."""
    layers: dict[int, nn.Module] = {}
    holders: dict[int, tuple[nn.Module, str]] = {}  # loc -> the first torch layer holding it, and its attribute
    for module in bayesian:
        layers[id(module)] = layer = _torch_layer(module)
        for name, loc in module.random_parameters().items():
            holder, attribute = holders.setdefault(id(loc), (layer, name))
            if holder is not layer:
                setattr(layer, name, getattr(holder, attribute))
    return layers


def _remove_bayesian_parameters(net: nn.Module) -> None:
    """Put back each parameter that a `BayesianParameter` parametrizes in ``net`` as a plain parameter
    at its own name, holding the posterior loc (``parametrize``'s ``original``)."""
    for owner_name, name, parametrizations in list(bayesian_parametrizations(net)):
        owner = net.get_submodule(owner_name)
        if parametrize.is_parametrized(owner, name):  # torch's own: a property on the owner's class
            # which copies of the model share (deepcopy keeps the class): removing the property from it
            # would break the model copied from, so this copy gets a class of its own first
            cls = type(owner)
            owner.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
            parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
        else:  # called by a traced graph from a plain holder module
            container = owner.parametrizations
            delattr(container, name)
            if not container._modules:
                delattr(owner, "parametrizations")
            owner.register_parameter(name, parametrizations.original)
        if isinstance(net, torch.fx.GraphModule):  # the graph reads the parameter again
            target = _qualified(_qualified(owner_name, "parametrizations"), name)
            for node in [n for n in net.graph.nodes if n.op == "call_module" and n.target == target]:
                with net.graph.inserting_before(node):
                    node.replace_all_uses_with(net.graph.get_attr(_qualified(owner_name, name)))
                net.graph.erase_node(node)


def _resolve_config(config: BayesConfig | None, keywords: LayerSpec) -> BayesConfig:
    """``config``, or without one, the config giving every layer the spec of bayesify's keywords."""
    if config is None:
        return BayesConfig().set_global(keywords)
    if not isinstance(config, BayesConfig):
        raise validation.wrong_type("config", "a vinn.BayesConfig or None", config)
    if keywords != LayerSpec(prior=_DEFAULT_PRIOR):
        raise ValueError(  # arguments that contradict each other: a wrong value, as in vinn.ELBO
            "pass posterior, prior, init_scale and estimator in the LayerSpecs of config, not as keywords beside it"
        )
    return config


# -- finding the layers ------------------------------------------------------------------------


class _Usage(NamedTuple):
    """What a traced ``forward`` calls and reads."""

    graph: Graph
    called: dict[str, int]  # call_module target -> position of its first call
    read: dict[str, int]  # get_attr target -> position of its first read


def _graph_usage(root: nn.Module, graph: Graph) -> _Usage:
    """What ``graph`` calls (a torch transformer block's submodules included, called by the block) and reads."""
    usage = _Usage(graph, {}, {})
    for position, node in enumerate(graph.nodes):
        if node.op in ("call_module", "get_attr"):
            (usage.called if node.op == "call_module" else usage.read).setdefault(node.target, position)
    for name in list(usage.called):
        _add_called_submodules(root.get_submodule(name), name, usage.called[name], usage.called)
    return usage


def _graph_candidates(root: nn.Module, usage: _Usage, tied: dict[str, list[str]]) -> list[_Candidate]:
    """Every Linear/Conv module of ``root`` and every functional call on its parameters, as traced
    (``tied``: `_tied_parameters` of ``root``)."""
    graph, called, read = usage
    leaves = {name for name in called if type(root.get_submodule(name)) not in CALLS_SUBMODULES}
    supported = tuple(layer_types())
    hooked = {name: has_hooks(module) for name, module in root.named_modules()}
    untieable = _untieable(root, tied)
    # torch.fx reads a tensor by one of its names (a tied tensor by the first): where a module's
    # parameters are read, by whatever name
    read_at: dict[int, int] = {}
    for target, position in read.items():
        owner, _, attribute = target.rpartition(".")
        read_at.setdefault(id(getattr(root.get_submodule(owner), attribute)), position)
    candidates = []
    for name, module in root.named_modules():
        if isinstance(module, supported):
            reads = [read_at[id(p)] for p in module.parameters() if id(p) in read_at]
            reason = _module_reason(name, module, leaves, untieable, hooked)
            if reason is None and not reads and name not in called:
                reason = "never called in forward"
            order = min(reads + [called.get(name, len(graph.nodes))])
            candidates.append(_module_candidate(name, module, order, reason, read_directly=bool(reads)))
    parameters = dict(root.named_parameters())
    functional: dict[str, _Candidate] = {}  # by weight name: a weight used by several calls is one entry
    for position, node in enumerate(graph.nodes):
        if node.op == "call_function" and node.target in _FUNCTIONAL:
            candidate = _functional_candidate(root, node, position, parameters, called, tied)
            if candidate is not None:
                functional.setdefault(candidate.name, candidate)
    return candidates + list(functional.values())


def _module_tree_candidates(root: nn.Module, tied: dict[str, list[str]]) -> list[_Candidate]:
    """Every Linear/Conv module of ``root``, in ``named_modules`` order, without a graph to say how it is used
    (``tied``: `_tied_parameters` of ``root``)."""
    tracer = _Tracer()
    leaves = {
        name
        for name, module in root.named_modules()
        if name and tracer.is_leaf_module(module, name)
        and not (isinstance(module, _CONTAINERS) or type(module) in CALLS_SUBMODULES)
    }
    untieable = _untieable(root, tied)
    supported = tuple(layer_types())
    return [
        _module_candidate(name, module, position, _module_reason(name, module, leaves, untieable))
        for position, (name, module) in enumerate(root.named_modules())
        if isinstance(module, supported)
    ]


def _add_called_submodules(module: nn.Module, name: str, position: int, called: dict[str, int]) -> None:
    """Record as called at ``position`` what ``module``, called there, calls itself: every submodule of a torch
    transformer block (see `vinn.convert.transformer`), through its containers (``layers``)."""
    if type(module) not in CALLS_SUBMODULES and not isinstance(module, _CONTAINERS):
        return
    for child_name, child in module.named_children():
        qualified = _qualified(name, child_name)
        if not isinstance(child, _CONTAINERS):
            called.setdefault(qualified, position)
        _add_called_submodules(child, qualified, position, called)


def _vinn_type(module: nn.Module) -> type[BayesianLayer]:
    """The vinn layer type of ``module``: its type's, or for a subclass its first supported base's."""
    supported = layer_types()
    return supported[next(t for t in type(module).__mro__ if t in supported)]


def _module_candidate(name: str, module: nn.Module, order: int, reason: str | None, read_directly: bool = False) -> _Candidate:
    """The module ``name`` as a candidate; drawn whole if ``forward`` reads its parameters itself
    (``read_directly``) or it is a subclass of a supported type (see `_Candidate.drawn_whole`)."""
    parameters = _numel(p for n in _vinn_type(module).parameter_names_of(module) if (p := getattr(module, n, None)) is not None)
    drawn_whole = read_directly or type(module) not in layer_types()
    return _Candidate(name, type(module).__name__, parameters, order, reason, layer=module, drawn_whole=drawn_whole)


def _module_reason(
    name: str, module: nn.Module, leaves: Iterable[str], tied: dict[str, list[str]], hooked: Mapping[str, bool] | None = None
) -> str | None:
    """Why the module ``name`` cannot be converted, whatever the options; None if it can.

    ``tied``: the parameters shared with something other than a layer vinn converts (see
    `_untieable`); ``hooked`` says which modules have hooks (traced as whole leaves)."""
    hooked = hooked or {}
    if isinstance(module, BayesianLayer):
        return "already a vinn layer"
    leaf = _leaf_ancestor(name, leaves)
    if leaf is not None:
        if hooked.get(leaf):
            return f"inside {leaf}, called whole so that its hooks keep running"
        return f"read directly by leaf module {leaf}"
    names = _vinn_type(module).parameter_names_of(module)
    if all(getattr(module, attribute, None) is None for attribute in names):
        return f"no {' or '.join(names)} to make Bayesian"
    for attribute in names:
        also = tied.get(_qualified(name, attribute))
        if also is not None:
            return f"shared parameter (also {also[0]})"
    return None


def _functional_candidate(
    root: nn.Module,
    call: Node,
    position: int,
    parameters: dict[str, nn.Parameter],
    called: dict[str, int],
    tied: dict[str, list[str]],
) -> _Candidate | None:
    """The functional call ``call`` as a layer, if its weight is a parameter of ``root``; None otherwise.

    A weight that belongs to a Linear/Conv module is that module's entry (it says "parameter read
    directly in forward"); a weight computed in ``forward`` is no layer of the model.
    """
    functional, arguments = _FUNCTIONAL[call.target], _call_arguments(call)
    weight = _read_parameter(arguments["weight"], parameters)
    if weight is None or isinstance(root.get_submodule(_parent(arguments["weight"].target)), tuple(layer_types())):
        return None
    bias = _read_parameter(arguments["bias"], parameters)
    reads = [arguments[name] for name in ("weight", "bias") if arguments[name] is not None]
    options = {name: arguments[name] for name in functional.arguments[3:]}  # stride, padding, dilation, groups
    reason = _functional_reason(functional, reads, weight, bias, options, called, tied)
    return _Candidate(
        name=arguments["weight"].target,
        kind=f"F.{call.target.__name__}",
        parameters=_numel(t for t in (weight, bias) if t is not None),
        order=position,
        reason=reason,
        layer=None if reason is not None else _equivalent_layer(functional.layer_type, weight, bias, options),
        call=call,
    )


def _functional_reason(
    functional: _Functional,
    reads: list[Node],
    weight: Tensor,
    bias: Tensor | None,
    options: dict[str, object],
    called: dict[str, int],
    tied: dict[str, list[str]],
) -> str | None:
    """Why a functional call on the model's weight cannot become a vinn layer; None if it can."""
    if len(reads) > 1 and bias is None:
        return "bias is not a parameter of the model"
    for read in reads:
        if len(read.users) > 1:
            return f"parameter {read.target} used elsewhere in forward"
        if read.target in tied:
            return f"shared parameter (also {tied[read.target][0]})"
        leaf = _leaf_ancestor(read.target, called)
        if leaf is not None:
            return f"read directly by leaf module {leaf}"
    if any(_has_node(value) for value in options.values()):
        return "stride, padding, dilation or groups computed in forward"
    if weight.dim() != functional.weight_dim:
        return f"weight of shape {tuple(weight.shape)} fits no nn.{functional.layer_type.__name__}"
    return None


def _equivalent_layer(
    layer_type: type[nn.Module], weight: Tensor, bias: Tensor | None, options: dict[str, object]
) -> nn.Module:
    """The ``layer_type`` module holding ``weight`` and ``bias`` that computes what the functional call did."""
    factory = {"bias": bias is not None, "device": weight.device, "dtype": weight.dtype}
    if layer_type is nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], **factory)
    else:  # weight (out_channels, in_channels / groups, *kernel_size)
        in_channels = weight.shape[1] * options["groups"]
        layer = layer_type(in_channels, weight.shape[0], tuple(weight.shape[2:]), **options, **factory)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


# -- choosing and converting -------------------------------------------------------------------


def _decide(candidates: list[_Candidate], config: BayesConfig, last: int | None) -> None:
    """Set each candidate's spec (converted) or reason (kept): first the config, then last=k on top."""
    for candidate in candidates:
        if candidate.reason is None:
            spec, rule = config.spec_for(candidate.name, type(candidate.layer))
            if spec is None:
                candidate.reason = f"excluded by config ({rule})"
            elif candidate.drawn_whole and spec.posterior is MatrixNormal:
                spec, candidate.reason = None, "vinn.MatrixNormal cannot draw a parameter whole, which this layer needs (see the docs of vinn.bayesify)"
            candidate.spec = spec
    selected = sorted((c for c in candidates if c.spec is not None), key=lambda c: c.order)
    if last is not None:
        for candidate in selected[:-last]:
            candidate.spec, candidate.reason = None, f"excluded by last={last}"


def _share_tied(candidates: list[_Candidate]) -> None:
    """Let tied layers share one posterior: that of the first layer (in forward order) holding each tensor.

    A group of layers tied together becomes Bayesian whole or not at all: if anything keeps one of
    them deterministic (the config, last=k, a direct read), the others stay deterministic too, since
    one tensor cannot be random for one reader and fixed for another. A layer that shares no longer
    counts the shared elements among its ``parameters`` (they are its source's).
    """
    layers = sorted((c for c in candidates if c.layer is not None and c.call is None), key=lambda c: c.order)
    holders: dict[int, tuple[_Candidate, str]] = {}  # tensor -> the first layer holding it, and its attribute
    groups: dict[int, set[_Candidate]] = {id(c): {c} for c in layers}  # layer -> the layers tied to it
    for candidate in layers:
        for attribute, tensor in _random_parameters(candidate.layer).items():
            source = holders.setdefault(id(tensor), (candidate, attribute))
            if source[0] is not candidate:
                candidate.shares[attribute] = source
                merged = groups[id(candidate)] | groups[id(source[0])]
                for member in merged:
                    groups[id(member)] = merged
    for group in {id(g): g for g in groups.values() if len(g) > 1}.values():
        kept = next((member for member in sorted(group, key=lambda c: c.order) if member.spec is None), None)
        drawn_whole = any(member.drawn_whole for member in group)
        for member in group:
            if kept is None:
                shared = [_random_parameters(member.layer)[attribute] for attribute in member.shares]
                member.parameters -= _numel(shared)
                # one layer of the group drawn whole: all are, the tensor is one BayesianParameter
                member.drawn_whole = drawn_whole
                continue
            if member.spec is not None:
                member.spec, member.reason = None, f"shared parameter (also {_tied_name(kept, member)}), which stays deterministic"
            member.shares.clear()


def _tied_name(holder: _Candidate, other: _Candidate) -> str:
    """The qualified name in ``holder`` of a tensor that ``other`` holds too (``holder``'s name if none)."""
    tensors = {id(t) for t in _random_parameters(other.layer).values()}
    names = [_qualified(holder.name, a) for a, t in _random_parameters(holder.layer).items() if id(t) in tensors]
    return names[0] if names else holder.name


def _tie(candidates: list[_Candidate], layers: dict[int, BayesianLayer]) -> None:
    """Give every converted layer that shares a tensor (``candidate.shares``) its source layer's posterior."""
    for candidate in candidates:
        if candidate.drawn_whole:  # its tied tensors are one BayesianParameter (see bayesify)
            continue
        for attribute, (source, source_attribute) in candidate.shares.items():
            _share_posterior(layers[id(source.layer)], source_attribute, layers[id(candidate.layer)], attribute)


def _share_posterior(source: BayesianLayer, source_name: str, layer: BayesianLayer, name: str) -> None:
    """Make ``layer``'s random parameter ``name`` the posterior of ``source``'s ``source_name``: the same
    loc and scale parameter objects and the same prior buffers. `vinn.kl` counts it once."""
    suffixes = ["", "_log_sigma2"]
    if source._matrix_normal and source_name == "weight" and layer._matrix_normal and name == "weight":
        suffixes += ["_column_log_sigma2", "_column_tril"]  # a MatrixNormal weight's column covariance
    for suffix in suffixes:
        layer.register_parameter(name + suffix, source._parameters[source_name + suffix])
    for path in layer._prior_templates[name][1]:
        delattr(layer, layer._prior_buffer(name, path))
    for path in source._prior_templates[source_name][1]:
        layer.register_buffer(layer._prior_buffer(name, path), source._buffers[source._prior_buffer(source_name, path)])
    layer._prior_templates[name] = source._prior_templates[source_name]
    if isinstance(layer._prior_source, PriorSpec) and layer._prior_source.learned:
        layer._prior_source = _SharedPrior(layer._prior_source, {name: (source, source_name)})


class _SharedPrior(PriorSpec):
    """The learned prior of a layer sharing a posterior: the shared parameters' prior scale is fitted
    as the layer holding their posterior fits it (its own grouping into units, its buffers' shape)."""

    learned = True
    prior: PriorSpec
    holders: dict[str, tuple[BayesianLayer, str]]

    def __init__(self, prior: PriorSpec, holders: dict[str, tuple[BayesianLayer, str]]) -> None:
        if isinstance(prior, _SharedPrior):
            prior, holders = prior.prior, {**prior.holders, **holders}
        self.prior, self.holders = prior, holders

    def priors(self, layer: BayesianLayer) -> dict[str, Distribution]:
        return self.prior.priors(layer)

    def fitted_scale(self, layer: BayesianLayer, name: str, second_moment: Tensor) -> Tensor:
        holder, holder_name = self.holders.get(name, (layer, name))
        return self.prior.fitted_scale(holder, holder_name, second_moment)

    def _key(self) -> tuple[object, ...]:
        return (self.prior, tuple((name, id(holder), holder_name) for name, (holder, holder_name) in self.holders.items()))

    def __repr__(self) -> str:
        return repr(self.prior)


def _parameter_candidates(
    root: nn.Module, config: BayesConfig, layers: list[_Candidate], usage: _Usage | None, tied: dict[str, list[str]]
) -> list[_Candidate]:
    """The parameters a name rule of ``config`` addresses (`BayesConfig.spec_for_parameter`), each with
    its spec or the reason it stays as it is; those of the layers being converted are left out
    (``tied``: `_tied_parameters` of ``root``)."""
    converted = {layer.name for layer in layers if layer.spec is not None and layer.call is None}  # modules
    functional = set()  # the parameters of the functional calls converted
    for layer in layers:
        if layer.spec is not None and layer.call is not None:
            arguments = _call_arguments(layer.call)
            functional.update(arguments[a].target for a in ("weight", "bias") if arguments[a] is not None)
    seen: set[int] = set()
    candidates = []
    for position, (name, parameter) in enumerate(root.named_parameters(remove_duplicate=False)):
        rule = config.spec_for_parameter(name)
        in_layer = name in functional or _leaf_ancestor(name, converted) is not None
        if rule is None or in_layer or (id(parameter) in seen and name not in tied):
            continue  # not named, Bayesian with its layer, or a module registered twice
        seen.add(id(parameter))
        spec, chosen = rule
        reason = _parameter_reason(root, name, tied, usage) or (None if spec is not None else f"excluded by config ({chosen})")
        candidates.append(
            _Candidate(name, "Parameter", _numel([parameter]), position, reason, spec=None if reason else spec, parameter=parameter)
        )
    return candidates


def _parameter_reason(root: nn.Module, name: str, tied: dict[str, list[str]], usage: _Usage | None) -> str | None:
    """Why the parameter ``name`` cannot become a `BayesianParameter`; None if it can."""
    owner = root.get_submodule(_parent(name))
    if isinstance(owner, BayesianLayer):
        return f"already Bayesian: a parameter of the vinn layer {_parent(name) or '(root)'}"
    if isinstance(owner, ParametrizationList):
        return "already parametrized (torch.nn.utils.parametrize)"
    if name in tied:
        return f"shared parameter (also {tied[name][0]})"
    if usage is not None and name not in usage.read and _leaf_ancestor(name, usage.called) is None:
        return "never used in forward"
    return None


def _converted_with_their_owner(bnn: nn.Module, candidates: list[_Candidate]) -> None:
    """Mark converted the layers that a converted vinn layer made Bayesian with itself (a MultiheadAttention's
    out_proj), reported as read directly by it until then; they take its spec."""
    owners = {c.name: c for c in candidates if c.spec is not None and c.call is None}
    for candidate in candidates:
        owner = owners.get(_leaf_ancestor(candidate.name, owners))
        if candidate.spec is None and owner is not None and isinstance(bnn.get_submodule(candidate.name), BayesianLayer):
            candidate.spec, candidate.reason = owner.spec, None


def _bayesian_layer(candidate: _Candidate, assign: bool = False) -> BayesianLayer:
    layer, spec = candidate.layer, candidate.spec
    try:
        if candidate.shares:  # the posterior is the first tied layer's: its family, prior and scale
            source = next(iter(candidate.shares.values()))[0].spec
            spec = dataclasses.replace(source, estimator=spec.estimator)
        bayesian = layer_types()[type(layer)].from_torch(
            layer,
            posterior=spec.posterior,
            prior=spec.prior,
            init_scale=spec.init_scale,
            estimator=spec.estimator,
            assign=assign,
        )
    except (TypeError, ValueError) as error:  # a prior or init_scale that does not fit this layer
        raise type(error)(f"cannot convert {candidate.name or 'the model'}: {error}") from error
    _keep_settings(layer, bayesian)
    return bayesian


def _drawn_whole(layer: _Candidate) -> list[_Candidate]:
    """The parameters of a converted layer that ``forward`` reads itself, each to become a `BayesianParameter`
    with the layer's spec (weight sampling: a parameter read by other code has no input to reparameterize)."""
    assert layer.layer is not None and layer.spec is not None
    spec = dataclasses.replace(layer.spec, estimator=None)
    names = _vinn_type(layer.layer).parameter_names_of(layer.layer)
    return [
        _Candidate(_qualified(layer.name, name), "Parameter", parameter.numel(), layer.order, None, spec=spec, parameter=parameter)
        for name in names
        if (parameter := getattr(layer.layer, name, None)) is not None
    ]


def _bayesian_parameter(candidate: _Candidate) -> BayesianParameter:
    spec = candidate.spec
    try:
        return BayesianParameter(
            candidate.parameter, posterior=spec.posterior, prior=spec.prior, init_scale=spec.init_scale, estimator=spec.estimator
        )
    except (TypeError, ValueError) as error:  # a prior, init_scale or estimator that does not fit this parameter
        raise type(error)(f"cannot convert {candidate.name}: {error}") from error


def _parametrize_traced(
    graph_module: BayesianGraphModule, candidate: _Candidate, parametrization: BayesianParameter, usage: _Usage
) -> None:
    """Make the parameter ``candidate.name`` of a traced model Bayesian.

    Read by a module that the graph calls whole, it is parametrized as torch does it (a property
    of that module's class). Read by the graph alone (a get_attr node), the graph calls the
    parametrization instead: the same ``ParametrizationList`` at ``<owner>.parametrizations.<name>``,
    without a property on the owner, which is the GraphModule or one of the plain modules torch.fx
    creates to hold its attributes (both rebuilt from their attributes when copied).
    """
    owner_name, _, attribute = candidate.name.rpartition(".")
    try:
        owner = graph_module.get_submodule(owner_name)
    except AttributeError:  # a tied layer that the graph reads by another name: that name is parametrized
        return
    if _leaf_ancestor(candidate.name, usage.called) is not None:
        parametrization.parametrize(owner, attribute)
    else:
        scratch = nn.Module()
        scratch.register_parameter(attribute, owner._parameters[attribute])
        parametrization.parametrize(scratch, attribute)
        delattr(owner, attribute)
        if "parametrizations" not in owner._modules:
            owner.add_module("parametrizations", nn.Module())
        owner.parametrizations.add_module(attribute, scratch.parametrizations[attribute])
    target = _qualified(_qualified(owner_name, "parametrizations"), attribute)
    graph = graph_module.graph
    for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == candidate.name]:
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.call_module(target))
        graph.erase_node(node)


def _keep_settings(source: nn.Module, target: nn.Module) -> None:
    """What the user set on ``source`` that a conversion rebuilds: its hooks, and which of weight and
    bias are frozen (a vinn layer's posterior scale follows its loc)."""
    copy_hooks(source, target)
    bayesian = target if isinstance(target, BayesianLayer) else source
    for path, layer in bayesian.named_modules():  # the vinn layers inside it too (a MultiheadAttention's out_proj)
        if not isinstance(layer, BayesianLayer):
            continue
        inner_source, inner_target = source.get_submodule(path), target.get_submodule(path)
        for name in layer.parameter_names:
            if getattr(inner_source, name) is not None:
                frozen = not getattr(inner_source, name).requires_grad
                for parameter in (getattr(inner_target, name), getattr(inner_target, f"{name}_log_sigma2", None)):
                    if parameter is not None:
                        parameter.requires_grad_(not frozen)


def _copy_modes(model: nn.Module, bnn: nn.Module) -> None:
    """Give every module of ``bnn`` the train/eval mode of the module of the same name in ``model``,
    or of its nearest ancestor there (the containers torch.fx creates, a functional call's layer)."""
    modes = {name: module.training for name, module in model.named_modules()}
    for name, module in bnn.named_modules():
        parts = name.split(".") if name else []
        while ".".join(parts) not in modes:
            parts.pop()
        module.training = modes[".".join(parts)]


def _replace_modules(root: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Point every reference inside ``root`` to a module ``m`` at ``replacements[id(m)]``.

    All references: a module registered under several names is replaced under each.
    """
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if name and id(module) in replacements:
            setattr(root.get_submodule(_parent(name)), name.rpartition(".")[2], replacements[id(module)])


def _replace_functional_call(graph_module: torch.fx.GraphModule, candidate: _Candidate, layer: BayesianLayer) -> None:
    """Replace the functional call by a call of ``layer``, registered under the weight's name."""
    call, graph = candidate.call, graph_module.graph
    arguments = _call_arguments(call)
    reads = [arguments[name] for name in ("weight", "bias") if arguments[name] is not None]
    for read in reads:  # the parameters now live in the layer: no duplicate in state_dict
        delattr(graph_module.get_submodule(_parent(read.target)), read.target.rpartition(".")[2])
    graph_module.get_submodule(_parent(candidate.name)).add_module(candidate.name.rpartition(".")[2], layer)
    with graph.inserting_before(call):
        layer_call = graph.call_module(candidate.name, (arguments["input"],))
    call.replace_all_uses_with(layer_call)
    graph.erase_node(call)
    for read in reads:
        graph.erase_node(read)


# -- small helpers -----------------------------------------------------------------------------


def _tied_parameters(root: nn.Module) -> dict[str, list[str]]:
    """Qualified parameter name -> the other names of the same tensor in different modules (tied weights).

    A module registered under several names shares its parameters with itself only: not tied.
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)  # tensor -> (name, owner) of each holder
    for owner_name, owner in root.named_modules(remove_duplicate=False):
        for attribute, parameter in owner.named_parameters(recurse=False, remove_duplicate=False):
            holders[id(parameter)].append((_qualified(owner_name, attribute), owner))
    tied = {}
    for names in holders.values():
        for name, owner in names:
            others = [other for other, other_owner in names if other_owner is not owner]
            if others:
                tied[name] = others
    return tied


def _untieable(root: nn.Module, tied: dict[str, list[str]]) -> dict[str, list[str]]:
    """The entries of ``tied`` that cannot share one posterior: a name of the tensor is no weight or
    bias of a layer of a type vinn converts (a module reads it some other way)."""
    supported = tuple(layer_types())
    layer_parameters = {
        _qualified(name, attribute)
        for name, module in root.named_modules(remove_duplicate=False)
        if isinstance(module, supported)
        for attribute in _vinn_type(module).parameter_names_of(module)
    }
    return {name: others for name, others in tied.items() if not layer_parameters.issuperset([name, *others])}


def _leaf_ancestor(name: str, leaves: Iterable[str]) -> str | None:
    """The outermost proper ancestor of ``name`` among ``leaves`` (modules that are not traced into)."""
    parts = name.split(".")
    return next((prefix for i in range(1, len(parts)) if (prefix := ".".join(parts[:i])) in leaves), None)


def _read_parameter(value: object, parameters: dict[str, nn.Parameter]) -> nn.Parameter | None:
    """The parameter that ``value`` reads, if it is a get_attr node of one."""
    if isinstance(value, Node) and value.op == "get_attr":
        return parameters.get(value.target)
    return None


def _has_node(value: object) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _random_parameters(layer: nn.Module) -> dict[str, Tensor]:
    """The weight and bias (the parameters its vinn layer type makes random) of a Linear/Conv/... module, by attribute."""
    tensors = {name: getattr(layer, name, None) for name in _vinn_type(layer).parameter_names_of(layer)}
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def _first_line(error: Exception) -> str:
    """``"TraceError: symbolically traced variables cannot be used as inputs to control flow"``: the
    exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _numel(tensors: Iterable[Tensor]) -> int:
    """Elements of ``tensors``, counting a lazy (not yet materialised) parameter as 0."""
    return sum(t.numel() for t in tensors if not is_lazy(t))
