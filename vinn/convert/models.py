"""The two kinds of model `vinn.bayesify` returns, both `vinn.Module`s that copy, pickle and load.

- `BayesianGraphModule`: what the torch.fx pass returns, a ``torch.fx.GraphModule`` that is
  also a `vinn.Module`.
- `bayesian_subclass(UserClass)`: the class of what the module-tree fallback returns, the
  user's own class with `vinn.Module` mixed in, so the user's methods and attributes survive.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, cast

import torch.fx
from torch import nn
from torch.fx.graph_module import reduce_graph_module

from ..module import Module
from .report import ConversionReport

# Where nn.Module keeps the hooks registered on one module (forward, backward, state_dict, ...).
_HOOK_DICTS = tuple(
    name for name in vars(nn.Module()) if name.endswith("_hooks") or name.endswith("_hooks_with_kwargs")
    or name.endswith("_hooks_always_called")
)  # fmt: skip


def has_hooks(module: nn.Module) -> bool:
    return any(map(vars(module).get, _HOOK_DICTS))  # asked of every module by bayesify: no getattr


def copy_hooks(source: nn.Module, target: nn.Module, memo: dict[int, Any] | None = None) -> None:
    """Register on ``target`` every hook registered on ``source``; with ``memo``, deep copies of them
    (as ``copy.deepcopy`` of a module keeps them)."""
    for name in _HOOK_DICTS:
        hooks = getattr(source, name, None)
        if hooks:
            getattr(target, name).update(hooks if memo is None else copy.deepcopy(hooks, memo))
    if source._backward_hooks:  # full (register_full_backward_hook) or legacy hooks: a module has one kind
        target._is_full_backward_hook = source._is_full_backward_hook


class BayesianGraphModule(torch.fx.GraphModule, Module):
    """A traced model whose Linear/Conv layers are vinn layers: a GraphModule with ``.kl``.

    ``class_name`` (the input model's class name) is what ``type(bnn).__name__`` and ``repr`` show;
    ``conversion_report`` is the `ConversionReport` of the conversion that built it. Both survive
    ``copy.deepcopy`` and pickling, which for a plain GraphModule rebuild a plain GraphModule.
    """

    conversion_report: ConversionReport | None

    def __init__(
        self,
        root: nn.Module,
        graph: torch.fx.Graph,
        class_name: str = "GraphModule",
        conversion_report: ConversionReport | None = None,
    ) -> None:
        super().__init__(root, graph, class_name)
        self.conversion_report = conversion_report

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule pickles its generated code and state; unpickling re-traces the code into a
        # plain GraphModule, which _unpickle wraps again.
        _, (state, import_block) = super().__reduce__()
        return (_unpickle, (state, import_block, type(self).__name__))

    def __deepcopy__(self, memo: dict[int, Any]) -> BayesianGraphModule:
        # GraphModule's deepcopy keeps the type but resets the class name and drops plain attributes
        copied = cast(BayesianGraphModule, super().__deepcopy__(memo))
        copied.__class__.__name__ = type(self).__name__
        copied.conversion_report = copy.deepcopy(self.conversion_report, memo)
        # and keeps only the state_dict hooks of the model itself
        copy_hooks(self, copied, memo)
        return copied

    def __copy__(self) -> BayesianGraphModule:
        return BayesianGraphModule(self, self.graph, type(self).__name__, self.conversion_report)


def _unpickle(state: dict[str, Any], import_block: str, class_name: str) -> BayesianGraphModule:
    plain = reduce_graph_module(state, import_block)
    return BayesianGraphModule(plain, cast(torch.fx.Graph, plain.graph), class_name, state.get("conversion_report"))


@functools.cache
def bayesian_subclass(user_class: type[nn.Module]) -> type[nn.Module]:
    """``user_class`` with `vinn.Module` mixed in (so instances have ``.kl``), one class per user class.

    Instances pickle by reference to ``user_class`` (this dynamic class is rebuilt on loading),
    so ``torch.save`` of the whole model works whenever ``user_class`` itself is importable.
    """

    def __reduce_ex__(self: nn.Module, protocol: int) -> tuple[Any, ...]:
        return (_new_instance, (user_class,), self.__getstate__())

    return type(
        user_class.__name__,
        (user_class, Module),
        {"__reduce_ex__": __reduce_ex__, "_vinn_user_class": user_class},
    )


def _new_instance(user_class: type[nn.Module]) -> nn.Module:
    cls = bayesian_subclass(user_class)  # type: ignore[arg-type]  # a class is hashable; torch's stub says otherwise
    return cls.__new__(cls)  # pickle then restores the state, as for any object


def user_class(module: nn.Module) -> type[nn.Module] | None:
    """The user's class of an instance of `bayesian_subclass`; None for any other module."""
    return type(module).__dict__.get("_vinn_user_class")
