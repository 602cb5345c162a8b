"""`vinn.Mixture`: a uniform mixture of Bayesian models of one task, the posterior of several fine-tunings."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import validation
from .module import Module, kl
from .prediction import _Batch, _checked, _map_outputs
from .sampling import sampling_enabled


class Mixture(Module):
    """The uniform mixture q = (q_1 + ... + q_K) / K of the posteriors of K models of one task.

    ``members``: the K ≥ 2 models (`torch.nn.Module`, typically `vinn.bayesify` of one pretrained
    model fine-tuned K times from different seeds), each taking the same inputs and giving outputs
    of the same structure (a list or an `nn.ModuleList`; one model alone is a TypeError). One
    fine-tuning finds one mode of the posterior; K of them cover several, and where they disagree
    the mixture is uncertain in a way a single Gaussian around the pretrained weights is not
    (measured on the digits benchmark, ``benchmarks/quality/digits_ood.py``).

    Every call samples the mixture as a vinn layer samples its posterior: each example (row of the
    batch-first inputs) is computed by a member drawn uniformly for it, so a batch of N rows is N
    independent draws of the mixture's predictive, at the cost of one pass. Inside
    `vinn.deterministic()` the output is the mean of the members' outputs at their posterior locs.
    `vinn.sample` and `vinn.predict` draw a member for each of the T samples instead, shared by the
    sample's N examples, and sample each member as it would be alone: every example's T outputs are
    still independent draws of the mixture's predictive, at the cost of sampling one member.

    ``.kl`` (and `vinn.kl` of any model holding the mixture) is the mean of the members' KLs, an
    upper bound of KL(q || p) (the KL is convex in q), so `vinn.ELBO` of the mixture is a lower
    bound of its evidence: training the mixture as one model trains each member on the examples
    drawn for it. Fine-tuning the members separately, each with its own `vinn.ELBO`, maximises the
    same bound, one member at a time.
    """

    def __init__(self, members: Iterable[nn.Module]) -> None:
        if (isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList)) or not isinstance(members, Iterable):
            raise validation.wrong_type("members", "an iterable of at least two torch.nn.Module", members)
        members = list(members)
        for i, member in enumerate(members):
            validation.module(member, f"members[{i}]")
        if len(members) < 2:
            raise validation.wrong_value("members", "an iterable of at least two torch.nn.Module", members)
        super().__init__()
        self.members = nn.ModuleList(members)

    def _subtree_kl(self) -> Tensor:
        """What `vinn.kl` counts for this module and everything inside it."""
        return torch.stack([kl(member) for member in self.members]).mean()

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Any:
        """Each of the N rows of the batch-first inputs computed by a member drawn uniformly for it
        (all members at their loc, averaged, inside `vinn.deterministic()`)."""
        if not (args or kwargs):
            raise TypeError(f"{type(self).__name__} takes batch-first tensors (N, ...), got no input")
        named = {f"args[{i}]": v for i, v in enumerate(args)} | dict(kwargs)
        batch = _checked(_Batch(args, kwargs), named, f"the inputs of {type(self).__name__}")
        n = batch.size
        if not sampling_enabled():
            outputs = [batch(member) for member in self.members]
            return _map_outputs(lambda leaves, path: torch.stack(leaves).mean(0), outputs)
        drawn = torch.randint(len(self.members), (n,), device=batch.tensors()[0].device)
        rows = [(member, torch.nonzero(drawn == k).squeeze(1)) for k, member in enumerate(self.members)]
        rows = [(member, r) for member, r in rows if len(r)] or rows[:1]  # a member drawn for no row is not called
        outputs = [batch.map(partial(torch.index_select, dim=0, index=r))(member) for member, r in rows]
        order = torch.cat([r for _, r in rows]).argsort()  # back to the rows' order
        return _map_outputs(lambda leaves, path: torch.cat(leaves)[order], outputs)
