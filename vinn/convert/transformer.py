"""torch.nn's transformer blocks: `vinn.bayesify` converts the layers inside them, and keeps them sampling.

torch.fx cannot trace ``nn.TransformerEncoderLayer`` and its kin (their forward branches on the
input's properties), so a traced model calls each as a whole, a leaf. Unlike
``nn.MultiheadAttention`` with its ``out_proj``, they call every submodule they hold, so the
layers inside can be replaced where they are.

But ``nn.TransformerEncoderLayer`` has a fused fast path that reads ``self_attn.in_proj_weight``,
``linear1.weight``, ... itself instead of calling its submodules, taken in eval mode when no
gradient is needed (``vinn.sample``, ``vinn.predict``, ``torch.no_grad()``): every vinn layer inside
would be skipped, its posterior loc used, and sampling silently lost. torch skips that path when a
submodule has a forward hook, so that hooks run; a forward pre-hook that does nothing,
`_call_submodules`, is the switch. ``nn.TransformerEncoder`` turns a padded batch into a nested
tensor for that path; its ``use_nested_tensor`` flag is turned off, and restored by `restore`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers import BayesianLayer

# The torch.nn modules that call every submodule they hold (outside their fast path, switched off below).
CALLS_SUBMODULES: tuple[type[nn.Module], ...] = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)

_FAST = (nn.TransformerEncoderLayer, nn.TransformerEncoder)  # those with a fast path
_USE_NESTED_TENSOR = "_vinn_use_nested_tensor"  # where keep_sampling keeps the flag it turned off


def _call_submodules(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: its presence makes ``nn.TransformerEncoderLayer`` call its submodules."""


def keep_sampling(model: nn.Module) -> None:
    """Switch off the fast paths of the transformer blocks of ``model`` that hold vinn layers."""
    for module in model.modules():
        if type(module) not in _FAST or not any(isinstance(m, BayesianLayer) for m in module.modules()):
            continue
        if type(module) is nn.TransformerEncoderLayer and _call_submodules not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_call_submodules)
        elif type(module) is nn.TransformerEncoder and module.use_nested_tensor:
            setattr(module, _USE_NESTED_TENSOR, True)
            module.use_nested_tensor = False


def restore(model: nn.Module) -> None:
    """Undo `keep_sampling` (for `vinn.to_deterministic`): the fast paths of ``model`` are torch's again."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _call_submodules:
                del module._forward_pre_hooks[key]
        if hasattr(module, _USE_NESTED_TENSOR):
            module.use_nested_tensor = getattr(module, _USE_NESTED_TENSOR)
            delattr(module, _USE_NESTED_TENSOR)
