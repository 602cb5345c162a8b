"""Any parameter of any module made Bayesian by weight sampling: `BayesianParameter`, a parametrization.

``torch.nn.utils.parametrize.register_parametrization(module, "class_token", p)`` makes every read
of ``module.class_token`` return ``p(original)``, where ``original`` is the parameter as it was
(kept at ``module.parametrizations.class_token.original``). A `BayesianParameter` ``p`` returns a
reparameterized draw of the posterior whose loc is that ``original``: the pretrained value stays
where ``parametrize`` keeps it, and ``p`` holds the rest, as a vinn layer does: the posterior
scale (``weight_log_sigma2``, so `vinn.param_groups` gives it the scales' learning rate) and the
prior (buffers ``weight_prior_loc``, ``weight_prior_scale``, ...). It *is* a `vinn.BayesianLayer`
whose one random parameter, ``weight``, is that ``original``: posterior, prior, ``.kl`` and
`vinn.kl` are the layers' own code. `vinn.bayesify` builds them for the parameters a
`BayesConfig` name rule names; `vinn.to_deterministic` takes them away again.

State-dict keys are ``parametrize``'s, ``<owner>.parametrizations.<name>.original`` (the loc) and
``<owner>.parametrizations.<name>.0.weight_log_sigma2`` and so on; `vinn.Module.load_state_dict`
also takes the loc under the parameter's own key ``<owner>.<name>``, so a deterministic checkpoint
loads with ``strict=False`` (see `legacy_keys`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.distributions import Normal
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from .distributions import MatrixNormal, PosteriorFamily, check_posterior, family_name
from .layers import (
    DEFAULT_INIT_SCALE,
    BayesianLayer,
    InitScale,
    PriorArgument,
    _check_init_scale,
    _check_prior_argument,
    _default_prior,
)
from .sampling import deterministic, sampling_enabled


class BayesianParameter(BayesianLayer):
    """The posterior of one parameter, as a ``torch.nn.utils.parametrize`` parametrization.

    Every read of the parametrized attribute draws from the posterior (weight sampling: one draw
    of the whole tensor, shared by the batch; ``estimator`` is ``"sample"``); inside
    `vinn.deterministic()` it is the loc. Within ``torch.nn.utils.parametrize.cached()`` the reads
    share one draw.

    ``loc`` is the parameter to make Bayesian: its value is the posterior loc, and once `register`
    has put this parametrization on it, the loc *is* that parameter (``parametrize``'s
    ``original``). ``posterior``, ``prior``, ``init_scale`` as for any vinn layer; ``fan_in`` (for
    `FanInPrior`) counts the elements per index of the first dimension, as for a Linear's weight.
    """

    parameter_names = ("weight",)
    estimators = ("sample",)
    batched_draws = False  # drawn where the parametrized module reads it, not on a batch

    def __init__(
        self,
        loc: Tensor,
        *,
        posterior: PosteriorFamily = Normal,
        prior: PriorArgument = None,
        init_scale: InitScale = DEFAULT_INIT_SCALE,
        estimator: str | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not BayesianLayer's: there is no torch.nn layer to build
        if not isinstance(loc, Tensor) or not loc.is_floating_point():
            raise TypeError(f"loc must be a floating-point tensor (the parameter to make Bayesian), got {loc!r}")
        check_posterior(posterior)
        if posterior is MatrixNormal:
            raise ValueError("posterior=vinn.MatrixNormal needs a layer computing x Wᵀ + b; use an elementwise posterior such as Normal")
        _check_init_scale(init_scale)
        _check_prior_argument(prior, posterior)
        if estimator not in (None, "sample"):
            raise ValueError(
                f"estimator must be 'sample' (or None) for a Bayesian parameter: a parameter is drawn whole, "
                f"there is no layer input to reparameterize locally; got {estimator!r}"
            )
        self.posterior, self.init_scale, self.estimator = posterior, init_scale, "sample"
        self._prior_source = _default_prior() if prior is None else prior
        # where the loc is read: the tensor itself until `register` puts this parametrization on it,
        # then its ParametrizationList (kept out of the module tree: it is this module's parent)
        object.__setattr__(self, "_loc_source", loc)
        # frozen with its loc, as a converted layer's scale (a plain tensor loc: learnable)
        self.weight_log_sigma2 = nn.Parameter(torch.empty_like(loc), requires_grad=loc.requires_grad or not isinstance(loc, nn.Parameter))
        self._register_priors()
        self.reset_scale()

    @classmethod
    def register(cls, module: nn.Module, name: str, **options: Any) -> BayesianParameter:
        """Make ``module.<name>`` Bayesian: build the parametrization from the parameter and register it.

        ``options`` are the constructor's (``posterior``, ``prior``, ``init_scale``, ``estimator``).
        Uses ``torch.nn.utils.parametrize.register_parametrization``, which swaps ``module``'s class
        for a ``Parametrized...`` subclass and keeps the parameter at
        ``module.parametrizations.<name>.original``. Returns the parametrization.
        """
        parameter = module._parameters.get(name)
        if parameter is None:
            raise ValueError(f"{type(module).__name__} has no parameter {name!r} to make Bayesian")
        return cls(parameter, **options).parametrize(module, name)

    def parametrize(self, module: nn.Module, name: str) -> BayesianParameter:
        """Register this parametrization on ``module.<name>``, whose value becomes the posterior loc; returns self."""
        with deterministic():  # registering evaluates the parametrization once: no draw
            parametrize.register_parametrization(module, name, self)
        parametrizations = module.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)
        object.__setattr__(self, "_loc_source", parametrizations[name])
        return self

    @property
    def weight(self) -> Tensor:
        """The posterior loc: the parametrized parameter itself (``parametrizations.<name>.original``)."""
        source = self.__dict__["_loc_source"]
        return source.original if isinstance(source, ParametrizationList) else source

    @property
    def fan_in(self) -> int:
        loc = self.weight
        return loc.numel() // loc.shape[0] if loc.dim() > 0 and loc.shape[0] else 1

    def forward(self, original: Tensor) -> Tensor:
        """A reparameterized draw of the posterior with loc ``original``; ``original`` itself inside `vinn.deterministic()`."""
        if not sampling_enabled():
            return original
        return cast(Tensor, self._draw_parameter("weight"))  # its loc, `weight`, is `original`

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.weight_log_sigma2.shape)}, posterior={family_name(self.posterior)}, "
            f"prior={self.weight_prior}, estimator='sample'"
        )


def bayesian_parametrizations(module: nn.Module) -> Iterator[tuple[str, str, ParametrizationList]]:
    """``(owner, name, parametrizations)`` for every parameter inside ``module`` that a `BayesianParameter`
    parametrizes: the qualified name of the module it belongs to, its own name there, and the
    ``ParametrizationList`` holding it (at ``<owner>.parametrizations.<name>``)."""
    for qualified, child in module.named_modules():
        if isinstance(child, ParametrizationList) and any(isinstance(p, BayesianParameter) for p in child):
            container, _, name = qualified.rpartition(".")
            owner, _, attribute = container.rpartition(".")
            if attribute == "parametrizations":
                yield owner, name, child


def legacy_keys(module: nn.Module) -> dict[str, str]:
    """``{original key: parametrized key}``: where a deterministic checkpoint keeps each Bayesian
    parameter's value (``encoder.pos_embedding``), and where ``module`` keeps its posterior loc
    (``encoder.parametrizations.pos_embedding.original``)."""
    keys = {}
    for owner, name, _ in bayesian_parametrizations(module):
        prefix = f"{owner}." if owner else ""
        keys[prefix + name] = f"{prefix}parametrizations.{name}.original"
    return keys
