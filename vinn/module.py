"""`vinn.Module`, a torch.nn.Module that knows its KL, and `vinn.kl` for any module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import BayesianLayer


def kl(module: nn.Module) -> Tensor:
    """KL(q || p) of every vinn layer inside ``module`` (itself included), summed: a 0-dim tensor.

    A layer reachable by several paths (a shared layer) counts once. 0. (on the module's device)
    when there is no vinn layer.
    """
    terms = [m.kl for m in module.modules() if isinstance(m, BayesianLayer)]
    if terms:
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum()
    parameter = next(module.parameters(), None)
    return torch.zeros((), device=None if parameter is None else parameter.device)


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
