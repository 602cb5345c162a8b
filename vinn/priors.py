"""Priors built from the layer they are given to: `PretrainedPrior`, `FanInPrior`, `EmpiricalBayesPrior`.

A vinn layer's ``prior=`` takes a ``torch.distributions`` instance, a mapping ``{"weight": ...,
"bias": ...}`` of them, or one of these specs. A spec builds each parameter's prior from the layer
itself (its shape, its fan-in, its current weights); `EmpiricalBayesPrior` also refits the prior's
scale to the posterior every time the layer's KL is computed. Each is a plain, picklable object,
so layers holding one save and copy whole.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor
from torch.distributions import Distribution, Normal

from .distributions import MIN_SCALE
from .validation import one_of, real, wrong_type

if TYPE_CHECKING:
    from .layers import BayesianLayer

GROUPINGS = ("layer", "unit")


class PriorSpec:
    """Base of the priors a layer builds from itself; see the module docstring.

    Subclasses implement `priors`; those whose scale is learned set ``learned = True`` and
    implement `fitted_scale`.
    """

    learned: ClassVar[bool] = False

    def priors(self, layer: BayesianLayer) -> dict[str, Distribution]:
        """The prior of each random parameter of ``layer`` (``"weight"``, ``"bias"``), by name."""
        raise NotImplementedError

    def fitted_scale(self, layer: BayesianLayer, name: str, second_moment: Tensor) -> Tensor:
        """The prior scale that maximises the ELBO given the posterior (learned priors only).

        ``second_moment``: ``E_q[(w - m)²]`` for every element of parameter ``name`` (its shape),
        ``m`` the prior's loc. Returns a tensor broadcastable to the parameter's shape.
        """
        raise NotImplementedError

    def _key(self) -> tuple[object, ...]:
        return tuple(sorted(vars(self).items()))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({arguments})"


class PretrainedPrior(PriorSpec):
    """Normal prior centred on the layer's weights as they are when the layer is built, ``N(w₀, scale²)``.

    Empirical Bayes for fine-tuning (the centre is the pretrained solution, not zero): with
    `vinn.bayesify` the centre is the pretrained weight and bias, so the KL term pulls the
    posterior towards the pretrained network. ``scale`` is the prior's standard deviation, in the
    units of the weights. Stored as buffers ``weight_prior_loc`` (the weight's shape) and
    ``weight_prior_scale`` (one number).
    """

    def __init__(self, scale: float = 0.1) -> None:
        self.scale = real(scale, "PretrainedPrior scale", low=0.0, low_open=True, accepted="a positive, finite float")

    def priors(self, layer: BayesianLayer) -> dict[str, Distribution]:
        # detached copies: the prior stays at the pretrained values while training moves the posterior
        return {name: Normal(loc.detach().clone(), self.scale) for name, loc in layer.random_parameters().items()}


class FanInPrior(PriorSpec):
    """Normal prior ``N(0, gain² / fan_in)``, the scale of the usual weight initialisations.

    ``fan_in`` is the layer's number of weights feeding each output unit (`BayesianLayer.fan_in`:
    ``in_features`` for a Linear, ``in_channels / groups * prod(kernel_size)`` for a convolution, 1
    for an embedding, which looks up one row). Unlike ``N(0, 1)``, whose scale
    is far above that of any trained weight of a wide layer, it does not let the KL term inflate the
    posterior of every weight the data say little about.
    """

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = real(gain, "FanInPrior gain", low=0.0, low_open=True, accepted="a positive, finite float")

    def priors(self, layer: BayesianLayer) -> dict[str, Distribution]:
        scale = self.gain / math.sqrt(layer.fan_in)
        return {name: Normal(0.0, scale) for name in layer.random_parameters()}


class EmpiricalBayesPrior(PriorSpec):
    """Normal prior whose scale is learned from the data: type-II maximum likelihood, in closed form.

    ``N(m, s²)`` with ``m`` zero or, with ``pretrained=True``, the layer's weights as built (the
    pretrained weights under `vinn.bayesify`). For a fixed posterior q the ELBO is largest, and the
    KL smallest, at ``s² = mean E_q[(w - m)²] = mean (σ² + (μ - m)²)`` over the weights sharing
    ``s``: every time the layer's KL is computed, ``s`` is set to that optimum first (variational
    EM with an exact M-step). The KL then no longer drags weights towards an arbitrary scale; its
    gradient with respect to q is that of the KL at the fitted prior (the prior is optimal, so its
    own change does not count). ``s`` is kept in the ``*_prior_scale`` buffers, saved in
    ``state_dict`` like every prior.

    ``per``: ``"layer"``, one scale for all the weights of a layer (of each weight matrix, in a
    recurrent layer); ``"unit"``, one per output unit (row of a Linear's weight or of a
    MultiheadAttention's projections, output channel of a convolution, gate unit of a recurrent
    layer's weight matrices). A bias, and any weight of one dimension (a normalization layer's
    scale), always shares one scale per layer (a scale per element would fit each element alone:
    no prior at all).
    The posterior family must have a finite variance (Normal, Laplace, Gumbel; not Cauchy).

    Measured caution: with a fitted scale, a layer whose weights all sit at the centre costs no KL
    at all, so where the data are few and the posterior scales still small (early in training) the
    ELBO can prefer that to fitting. On the UCI Boston benchmark (13-50-1 network, 455 examples,
    ``init_scale`` 1e-2) the network collapsed to a constant prediction; the fixed N(0, 1) prior was
    the better choice there (``benchmarks/README.md``, Quality).
    """

    learned = True

    def __init__(self, per: str = "layer", pretrained: bool = False) -> None:
        one_of(per, "per", GROUPINGS)
        if not isinstance(pretrained, bool):
            raise wrong_type("pretrained", "a bool", pretrained)
        self.per, self.pretrained = per, pretrained

    def priors(self, layer: BayesianLayer) -> dict[str, Distribution]:
        priors = {}
        for name, loc in layer.random_parameters().items():
            centre = loc.detach().clone() if self.pretrained else loc.new_zeros(())
            # the actual scale is fitted as soon as the posterior scale is set (reset_scale)
            priors[name] = Normal(centre, loc.new_ones(self._scale_shape(layer, name)))
        return priors

    def _scale_shape(self, layer: BayesianLayer, name: str) -> tuple[int, ...]:
        loc = getattr(layer, name)
        if self.per == "layer" or loc.dim() < 2:  # a bias, a normalization layer's scale
            return ()
        return tuple(n if d == layer.output_dim else 1 for d, n in enumerate(loc.shape))

    def fitted_scale(self, layer: BayesianLayer, name: str, second_moment: Tensor) -> Tensor:
        shape = self._scale_shape(layer, name)
        if shape == ():
            variance = second_moment.mean()
        else:
            others = [d for d in range(second_moment.dim()) if d != layer.output_dim]
            variance = second_moment.mean(dim=others, keepdim=True)
        return variance.sqrt().clamp_min(MIN_SCALE)
