"""The evidence lower bound as a training loss, with the KL weight derived for the user."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

from .layers import BayesianLayer
from .module import kl as total_kl
from .validation import integer, module, real, wrong_type

_REDUCTIONS = ("sum", "mean", "batchmean")


class ELBO:
    """Negative ELBO of a minibatch: ``nll + beta * kl(model)``, a 0-dim tensor to ``.backward()``.

    ``model`` must contain at least one vinn layer (ValueError otherwise: a model without one has
    a KL of 0 forever, so the loss would silently be the criterion alone). ``criterion`` is a loss
    instance or function, not a class. Give exactly one of:

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
      classification; B·D for a D-dimensional regression target). A batch larger than N raises
      ValueError: it is the sign of ``dataset_size=len(loader)``, the number of batches.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        *,
        beta: float | None = None,
        dataset_size: int | None = None,
    ) -> None:
        module(model)
        if isinstance(criterion, type):
            raise wrong_type("criterion", "a loss function or loss module instance", criterion,
                             f"pass an instance, {criterion.__name__}(...), not the class")
        if not callable(criterion):
            raise wrong_type("criterion", "callable as criterion(outputs, targets) -> loss", criterion)
        if (beta is None) == (dataset_size is None):
            raise ValueError("give exactly one of beta= (the KL weight) or dataset_size= (the number of training examples)")
        reduction: Any = getattr(criterion, "reduction", None)
        if reduction == "none":
            raise ValueError("criterion has reduction='none': the ELBO needs a scalar loss; use 'sum' or 'mean'")
        if beta is not None:
            beta = real(beta, "beta", low=0, accepted="a non-negative finite real number (the KL weight)")
        if dataset_size is not None:
            dataset_size = integer(dataset_size, "dataset_size", what="the number of training examples, len(loader.dataset)")
            if reduction not in _REDUCTIONS:
                raise TypeError(
                    f"with dataset_size=, criterion must be a torch.nn loss with reduction in {_REDUCTIONS}, "
                    f"got {type(criterion).__name__} (reduction={reduction!r}); pass beta= for other criteria"
                )
        if not any(isinstance(m, BayesianLayer) for m in model.modules()):
            # its KL is 0 whatever happens: the loss would silently be the criterion alone
            raise ValueError(
                f"model ({type(model).__name__}) must contain a vinn layer, got one without any: its KL is 0 and the "
                "ELBO would be the criterion alone; convert it with vinn.bayesify(model) or build it from vinn layers "
                "(for a deterministic model, use the criterion itself)"
            )
        self._reduction = reduction
        self._unreduced: Any = None  # the criterion with reduction="none", for dataset_size=
        if dataset_size is not None:
            self._unreduced = copy.copy(criterion)
            self._unreduced.reduction = "none"
        self.model, self.criterion, self.beta, self.dataset_size = model, criterion, beta, dataset_size

    def __call__(self, outputs: Tensor, targets: Tensor, *args: Any) -> Tensor:
        """Loss for one minibatch; ``args`` go to the criterion after the targets (GaussianNLLLoss's var)."""
        kl = total_kl(self.model)
        if self.beta is not None:
            nll = self.criterion(outputs, targets, *args)
            if not isinstance(nll, Tensor):
                raise wrong_type("criterion's result", "a 0-dim tensor (the loss)", nll)
            if nll.dim() != 0:
                raise ValueError(f"criterion returned shape {tuple(nll.shape)}: the ELBO needs a 0-dim loss")
            return nll + self.beta * kl
        if not isinstance(outputs, Tensor) or outputs.dim() == 0:
            raise wrong_type("outputs", "a batch-first torch.Tensor (B, ...) with dataset_size=", outputs)
        batch, dataset_size = outputs.shape[0], cast(int, self.dataset_size)  # given, as beta is not
        if batch > dataset_size:
            raise ValueError(
                f"dataset_size must be at least the batch size, got dataset_size={self.dataset_size} for a batch of "
                f"{batch}: it is the number of training examples, len(loader.dataset), not the number of "
                "batches len(loader)"
            )
        losses = self._unreduced(outputs, targets, *args)
        divisor = {"sum": 1, "mean": losses.numel(), "batchmean": batch}[self._reduction]
        return (losses.sum() + (batch / dataset_size) * kl) / divisor

    def __repr__(self) -> str:
        weight = f"beta={self.beta}" if self.beta is not None else f"dataset_size={self.dataset_size}"
        return f"ELBO({type(self.criterion).__name__}, {weight})"
