"""Bayesian affine parameters of the normalization layers: LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d.

Each normalizes its input exactly as its torch.nn layer does, then scales and shifts it by weights
drawn from the posterior. The affine map is linear in the normalized input x̂ and in the weights,
so local reparameterization is exact: the output is Normal with mean ``x̂ γ + β`` and variance
``x̂² σ_γ² + σ_β²``, fresh noise for every element of every example. `vinn.bayesify` converts them
only where the config asks for it (``converted_by_default = False``): the weight matrices are
what most of a model's uncertainty is about, and the normalization parameters are few.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BayesianLayer, register_layer


class _Normalization(BayesianLayer):
    # flipout's sign flips cancel on an elementwise map: it would be weight sampling at twice the cost
    estimators = ("lrt", "sample")
    converted_by_default = False

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        # input: the normalized input x̂; the parameters scale and shift the channel dimension 1
        # (batch and group norm) or the last dimensions (layer and RMS norm)
        shape = self._parameter_shape(input)
        output = input * weight.reshape(shape)
        return output if bias is None else output + bias.reshape(shape)

    def _parameter_shape(self, input: Tensor) -> tuple[int, ...]:
        return tuple(self.weight.shape)


class _ChannelNormalization(_Normalization):
    def _parameter_shape(self, input: Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (input.dim() - 2)


@register_layer
class LayerNorm(_Normalization, nn.LayerNorm):
    """Bayesian `torch.nn.LayerNorm`: the elementwise affine weight and bias drawn from the posterior."""

    def _linear_input(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, None, None, self.eps)


@register_layer
class RMSNorm(_Normalization, nn.RMSNorm):
    """Bayesian `torch.nn.RMSNorm`: the elementwise scale drawn from the posterior."""

    parameter_names = ("weight",)

    def _linear_input(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, None, self.eps)


@register_layer
class GroupNorm(_ChannelNormalization, nn.GroupNorm):
    """Bayesian `torch.nn.GroupNorm`: the per-channel scale and shift drawn from the posterior."""

    def _linear_input(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, None, None, self.eps)


class _BatchNorm(_ChannelNormalization):
    def _linear_input(self, input: Tensor) -> Tensor:
        # torch.nn's batch norm without its affine part: the same statistics, the same buffer updates
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            None,
            None,
            batch_statistics,
            factor,
            self.eps,
        )


@register_layer
class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Bayesian `torch.nn.BatchNorm1d`: the per-channel scale and shift drawn from the posterior."""


@register_layer
class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Bayesian `torch.nn.BatchNorm2d`: the per-channel scale and shift drawn from the posterior."""


@register_layer
class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Bayesian `torch.nn.BatchNorm3d`: the per-channel scale and shift drawn from the posterior."""
