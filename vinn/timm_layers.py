"""timm's own layer types as vinn layers, registered with `vinn.register_layer`.

Imported by `vinn.layer_types` once the user has imported timm (vinn itself never does). timm
subclasses torch.nn layers, which `vinn.bayesify` keeps as they are unless registered (a subclass
may compute something else): ``timm.layers.Linear`` (the classifier of MobileNetV3 and others: an
``nn.Linear`` that casts its weights for TorchScript) becomes `Linear`, and
``timm.layers.Conv2dSame`` (TensorFlow's "SAME" padding, computed from the input: the ``tf_``
models) becomes `Conv2dSame`. Weight-standardized convolutions (``StdConv2d``) are not linear in
their weight, which local reparameterization needs: they stay deterministic, and the report says so.
"""

from __future__ import annotations

from typing import cast

import torch.nn.functional as F
from timm.layers import Conv2dSame as _Conv2dSame
from timm.layers import Linear as _Linear
from timm.layers.conv2d_same import conv2d_same
from torch import Tensor

from .layers import BayesianLayer, register_layer


@register_layer
class Linear(BayesianLayer, _Linear):
    """Bayesian ``timm.layers.Linear``: ``y = x Wᵀ + b``, as `vinn.Linear`."""

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)


@register_layer
class Conv2dSame(BayesianLayer, _Conv2dSame):  # type: ignore[misc]  # forward: BayesianLayer's, which samples
    """Bayesian ``timm.layers.Conv2dSame``: the input padded as TensorFlow's "SAME" does, then a
    convolution. Padding with zeros and then squaring equals padding the square: the local
    reparameterization trick stays exact."""

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        pair = tuple[int, int]  # timm's annotations; nn.Conv2d's attributes are such pairs (padding 0: SAME pads the input)
        stride, padding, dilation = cast(pair, self.stride), cast(pair, self.padding), cast(pair, self.dilation)
        return conv2d_same(input, weight, bias, stride, padding, dilation, self.groups)
