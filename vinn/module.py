"""`vinn.Module`, a torch.nn.Module that knows its KL and names what a mismatching checkpoint lacks,
and `vinn.kl` for any module."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import validation
from .layers import BayesianLayer
from .parametrization import legacy_keys
from .sharding import gathered


def kl(module: nn.Module) -> Tensor:
    """KL(q || p) of every vinn layer inside ``module`` (itself included), summed: a 0-dim tensor.

    A layer reachable by several paths (a shared layer) counts once, and so does a vinn layer inside
    another (a MultiheadAttention's out_proj), whose own ``.kl`` covers it, and a posterior that
    several layers share (tied weights, see `vinn.bayesify`: their ``*_log_sigma2`` parameter is one
    object), counted with the first layer holding it. A `vinn.BayesianParameter` counts as a layer;
    a `vinn.Mixture`, as the mean of its members' KLs.
    0. (on the module's device) when there is no vinn layer. TypeError for anything but a
    `torch.nn.Module`. Under FSDP2 (``fully_shard``), outside ``forward`` where the parameters are
    sharded, it is the KL of the whole model on every rank, gathered in one all-reduce (see
    `vinn.sharding`).
    """
    validation.module(module, "module")
    terms = []
    counted: set[int] = set()  # the log σ² parameters whose posterior's KL is in terms
    for m in _kl_units(module, set()):
        subtree_kl = getattr(m, "_subtree_kl", None)
        if subtree_kl is not None:  # a `vinn.Mixture`: its KL is not the sum of its members'
            terms.append(subtree_kl())
            continue
        if not isinstance(m, BayesianLayer):
            continue
        names = list(m.random_parameters())
        scales = [id(m._parameters[f"{name}_log_sigma2"]) for name in names]
        if counted.isdisjoint(scales):
            terms.append(m._parameters_kl())  # the common case: the layer's own KL, however the layer computes it
        else:
            terms += [m._kl(name) for name, scale in zip(names, scales) if scale not in counted]
        counted.update(scales)
    terms = gathered(terms)
    if terms:
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()
    parameter = next(module.parameters(), None)
    return torch.zeros((), device=None if parameter is None else parameter.device)


def _kl_units(module: nn.Module, memo: set[int]) -> Iterator[nn.Module]:
    """``module.modules()``, except that a module with a KL of its own for everything inside it
    (``_subtree_kl``) stands for its submodules."""
    if id(module) in memo:
        return
    memo.add(id(module))
    yield module
    if not hasattr(module, "_subtree_kl"):
        for child in module.children():
            yield from _kl_units(child, memo)


class Module(nn.Module):
    """A torch.nn.Module with ``.kl``, the summed KL of every vinn layer inside it.

    Write Bayesian models exactly as torch.nn models, with vinn layers where weights are random::

        class Net(vinn.Module):
            def __init__(self):
                super().__init__()
                self.fc = vinn.Linear(4, 5)
    """

    @property
    def kl(self) -> Tensor:
        """Sum of ``.kl`` over every vinn layer inside, recursively (0-dim tensor; 0. if none)."""
        return kl(self)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`torch.nn.Module.load_state_dict`; with ``strict``, a checkpoint of another architecture
        fails first with a RuntimeError naming the first mismatching key in the model's order. A
        non-finite log σ² or an invalid prior fails with a ValueError; either way before anything loads.
        A parameter made Bayesian by a `vinn.BayesianParameter` takes its loc from the parameter's own
        key (``encoder.pos_embedding``, a deterministic checkpoint's) as well as from
        ``encoder.parametrizations.pos_embedding.original``."""
        state_dict = _with_parametrized_keys(self, state_dict)
        if strict:
            _check_architecture(self, state_dict)
        for name, module in self.named_modules():
            if isinstance(module, BayesianLayer):
                module._check_state(state_dict, f"{name}." if name else "")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _with_parametrized_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` with the loc of each of ``model``'s Bayesian parameters moved to its parametrized
    key where it is given under the parameter's own key only (a deterministic checkpoint)."""
    renamed = {old: new for old, new in legacy_keys(model).items() if old in state_dict and new not in state_dict}
    if not renamed:
        return state_dict
    result: OrderedDict[str, Any] = OrderedDict((renamed.get(key, key), value) for key, value in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]  # torch keeps module versions there
    return result


def _is_bayesian_entry(key: str) -> bool:
    """A posterior scale or prior entry of a vinn layer: what a deterministic model does not have."""
    name = key.rsplit(".", 1)[-1]
    return name.endswith("_log_sigma2") or "_prior_" in name


def _check_architecture(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    resized = [
        k for k, v in expected.items()
        if isinstance(state_dict.get(k), Tensor) and state_dict[k].shape != v.shape
    ]  # fmt: skip
    if not (missing or unexpected or resized):
        return
    problems = {k: "missing from the state_dict" for k in missing}
    for k in resized:
        problems[k] = f"shape {tuple(state_dict[k].shape)} in the state_dict, {tuple(expected[k].shape)} in the model"
    first = next((k for k in expected if k in problems), None)
    if first is None:
        first, why = unexpected[0], "in the state_dict but not in the model"
    else:
        why = problems[first]
    hint = "the checkpoint was saved from a different architecture"
    if missing and all(map(_is_bayesian_entry, missing)) and not (unexpected or resized):
        hint = (
            "the state_dict has no posterior scales or priors: it comes from a deterministic model; load it into that "
            "model and call vinn.bayesify on it, or pass strict=False to keep this model's scales and priors"
        )
    elif unexpected and all(map(_is_bayesian_entry, unexpected)) and not (missing or resized):
        hint = "the state_dict holds posterior scales or priors of layers that are deterministic in this model"
    raise RuntimeError(
        f"Error loading state_dict into {type(model).__name__}: first mismatching key {first!r}: {why} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(resized)} of another shape); {hint}"
    )
