"""Hugging Face transformers' own layer types as vinn layers, registered with `vinn.register_layer`.

Imported by `vinn.layer_types` once the user has imported transformers (vinn itself never does):
``transformers.pytorch_utils.Conv1D``, the linear layer of the GPT-2 family, becomes `Conv1D`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D as _Conv1D

from .layers import BayesianLayer, register_layer


@register_layer
class Conv1D(BayesianLayer, _Conv1D):
    """Bayesian ``transformers.pytorch_utils.Conv1D``: ``y = x W + b``, a Linear with its weight stored
    transposed, ``W`` of shape (nx, nf) (input features, output features).

    The weight keeps that layout, so Hugging Face checkpoints load as they are (``strict=False``
    for the posterior scales and priors). Input (*, nx), output (*, nf). Arguments as transformers'
    (``nf``, ``nx``), plus ``posterior``, ``prior``, ``init_scale``, ``estimator``.
    """

    output_dim = 1

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        flat = torch.addmm(bias, input.reshape(-1, input.shape[-1]), weight)
        return flat.view(*input.shape[:-1], self.nf)
