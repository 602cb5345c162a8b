"""Optimizer parameter groups in which the posterior scales learn as fast as the weights: `param_groups`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers import BayesianLayer
from .validation import module, real

# How much faster than the posterior locs the log-variances learn under `param_groups`, as a ratio
# of learning rates. Adam moves every parameter by about its learning rate per step, but a
# log-variance has several units to travel (from its initial value to where the data put it)
# while a weight travels a fraction of one. Measured on the UCI benchmark (Adam 1e-3, batch 32,
# 40 epochs; benchmarks/quality/scale_learning.py and uci.py): 3 gives the best test
# log-likelihood, above all because the likelihood's noise variance reaches its value within the
# budget; the posterior scales then cover 20% of their way (in log σ) by epoch 40. Ratios of 30
# and more converge them by epoch 40, to a mean-field posterior that underfits (whole hidden
# units back at the prior), 0.4 nats worse on Boston.
SCALE_LR_RATIO = 3.0

# The name of a log-variance parameter (vinn's ``weight_log_sigma2``, a likelihood's ``noise_log_sigma2``).
LOG_VARIANCE_SUFFIX = "log_sigma2"


def param_groups(
    model: nn.Module, lr: float, *, scale_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """``model``'s parameters as optimizer groups: the log-variances apart, at their own learning rate.

    Returns ``[{"params": every other parameter, "lr": lr, "weight_decay": weight_decay},
    {"params": every log-variance parameter, "lr": scale_lr, "weight_decay": 0.0}]`` (a group
    without parameters left out), for any torch optimizer::

        optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=1e-3))

    The scale group holds every vinn layer's posterior parameters other than its locs (the
    log-variances ``weight_log_sigma2``, ..., and a `vinn.MatrixNormal` weight's column factor
    ``weight_column_tril``) and every parameter of your own whose name ends in ``log_sigma2``, such
    as a regression likelihood's learned noise variance (``self.noise_log_sigma2``), which has as
    far to travel.

    ``scale_lr`` defaults to ``lr * vinn.SCALE_LR_RATIO``: made for Adam-like optimizers, whose step
    is about the learning rate whatever the gradient's size. The scales never take weight decay,
    which would pull every σ towards 1 (the KL term is their regularizer); ``weight_decay``
    applies to the rest, the posterior locs included.
    """
    module(model)
    for name, value in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay)):
        if value is not None or name != "scale_lr":
            real(value, name, low=0.0, accepted="a non-negative, finite float" + (" or None" if name == "scale_lr" else ""))
    posterior_scales = {
        id(parameter) for layer in model.modules() if isinstance(layer, BayesianLayer) for parameter in layer.scale_parameters().values()
    }
    scales: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():  # each parameter once, shared ones included
        is_scale = id(parameter) in posterior_scales or name.endswith(LOG_VARIANCE_SUFFIX)
        (scales if is_scale else others).append(parameter)
    groups = [
        {"params": others, "lr": lr, "weight_decay": weight_decay},
        {"params": scales, "lr": lr * SCALE_LR_RATIO if scale_lr is None else scale_lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
