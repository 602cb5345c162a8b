"""The evidence lower bound as a training loss, with the KL weight derived for the user."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .module import kl as total_kl

_REDUCTIONS = ("sum", "mean", "batchmean")


class ELBO:
    """Negative ELBO of a minibatch: ``nll + beta * kl(model)``, a 0-dim tensor to ``.backward()``.

    Give exactly one of:

    - ``beta``: the KL weight, used as is: ``loss = criterion(outputs, targets) + beta * model.kl``.
      With a "sum" criterion and M minibatches per epoch, ``beta = 1 / M`` (Blundell et al. 2015;
      Hoffman et al. 2013).
    - ``dataset_size``: N, the number of training examples. The weight follows from the
      criterion's reduction and the batch size B (``outputs.shape[0]``), so that the loss is an
      unbiased estimate of the negative ELBO ``(N / B) * Σ_batch nll + KL`` divided by a
      constant that keeps the criterion's own scale (and so the learning rate that suited the
      deterministic model):

      ======================  ==================================================
      reduction "sum"         ``Σ nll + (B / N) * KL``
      reduction "mean"        ``Σ nll / n + B / (N * n) * KL``, n = loss elements
      reduction "batchmean"   ``Σ nll / B + KL / N``
      ======================  ==================================================

      Here Σ nll is the sum of the criterion's unreduced loss, so class weights and ignored
      targets count as in the sum (a weighted "mean" would divide by the weights instead, which
      is not an ELBO), and n is the number of elements of the unreduced loss (B for
      classification; B·D for a D-dimensional regression target).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        *,
        beta: float | None = None,
        dataset_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(criterion):
            raise TypeError(f"criterion must be callable (outputs, targets) -> loss, got {type(criterion).__name__}")
        if (beta is None) == (dataset_size is None):
            raise ValueError("give exactly one of beta= (the KL weight) or dataset_size= (the number of training examples)")
        reduction = getattr(criterion, "reduction", None)
        if reduction == "none":
            raise ValueError("criterion has reduction='none': the ELBO needs a scalar loss; use 'sum' or 'mean'")
        if beta is not None and (isinstance(beta, bool) or not float(beta) >= 0):
            raise ValueError(f"beta must be a non-negative number, got {beta!r}")
        self._unreduced = None
        if dataset_size is not None:
            if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size <= 0:
                raise ValueError(f"dataset_size must be a positive int (the number of training examples), got {dataset_size!r}")
            if reduction not in _REDUCTIONS:
                raise TypeError(
                    f"with dataset_size=, criterion must be a torch.nn loss with reduction in {_REDUCTIONS}, "
                    f"got {type(criterion).__name__} (reduction={reduction!r}); pass beta= for other criteria"
                )
            self._unreduced = copy.copy(criterion)
            self._unreduced.reduction = "none"
        self.model, self.criterion, self.beta, self.dataset_size = model, criterion, beta, dataset_size

    def __call__(self, outputs: Tensor, targets: Tensor, *args: Any) -> Tensor:
        """Loss for one minibatch; ``args`` go to the criterion after the targets (GaussianNLLLoss's var)."""
        kl = total_kl(self.model)
        if self._unreduced is None:
            nll = self.criterion(outputs, targets, *args)
            if nll.dim() != 0:
                raise ValueError(f"criterion returned shape {tuple(nll.shape)}: the ELBO needs a 0-dim loss")
            return nll + self.beta * kl
        losses = self._unreduced(outputs, targets, *args)
        batch = outputs.shape[0]
        divisor = {"sum": 1, "mean": losses.numel(), "batchmean": batch}[self.criterion.reduction]
        return (losses.sum() + (batch / self.dataset_size) * kl) / divisor

    def __repr__(self) -> str:
        weight = f"beta={self.beta}" if self.beta is not None else f"dataset_size={self.dataset_size}"
        return f"ELBO({type(self.criterion).__name__}, {weight})"
