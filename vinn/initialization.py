"""`vinn.init_column_covariance`: a matrix-normal layer's column covariance started from the inputs it
sees, the shape a last-layer Laplace approximation gets from its curvature."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import validation
from .layers import BayesianLayer
from .sampling import deterministic

# δ / (mean eigenvalue of the inputs' second moment): on the digits benchmark's head (seeds 0-4,
# scratch runs) detection was the same at 0.001 and 0.01 and fell at 0.1 (noise AUROC 0.90 / 0.90 / 0.88)
DEFAULT_DAMPING = 0.01


@torch.no_grad()
def init_column_covariance(model: nn.Module, data: Tensor | Iterable[Any], damping: float = DEFAULT_DAMPING) -> list[str]:
    """Start the column covariance of every ``posterior=vinn.MatrixNormal`` layer of ``model`` from
    the inputs that layer sees on ``data``.

    For a layer whose inputs x (in_features,) have the second moment S = E[x xᵀ] over ``data``, the
    columns' covariance becomes V = c (S + δI)⁻¹, δ = ``damping`` · tr(S) / in_features: small
    along the directions the inputs span, large across them, as in a last-layer KFAC Laplace
    posterior, so that an input unlike the data gets a larger predictive variance (``u_i xᵀVx``).
    c keeps the mean over ``data`` of xᵀVx at that of xᵀx: on inputs like ``data`` the layer
    starts as uncertain as with V = I. Every other scale of the layer (each row's variance u_i,
    the bias's) is reset from its ``init_scale``, as `BayesianLayer.reset_scale` does. Call it
    once after building or converting the model and before training: the ELBO then trains V from
    there.

    ``data``: a batch of inputs, or an iterable of batches (a ``DataLoader``), each a tensor or a
    tuple or list whose first element is the input (an ``(x, y)`` pair); for a large training set
    a random subset of a few times ``in_features`` examples estimates S well enough. ``model``
    runs on them at its posterior means (`vinn.deterministic`), in eval mode (batch norm
    statistics untouched) and without gradients; every module's train/eval mode is restored.
    Returns the names of the layers it set. ValueError if ``model`` has no MatrixNormal layer,
    ``damping`` is not positive, or ``data`` is empty; TypeError for a batch that is no tensor.
    """
    validation.module(model)
    damping = validation.real(damping, "damping", low=0, low_open=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BayesianLayer) and m._matrix_normal}
    if not layers:
        raise ValueError("init_column_covariance: model has no layer with posterior=vinn.MatrixNormal")
    moments = {name: _SecondMoment() for name in layers}
    handles = [layer.register_forward_pre_hook(moments[name].add) for name, layer in layers.items()]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with deterministic():
            for batch in [data] if isinstance(data, Tensor) else data:
                model(_input(batch))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    for name, layer in layers.items():
        second_moment = moments[name].value(name)
        columns = len(second_moment)
        precision = second_moment.clone()
        precision.diagonal().add_(damping * second_moment.trace() / columns)
        covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        # E[xᵀVx] = tr(S V): scaled to tr(S) = E[xᵀx]
        covariance *= second_moment.trace() / (second_moment * covariance).sum()
        layer.reset_scale(column_covariance=covariance)
    return list(layers)


class _SecondMoment:
    """Σ x xᵀ and the count of the inputs a layer sees, accumulated by a forward pre-hook in float64
    on their device."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0

    def add(self, layer: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        self.sum = x.mT @ x if self.sum is None else self.sum + x.mT @ x
        self.count += len(x)

    def value(self, name: str) -> Tensor:
        if self.sum is None or self.count == 0:
            raise ValueError(f"init_column_covariance: the layer {name} saw no input on data (empty data, or a layer forward never calls)")
        return self.sum / self.count


def _input(batch: object) -> Tensor:
    """The input of a batch: the batch itself, or the first element of an ``(x, y)`` tuple or list."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, Tensor):
        raise validation.wrong_type("data", "a tensor of inputs, or an iterable of batches each a tensor or an (x, y) tuple", batch)
    return x
