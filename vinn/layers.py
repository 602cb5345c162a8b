"""Bayesian drop-in replacements for torch.nn.Linear, ConvNd and ConvTransposeNd.

Each vinn layer *is* its torch.nn counterpart (``isinstance(vinn.Conv2d(...), nn.Conv2d)``), built
by the same constructor, whose ``weight`` and ``bias`` parameters hold the posterior **loc**. The
one base class `BayesianLayer` adds an unconstrained parameter per element for the posterior
scale σ, ``weight_log_sigma2`` and ``bias_log_sigma2`` (log σ², bounded when used), the prior (as
buffers), sampling and the KL.
The concrete layers only say which functional op they compute.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from .distributions import (
    LOW_PRECISION,
    MAX_SCALE,
    MIN_SCALE,
    MatrixNormal,
    PosteriorFamily,
    broadcasts_to,
    check_arguments,
    check_posterior,
    check_prior,
    family_name,
    has_finite_variance,
    is_gaussian,
    is_normal,
    is_symmetric,
    kl_sum,
    normal_draw,
    normal_kl,
    sigma2,
    tensor_leaves,
    with_leaves,
)
from .priors import PriorSpec
from .sampling import sampling_enabled, weight_draws_of
from .sharding import full_tensor, gathered, replicated_like
from .validation import one_of, real, wrong_type, wrong_value

# Default initial posterior scale of a freshly built layer: small against torch's default loc
# initialisation (uniform with bound 1/sqrt(fan_in)), so a new network starts near a
# deterministic one and the KL term grows the scale where the data allow.
DEFAULT_INIT_SCALE = 1e-2

InitScale = float | Callable[[Tensor], Tensor]
PriorArgument = Distribution | Mapping[str, Distribution] | PriorSpec | None
ESTIMATORS = ("lrt", "sample", "flipout")


# Set by from_torch while it builds a layer whose parameters it then overwrites.
_skip_initialisation: contextvars.ContextVar[bool] = contextvars.ContextVar("vinn_skip_initialisation", default=False)


def _default_prior() -> Distribution:
    return Normal(0.0, 1.0)


# torch layer type -> the vinn layer type `vinn.bayesify` turns it into: the one list of what is
# supported, filled by `register_layer` (every built-in layer below, and a user's own).
_REGISTRY: dict[type[nn.Module], type[BayesianLayer]] = {}


class BayesianLayer(nn.Module):
    """Base of every vinn layer: posterior, prior, sampling and KL for its random parameters.

    Subclasses inherit a torch.nn layer as their second base and implement `_op`, the
    deterministic computation ``op(input, weight, bias)``, which must be linear in ``input`` and in
    ``weight``: the local reparameterization trick relies on it. They declare what is particular
    to them as class attributes: ``parameter_names`` (the random parameters, each a posterior loc
    of the torch.nn layer) and ``output_dim`` (the dimension of ``weight`` indexing output units).
    A layer whose parameter names depend on its configuration (`vinn.LSTM`: one set per layer and
    direction) makes ``parameter_names`` a property of the instance and overrides
    `parameter_names_of`, which gives them for its torch layer too. ``estimators`` lists the
    estimators its op allows, the default for a posterior being the first that suits it.
    ``batched_draws`` says whether the base's forward computes the layer, and so can evaluate a
    batch folded from T samples with one weight draw per sample (`vinn.sample`).
    """

    _torch_cls: ClassVar[type[nn.Module]]
    # the torch layer's constructor signature: read from its __init__ unless declared (torch's
    # recurrent layers hide theirs behind typing overloads)
    _torch_signature: ClassVar[inspect.Signature]
    parameter_names: ClassVar[tuple[str, ...]] = ("weight", "bias")
    output_dim: ClassVar[int] = 0
    estimators: ClassVar[tuple[str, ...]] = ESTIMATORS  # flipout needs an op linear in its input
    converted_by_default: ClassVar[bool] = True  # False: bayesify converts it only where the config names it
    # True: ``posterior=vinn.MatrixNormal`` works, as ``op(x, W, b)`` is ``x Wᵀ + b`` for one
    # (out, in) matrix W (an F.linear), the form its local reparameterization needs
    matrix_normal: ClassVar[bool] = False
    # False for a type with a forward of its own, which `weight_draws` would not reach
    batched_draws: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the layer it is a Bayesian version of: its first base that is a module but no vinn layer
        torch_bases = [
            b for b in cls.__mro__[1:] if issubclass(b, nn.Module) and not issubclass(b, BayesianLayer) and b is not nn.Module
        ]
        if torch_bases:
            cls._torch_cls = torch_bases[0]
            if not hasattr(cls, "_torch_signature"):  # declared by the class, or a vinn base of it
                cls._torch_signature = inspect.signature(cls._torch_cls.__init__)
            signature = cls._torch_signature
            params = [p for p in signature.parameters.values() if p.name != "self"]
            extra = [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                for name, default in (
                    ("posterior", Normal),
                    ("prior", _default_prior()),
                    ("init_scale", DEFAULT_INIT_SCALE),
                    ("estimator", None),
                )
            ]
            positional = [p for p in params if p.name not in ("device", "dtype")]
            factory = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.name in ("device", "dtype")]
            cls.__signature__ = signature.replace(parameters=positional + extra + factory)

    def __new__(cls, *args: Any, **kwargs: Any) -> BayesianLayer:
        # torch.nn's device and dtype (and vinn's own arguments) are keyword-only here: a posterior
        # passed positionally would otherwise reach torch as a device, with an obscure error
        signature = getattr(cls, "__signature__", None)  # set for every layer with a torch.nn base
        positional = [] if signature is None else [
            p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        if signature is not None and len(args) > len(positional):
            raise TypeError(
                f"{cls.__name__} takes at most {len(positional)} positional arguments ({', '.join(positional)}), got "
                f"{len(args)}: pass posterior=, prior=, init_scale=, estimator=, device= and dtype= by keyword"
            )
        return super().__new__(cls)

    def __init__(
        self,
        *args: Any,
        posterior: PosteriorFamily = Normal,
        prior: PriorArgument = None,
        init_scale: InitScale = DEFAULT_INIT_SCALE,
        estimator: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._torch_cls.__init__(self, *args, **kwargs)
        check_posterior(posterior)
        if posterior is MatrixNormal and not self.matrix_normal:
            raise ValueError(
                f"posterior=vinn.MatrixNormal needs a layer computing x Wᵀ + b (vinn.Linear); {type(self).__name__} does not: "
                "use an elementwise posterior such as Normal for it"
            )
        _check_init_scale(init_scale)
        _check_prior_argument(prior, posterior)
        self.posterior = posterior
        self.init_scale = init_scale
        self.estimator = _check_estimator(estimator, posterior, self.estimators)
        if self.estimator not in self.estimators:
            raise ValueError(f"estimator must be one of {self.estimators} for a {type(self).__name__}, got {self.estimator!r}")
        self._prior_source = _default_prior() if prior is None else prior
        if not self.random_parameters():
            raise ValueError(f"this {type(self).__name__} has no {' or '.join(self.parameter_names)} to make Bayesian")
        for name in self.parameter_names:
            loc = getattr(self, name)
            log_sigma2 = None if loc is None else nn.Parameter(torch.empty_like(loc))
            if name == "weight" and self._matrix_normal:
                # weight ~ MN(loc, diag(u), V), V = L diag(c) Lᵀ with L unit lower triangular: log u per
                # row here (out, 1), log c in weight_column_log_sigma2 (in,), L's strictly lower part
                # in weight_column_tril (in, in)
                out_features, in_features = loc.shape
                log_sigma2 = nn.Parameter(loc.new_empty(out_features, 1))
                self.weight_column_log_sigma2 = nn.Parameter(loc.new_empty(in_features))
                self.weight_column_tril = nn.Parameter(loc.new_empty(in_features, in_features))
            self.register_parameter(f"{name}_log_sigma2", log_sigma2)
        if not _skip_initialisation.get():
            self._register_priors()
            self.reset_scale()

    @property
    def _matrix_normal(self) -> bool:
        return self.posterior is MatrixNormal

    @property
    def _elementwise_family(self) -> PosteriorFamily:
        """The posterior family of the parameters without a matrix posterior (a MatrixNormal layer's bias: Normal)."""
        return Normal if self._matrix_normal else self.posterior

    @property
    def fan_in(self) -> int:
        """How many weights feed each output unit: the weight's elements per index of ``output_dim``."""
        return self.weight.numel() // self.weight.shape[self.output_dim]

    @classmethod
    def parameter_names_of(cls, module: nn.Module) -> tuple[str, ...]:
        """The names of the random parameters of ``module``, a layer of this type or its torch layer
        (which `vinn.bayesify` converts): ``parameter_names``, the same for every layer of most types."""
        return cls.parameter_names

    def random_parameters(self) -> dict[str, Tensor]:
        """The posterior loc of every random parameter the layer has (``bias=False``: no ``"bias"``), by name."""
        # no `:=` in a comprehension: torch.compile cannot trace it
        locs = {name: getattr(self, name) for name in self.parameter_names}
        return {name: loc for name, loc in locs.items() if loc is not None}

    def scale_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters of the posterior other than its locs, by name: every ``<name>_log_sigma2``,
        and a `MatrixNormal` weight's ``weight_column_log_sigma2`` and ``weight_column_tril``."""
        names = [f"{name}_log_sigma2" for name in self.random_parameters()]
        if self._matrix_normal:
            names += ["weight_column_log_sigma2", "weight_column_tril"]
        return {name: self._parameters[name] for name in names}

    # -- the prior, kept as buffers -----------------------------------------------------------------

    def _register_priors(self) -> None:
        """(Re)build the prior buffers from the ``prior`` the layer was given, for the current loc.

        Each tensor of the prior becomes a buffer, stored compactly: a scalar broadcast to every
        element is kept as one number (``Normal(w, 0.1)`` holds a scale expanded to ``w``'s shape).
        """
        templates = {}
        for name, prior in _split_prior(self._prior_source, self).items():
            loc = getattr(self, name)
            leaves = tensor_leaves(prior)
            for path, tensor in leaves.items():
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype=loc.dtype)
                # clone: the buffer must never alias the caller's tensor (load_state_dict writes in place)
                self.register_buffer(self._prior_buffer(name, path), _compact(tensor.detach()).to(loc.device).clone())
            # the distribution without its tensors (they live in buffers), and their shapes by path
            templates[name] = (with_leaves(prior, dict.fromkeys(leaves)), {path: t.shape for path, t in leaves.items()})
        self._prior_templates: dict[str, tuple[Distribution, dict[str, torch.Size]]] = templates

    @staticmethod
    def _prior_buffer(name: str, path: str) -> str:
        return f"{name}_prior_{path.replace('.', '_')}"

    def _prior(self, name: str, dtype: torch.dtype | None = None) -> Distribution | None:
        if name not in self._prior_templates:
            return None
        template, shapes = self._prior_templates[name]
        loc = getattr(self, name)  # a DTensor under FSDP2: the buffers then join it as replicated DTensors
        leaves = {
            path: replicated_like(loc, _cast(getattr(self, self._prior_buffer(name, path)), dtype).expand(shape))
            for path, shape in shapes.items()
        }
        return with_leaves(template, leaves)

    def _fit_prior(self, name: str) -> None:
        """Set a learned prior's scale to its optimum for the current posterior (see `EmpiricalBayesPrior`)."""
        source = self._prior_source
        if not (isinstance(source, PriorSpec) and source.learned):
            return
        with torch.no_grad():
            loc = getattr(self, name)  # a parameter of the layer, or a BayesianParameter's original
            prior_loc = replicated_like(loc, self._buffers[f"{name}_prior_loc"])
            if is_gaussian(self.posterior):
                second_moment = self._sigma2(name) + (loc - prior_loc).square()
            else:
                posterior = self._posterior(name)
                second_moment = posterior.variance + (posterior.mean - prior_loc).square()
            scale = self._buffers[f"{name}_prior_scale"]  # compact: one number where the group is the layer
            scale.copy_(full_tensor(source.fitted_scale(self, name, second_moment)).reshape(scale.shape))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_state(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Raise ValueError if ``state_dict`` holds, for this layer, a non-finite posterior scale parameter or an invalid prior."""
        for key in self.scale_parameters():
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and not bool(value.isfinite().all()):
                raise ValueError(f"state_dict entry {prefix}{key} holds NaN or infinite values")
        for name in self.random_parameters():
            template, shapes = self._prior_templates[name]
            leaves = {}
            for path, shape in shapes.items():
                value = state_dict.get(prefix + self._prior_buffer(name, path))
                if not (isinstance(value, Tensor) and broadcasts_to(value.shape, shape)):
                    break  # missing or misshapen: torch's own check reports it
                leaves[path] = value.expand(shape)
            else:
                check_arguments(with_leaves(template, leaves), f"state_dict prior of {prefix}{name}")

    # -- initialisation -------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Re-initialise loc as torch.nn does, then the prior (from the layer's ``prior``) and the posterior scale."""
        if _skip_initialisation.get():
            return
        super().reset_parameters()  # the torch.nn layer's loc initialisation
        if f"{self.parameter_names[0]}_log_sigma2" in self._parameters:  # torch.nn's __init__ calls this before it exists
            self._register_priors()
            self.reset_scale()

    @torch.no_grad()
    def reset_scale(self, init_scale: InitScale | None = None, column_covariance: Tensor | None = None) -> None:
        """Set the posterior scale of every element from ``init_scale`` (default: the layer's own).

        ``init_scale`` is a positive float (the same scale everywhere) or a callable mapping a loc
        tensor to a positive scale tensor of its shape, such as `vinn.RelativeScale`. A
        `MatrixNormal` weight takes each row's mean variance from it, and its columns' covariance
        V from ``column_covariance`` (in_features, in_features), symmetric positive definite
        (default: the identity; `vinn.init_column_covariance` computes one from data). Nothing
        changes if it fails. A learned prior is then refitted to the new posterior.
        """
        if init_scale is None:
            init_scale = self.init_scale
        _check_init_scale(init_scale)
        column_factor = None if column_covariance is None else self._column_factor(column_covariance)
        log_sigma2 = {name: _initial_log_sigma2(init_scale, name, loc) for name, loc in self.random_parameters().items()}
        self.init_scale = init_scale
        if self._matrix_normal:
            # each row's mean variance (a constant's is itself)
            if isinstance(log_sigma2["weight"], Tensor):
                log_sigma2["weight"] = log_sigma2["weight"].logsumexp(1, keepdim=True) - math.log(self.weight.shape[1])
            if column_factor is None:
                self.weight_column_log_sigma2.zero_()
                self.weight_column_tril.zero_()
            else:  # V = L diag(c) Lᵀ with L unit lower triangular, from V's Cholesky factor
                diagonal = column_factor.diagonal()
                self.weight_column_log_sigma2.copy_(diagonal.square().log())
                self.weight_column_tril.copy_((column_factor / diagonal).tril(-1))
        for name, value in log_sigma2.items():
            parameter = getattr(self, f"{name}_log_sigma2")
            if isinstance(value, float):
                parameter.fill_(value)
            else:
                parameter.copy_(value)
        for name in log_sigma2:
            self._fit_prior(name)

    # -- the posterior and the prior as distributions ---------------------------------------------

    def _sigma2(self, name: str) -> Tensor | None:
        """The posterior variance of every element of the parameter ``name`` (marginal, for a matrix posterior)."""
        if name == "weight" and self._matrix_normal:
            return self._posterior("weight").variance
        log_sigma2 = getattr(self, f"{name}_log_sigma2")
        return None if log_sigma2 is None else sigma2(log_sigma2)

    def _column_factor(self, column_covariance: Tensor) -> Tensor:
        """The lower Cholesky factor of ``column_covariance``, checked, in the weight's dtype."""
        columns = self.weight.shape[-1]
        if not self._matrix_normal:
            raise ValueError(f"column_covariance is for a layer with posterior=vinn.MatrixNormal; this one's is {family_name(self.posterior)}")
        accepted = f"a ({columns}, {columns}) tensor (in_features x in_features)"
        if not isinstance(column_covariance, Tensor):
            raise wrong_type("column_covariance", accepted, column_covariance)
        if column_covariance.shape != (columns, columns):
            raise wrong_value("column_covariance", accepted, column_covariance)
        covariance = column_covariance.detach().to(torch.float64)
        factor, info = torch.linalg.cholesky_ex(covariance)
        if int(info) != 0 or not bool(covariance.isfinite().all()) or not torch.allclose(covariance, covariance.mT):
            raise ValueError("column_covariance must be symmetric positive definite (finite, with a Cholesky factor)")
        return factor.to(device=self.weight.device, dtype=self.weight.dtype)

    def _column_scale_tril(self) -> Tensor:
        """A MatrixNormal weight's L diag(c)^½: the lower Cholesky factor of its columns' covariance V."""
        strictly_lower = torch.tril(self.weight_column_tril, -1)
        unit_tril = strictly_lower + torch.eye(len(strictly_lower), dtype=strictly_lower.dtype, device=strictly_lower.device)
        return unit_tril * sigma2(self.weight_column_log_sigma2).sqrt()

    def _scale(self, name: str) -> Tensor | None:
        variance = self._sigma2(name)
        return None if variance is None else variance.sqrt()

    @property
    def weight_scale(self) -> Tensor:
        """Posterior scale of the weight, same shape as ``weight``."""
        return self._scale("weight")

    @property
    def bias_scale(self) -> Tensor | None:
        """Posterior scale of the bias, or None without bias."""
        return self._scale("bias")

    def _posterior(self, name: str, dtype: torch.dtype | None = None) -> Distribution | None:
        loc = getattr(self, name)
        if loc is None:
            return None
        if name == "weight" and self._matrix_normal:
            row_scale = sigma2(self.weight_log_sigma2).sqrt().squeeze(1)
            return MatrixNormal(_cast(loc, dtype), _cast(row_scale, dtype), _cast(self._column_scale_tril(), dtype), validate_args=False)
        return self._elementwise_family(loc=_cast(loc, dtype), scale=_cast(self._scale(name), dtype), validate_args=False)

    @property
    def weight_posterior(self) -> Distribution:
        """q(weight): the posterior family with batch shape ``weight.shape`` (a `MatrixNormal`: event
        shape ``weight.shape``), differentiable in its parameters."""
        return self._posterior("weight")

    @property
    def bias_posterior(self) -> Distribution | None:
        """q(bias), or None without bias."""
        return self._posterior("bias")

    @property
    def weight_prior(self) -> Distribution:
        """p(weight), built from the prior buffers (so it follows ``.to()`` and ``load_state_dict``)."""
        return self._prior("weight")

    @property
    def bias_prior(self) -> Distribution | None:
        """p(bias), or None without bias."""
        return self._prior("bias")

    def _kl(self, name: str) -> Tensor:
        self._fit_prior(name)
        if is_normal(self.posterior) and type(self._prior_templates[name][0]) is Normal:
            # the default case, straight from the parameters and buffers: no distribution objects
            loc, buffers = getattr(self, name), self._buffers  # the loc: a parameter of the layer, or a BayesianParameter's original
            return normal_kl(
                loc,
                self._parameters[f"{name}_log_sigma2"],
                replicated_like(loc, buffers[f"{name}_prior_loc"]),
                replicated_like(loc, buffers[f"{name}_prior_scale"]),
            )
        # a KL sums over every element: in float32 for 16-bit parameters, as normal_kl does
        dtype = torch.float32 if getattr(self, name).dtype in LOW_PRECISION else None
        return kl_sum(self._posterior(name, dtype), self._prior(name, dtype))

    def _parameters_kl(self) -> Tensor:
        """KL(q || p) summed over the layer's own random parameters, not those of the vinn layers inside it;
        where FSDP2 shards the parameters, this rank's partial sum as a DTensor (`vinn.sharding.gathered`
        adds the layers' and gathers them once)."""
        terms = [self._kl(name) for name in self.random_parameters()]
        return sum(terms[1:], terms[0])

    @property
    def kl(self) -> Tensor:
        """KL(q || p) summed over every weight and bias element, those of the vinn layers inside this one
        included (a MultiheadAttention's out_proj): a differentiable 0-dim tensor (nats).

        Under FSDP2, with the parameters sharded, it is the KL of the whole layer on every rank
        (see `vinn.sharding`)."""
        terms = gathered(m._parameters_kl() for m in self.modules() if isinstance(m, BayesianLayer))
        return sum(terms[1:], terms[0])

    @property
    def per_example_noise(self) -> bool:
        """Whether one forward pass draws independent noise for every example of the batch."""
        return self.estimator == "lrt"

    @property
    def _spatial_dims(self) -> int:
        return len(getattr(self, "kernel_size", ()))

    # -- forward -----------------------------------------------------------------------------------

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """One sample of the layer's output; the posterior loc inside `vinn.deterministic()`.

        By ``self.estimator``:

        - ``"lrt"`` (local reparameterization, Normal posterior): the output is Normal with mean
          ``op(x, loc_w, loc_b)`` and variance ``op(x², σ_w², σ_b²)``, drawn with fresh noise for
          every output element, hence independent across the examples of a batch. Two passes of
          ``op``, the lowest gradient variance.
        - ``"sample"``: one reparameterized draw of weight and bias, shared by the batch. One
          pass, the highest gradient variance.
        - ``"flipout"`` (Wen et al. 2018, symmetric posteriors): one draw of the perturbation
          ``Δw = w - loc``, decorrelated across examples by random signs on the input and output
          features. Two passes.

        Whatever the estimator, inside `vinn.sampling.weight_draws` naming this layer (as
        `vinn.sample` sets it) the input is a batch folded from T samples, and each sample's rows
        get a weight draw of their own (`_forward_weight_draws`).
        """
        input = self._linear_input(input)
        locs = [getattr(self, name) for name in self.parameter_names]
        if not sampling_enabled():
            return self._op(input, *locs, *args, **kwargs)
        samples = weight_draws_of(self)
        if samples:
            return self._forward_weight_draws(input, samples, *args, **kwargs)
        if self.estimator == "lrt":
            return normal_sample(self._op(input, *locs, *args, **kwargs), self._variance(input, *args, **kwargs))
        if self.estimator == "flipout":
            mean = self._op(input, *locs, *args, **kwargs)
            deltas = [self._perturbation(name) for name in self.parameter_names]
            flipped = self._op(input * self._random_signs(input), *deltas, *args, **kwargs)
            return torch.addcmul(mean, flipped, self._random_signs(mean))
        return self._op(input, *(self._draw_parameter(name) for name in self.parameter_names), *args, **kwargs)

    def _draw_parameter(self, name: str) -> Tensor | None:
        """A reparameterized draw of the parameter ``name`` (None for an absent bias)."""
        if is_normal(self.posterior) and getattr(self, name) is not None:
            return normal_draw(getattr(self, name), getattr(self, f"{name}_log_sigma2"))  # the common case, fused
        return draw(self._posterior(name))

    def _forward_weight_draws(self, input: Tensor, samples: int, *args: Any, **kwargs: Any) -> Tensor:
        """``samples`` blocks of ``input`` (``samples * rows``, ...), each computed with a weight draw of
        its own: ``op`` once per block, so that one draw at a time is in memory and each op has a
        full batch of rows (on a CPU faster than one grouped convolution of all the draws)."""
        if input.dim() == 0 or input.shape[0] % samples:
            raise ValueError(
                f"{type(self).__name__} was to draw {samples} weight sets for a batch folded from {samples} samples, "
                f"but its input has shape {tuple(input.shape)}: the batch must be its first dimension (batch-first, or "
                "flattened with the batch outermost); use vinn.sample(..., draw='outputs') for this model"
            )
        # the posteriors once: their scales are computed once for all the draws
        posteriors = [self._posterior(name) for name in self.parameter_names]
        blocks = [self._op(block, *map(draw, posteriors), *args, **kwargs) for block in input.unflatten(0, (samples, -1))]
        return torch.cat(blocks)

    def _multiply_adds(self, output: Tensor) -> int:
        """The multiply-adds of the ``op`` that gave ``output``: each output element sums ``fan_in``
        products (what `vinn.sample` weighs against drawing the weights)."""
        return output.numel() * self.fan_in

    def _linear_input(self, input: Tensor) -> Tensor:
        """What `_op` is linear in: the input itself, or for a normalization layer the normalized input
        (computed once, then scaled and shifted by the sampled weights)."""
        return input

    def _variance(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The variance of every output element under the posterior, for local reparameterization:
        ``op(x², σ_w², σ_b²)``, exact for an op linear in its input and in its weights. With a
        `MatrixNormal` weight, output i has variance ``u_i xᵀVx + σ_b,i²``: the op applied to the
        one feature xᵀVx with the row variances u as a one-column weight."""
        if self._matrix_normal:
            quadratic = (input @ self._column_scale_tril()).square().sum(-1, keepdim=True)  # xᵀVx: (*, 1)
            return self._op(quadratic, sigma2(self.weight_log_sigma2), self._sigma2("bias"))
        return self._op(input.square(), *(self._sigma2(name) for name in self.parameter_names), *args, **kwargs)

    def _perturbation(self, name: str) -> Tensor | None:
        """A draw of w - loc: the posterior family centred at 0."""
        log_sigma2 = getattr(self, f"{name}_log_sigma2")
        if log_sigma2 is None:
            return None
        if is_normal(self.posterior):
            return normal_draw(None, log_sigma2)
        scale = self._scale(name)
        return self._elementwise_family(loc=scale.new_zeros(()), scale=scale, validate_args=False).rsample()

    def _random_signs(self, t: Tensor) -> Tensor:
        """±1 per example and feature (channel, for convolutions: shared over the spatial dims)."""
        return random_signs(t.shape[: t.dim() - self._spatial_dims] + (1,) * self._spatial_dims, t)

    # -- conversion from and to torch.nn ---------------------------------------------------------

    @classmethod
    def _config(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments that rebuild ``module``'s configuration (torch.nn names)."""
        names, factory = _constructor_arguments(cls._torch_cls)
        config = {name: getattr(module, name) for name in names if name != "bias"}
        if "bias" in names:
            config["bias"] = module.bias is not None
        if factory:
            config.update(_factory(module))
        return config

    @classmethod
    def from_torch(
        cls,
        module: nn.Module,
        *,
        posterior: PosteriorFamily = Normal,
        prior: PriorArgument = None,
        init_scale: InitScale = DEFAULT_INIT_SCALE,
        estimator: str | None = None,
        assign: bool = False,
    ) -> BayesianLayer:
        """The Bayesian layer with ``module``'s configuration whose posterior loc is ``module``'s weights.

        ``module`` must be exactly ``cls``'s torch.nn counterpart (a subclass may compute something
        else in its forward). Every constructor attribute is kept; ``module`` is not modified.
        ``assign=True``, as in torch's ``load_state_dict(assign=True)``: the layer takes ``module``'s
        tensors as its loc (and buffers) instead of copying them, which saves a weight-sized write
        and allocation; the two then share that memory, so ``module`` must not be used afterwards.
        """
        if type(module) is not cls._torch_cls:
            raise TypeError(f"{cls.__name__}.from_torch takes a {cls._torch_cls.__name__}, got {type(module).__name__}")
        token = _skip_initialisation.set(True)  # the loc is copied below: initialising it is wasted work
        try:
            config = cls._config(module)
            layer = cls(**config, posterior=posterior, prior=prior, init_scale=init_scale, estimator=estimator)
        finally:
            _skip_initialisation.reset(token)
        if "device" not in config:  # a torch layer built without device and dtype arguments
            layer.to(**_factory(module))
        _copy_torch_state(module, layer, assign)
        # a pretrained prior and a relative init_scale depend on the loc just copied
        layer._register_priors()
        layer.reset_scale()
        return layer.train(module.training)

    def to_torch(self) -> nn.Module:
        """The torch.nn counterpart with this layer's configuration, holding the posterior loc."""
        module = self._torch_cls(**self._config(self)).to(**_factory(self))
        _copy_torch_state(self, module)
        return module.train(self.training)

    def extra_repr(self) -> str:
        first = next(iter(self.random_parameters()))  # the weight
        bayesian = f"posterior={family_name(self.posterior)}, prior={self._prior(first)}, estimator={self.estimator!r}"
        return ", ".join(filter(None, (super().extra_repr(), bayesian)))


def draw(posterior: Distribution | None) -> Tensor | None:
    """A reparameterized draw of ``posterior`` (None for a missing parameter)."""
    if posterior is None:
        return None
    if type(posterior) is Normal and not torch.is_grad_enabled():  # prediction: one buffer, the same numbers
        return torch.randn_like(posterior.loc).mul_(posterior.scale).add_(posterior.loc)
    return posterior.rsample()


def normal_sample(mean: Tensor, var: Tensor) -> Tensor:
    """A draw of Normal(mean, var), elementwise: local reparameterization's output (``var`` may be overwritten)."""
    if not torch.is_grad_enabled():  # prediction: reuse the buffers, activations are large
        return var.clamp_min_(torch.finfo(var.dtype).tiny).sqrt_().mul_(torch.randn_like(var)).add_(mean)
    return _NormalSample.apply(mean, var)


class _NormalSample(torch.autograd.Function):
    """``mean + sqrt(var) ε``, ε ~ N(0, 1), with its gradient written out: d/dmean = 1, d/dvar =
    ε / (2 sqrt(var)), 0 where var is 0. Training with local reparameterization makes it for every
    layer's output: four activation-sized allocations in all, where autograd's graph of clamp,
    sqrt, multiply and add takes about nine. The variance is clamped at the smallest normal
    number, not shifted (no bias), so that the gradient stays finite where it is 0."""

    @staticmethod
    def forward(ctx: Any, mean: Tensor, var: Tensor) -> Tensor:
        tiny = torch.finfo(var.dtype).tiny
        std = var.clamp_min(tiny).sqrt_()
        noise = torch.randn_like(std)
        out = torch.addcmul(mean, std, noise)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(noise.div_(std).mul_(0.5).masked_fill_(var < tiny, 0.0))  # ε / (2 sqrt(var))
        ctx.shapes = mean.shape, var.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        mean_shape, var_shape = ctx.shapes
        grad_mean = grad.sum_to_size(mean_shape) if ctx.needs_input_grad[0] else None
        grad_var = (grad * ctx.saved_tensors[0]).sum_to_size(var_shape) if ctx.needs_input_grad[1] else None
        return grad_mean, grad_var


_BITS_PER_WORD = 31  # torch.randint(0, 2**31) draws its words uniformly: 31 independent fair bits each


def random_signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Independent ±1 with probability ½ each, of ``shape``, with ``like``'s dtype and device: flipout's signs.

    Unpacked from the bits of random words, 31 signs per draw of the generator: on a CPU,
    ``bernoulli_(0.5)`` costs one draw and more per sign (3-20x slower for the signs of a batch)."""
    count = math.prod(shape)
    words = torch.randint(0, 2**_BITS_PER_WORD, (-(-count // _BITS_PER_WORD), 1), dtype=torch.int32, device=like.device)
    bits = words.bitwise_right_shift(torch.arange(_BITS_PER_WORD, dtype=torch.int32, device=like.device)).bitwise_and_(1)
    return bits.view(-1)[:count].view(shape).to(like.dtype).mul_(2).sub_(1)


def _check_init_scale(init_scale: object) -> None:
    if not callable(init_scale):
        accepted = f"a float in ({MIN_SCALE}, {MAX_SCALE}) or a callable loc -> scale tensor such as vinn.RelativeScale"
        real(init_scale, "init_scale", low=MIN_SCALE, high=MAX_SCALE, low_open=True, high_open=True, accepted=accepted)


def _check_estimator(estimator: str | None, posterior: PosteriorFamily, estimators: tuple[str, ...] = ESTIMATORS) -> str:
    """The estimator to use: the given one if it suits the posterior; by default the first of ``estimators``
    (a layer's, in its order of preference) that suits it: LRT for Normal where the layer allows it."""
    if estimator is None:
        suitable = [e for e in estimators if _unsuitable(e, posterior) is None]
        if not suitable:
            raise ValueError(f"none of the estimators {estimators} suits a {family_name(posterior)} posterior")
        return suitable[0]
    one_of(estimator, "estimator", ESTIMATORS)
    problem = _unsuitable(estimator, posterior)
    if problem is not None:
        raise ValueError(problem)
    return estimator


def _unsuitable(estimator: str, posterior: PosteriorFamily) -> str | None:
    """Why ``estimator`` cannot sample a layer with this posterior family; None if it can."""
    if estimator == "lrt" and not is_gaussian(posterior):
        return f"estimator='lrt' needs a Normal or MatrixNormal posterior, got {family_name(posterior)}; use 'sample' or 'flipout'"
    if estimator == "flipout" and not is_symmetric(posterior):
        return (
            "estimator='flipout' needs an elementwise posterior symmetric about its loc (Normal, Laplace, Cauchy, StudentT), "
            f"got {family_name(posterior)}"
        )
    return None


def register_layer(layer_type: type[BayesianLayer]) -> type[BayesianLayer]:
    """Make `vinn.bayesify` turn every module of exactly ``layer_type``'s torch layer into a ``layer_type``.

    ``layer_type`` subclasses `BayesianLayer` and the torch layer (first the former), and
    implements ``_op(input, weight, bias)``; usable as a class decorator::

        @vinn.register_layer
        class BayesianMyLinear(vinn.BayesianLayer, my_package.MyLinear):
            def _op(self, input, weight, bias):
                return my_package.my_linear(input, weight, bias)

    A type that computes its forward itself instead of through ``_op`` declares
    ``batched_draws = False``: `vinn.sample` then never has it draw weights on a folded batch. A
    later registration for the same torch layer replaces the earlier one. Returns ``layer_type``.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, BayesianLayer)):
        raise TypeError(f"layer_type must be a subclass of vinn.BayesianLayer, got {layer_type!r}")
    if "_torch_cls" not in vars(layer_type):
        raise TypeError(
            f"{layer_type.__name__} has no torch layer among its bases: declare it as "
            f"class {layer_type.__name__}(vinn.BayesianLayer, TorchLayer)"
        )
    _REGISTRY[layer_type._torch_cls] = layer_type
    return layer_type


def layer_types() -> dict[type[nn.Module], type[BayesianLayer]]:
    """``{torch layer type: vinn layer type}`` for every type `vinn.bayesify` converts (a copy).

    Types of other libraries are registered once their library is imported (transformers'
    ``Conv1D``, see `vinn.huggingface`; timm's ``Linear`` and ``Conv2dSame``, see
    `vinn.timm_layers`): vinn never imports them itself.
    """
    for library, layers in _LIBRARY_LAYERS.items():
        if library in sys.modules:
            importlib.import_module(layers)
    return dict(_REGISTRY)


# library -> the vinn module that registers its own layer types, imported once the library is
_LIBRARY_LAYERS = {"transformers": "vinn.huggingface", "timm": "vinn.timm_layers"}


def _initial_log_sigma2(init_scale: InitScale, name: str, loc: Tensor) -> float | Tensor:
    """log σ² for every element of the parameter ``name`` (loc ``loc``) from ``init_scale``, checked:
    one number for a float ``init_scale`` (filled in, without a parameter-sized temporary)."""
    if not callable(init_scale):  # a float, checked by _check_init_scale
        return 2 * math.log(init_scale)
    scale = torch.as_tensor(init_scale(loc.detach()), dtype=loc.dtype, device=loc.device)
    if not broadcasts_to(scale.shape, loc.shape):
        raise ValueError(f"init_scale gave shape {tuple(scale.shape)} for {name} of shape {tuple(loc.shape)}")
    if not bool(((scale > MIN_SCALE) & (scale < MAX_SCALE)).all()):
        raise ValueError(
            f"init_scale must give scales in ({MIN_SCALE}, {MAX_SCALE}), got {scale.min().item()} to {scale.max().item()}"
        )
    return (2 * scale.log()).expand_as(loc)


@functools.cache
def _constructor_arguments(torch_cls: type[nn.Module]) -> tuple[tuple[str, ...], bool]:
    """The public constructor arguments of a torch.nn layer class (private ones, nn.Embedding's
    _weight, only set the initial state), and whether it takes device and dtype; cached: a
    conversion asks once per layer, and `inspect.signature` is slow."""
    arguments = inspect.signature(torch_cls.__init__).parameters
    names = tuple(n for n in arguments if n not in ("self", "device", "dtype") and not n.startswith("_"))
    return names, "device" in arguments


def _factory(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of ``module``'s first parameter, as torch.nn's factory keyword arguments."""
    parameter = next(module.parameters())
    return {"device": parameter.device, "dtype": parameter.dtype}


@torch.no_grad()
def _copy_torch_state(source: nn.Module, target: nn.Module, assign: bool = False) -> None:
    """Copy the whole state of a torch.nn layer, every parameter and buffer (running statistics, a
    MultiheadAttention's bias_k and out_proj), between it and its vinn layer, which has its own
    besides; ``assign``: the target's tensors take the source's memory instead (same shapes and dtypes)."""
    sources = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    targets = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    for name in sources.keys() & targets.keys():
        if assign and (targets[name].dtype, targets[name].shape) == (sources[name].dtype, sources[name].shape):
            targets[name].data = sources[name].detach()
        else:
            targets[name].copy_(sources[name])


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _compact(tensor: Tensor) -> Tensor:
    """The smallest tensor that expands back to ``tensor``: each broadcast (stride-0) dimension kept once."""
    if tensor.dim() == 0:  # the common scalar prior: no indexing
        return tensor
    index = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride())
    small = tensor[index]
    return small.reshape(()) if small.numel() == 1 else small


def _check_prior_argument(prior: object, posterior: PosteriorFamily) -> None:
    """The kind of ``prior`` (its fit to each parameter is checked when the priors are built)."""
    if prior is None or isinstance(prior, (Distribution, Mapping)):
        return
    if not isinstance(prior, PriorSpec):
        raise TypeError(
            "prior must be a torch.distributions.Distribution instance such as Normal(0., 1.), a mapping "
            "{'weight': ..., 'bias': ...} of them, or a vinn prior (PretrainedPrior, FanInPrior, "
            f"EmpiricalBayesPrior); got {type(prior).__name__}"
        )
    if prior.learned and not has_finite_variance(posterior):
        raise ValueError(
            f"{prior!r} fits the prior scale to the posterior's variance, which {family_name(posterior)} does not "
            "have; use a posterior with finite variance (Normal, Laplace, ...)"
        )


def _split_prior(prior: Distribution | Mapping[str, Distribution] | PriorSpec, layer: BayesianLayer) -> dict[str, Distribution]:
    """One checked prior per random parameter of ``layer``. A vinn prior builds them from the layer; a
    mapping gives them by name (a missing one is Normal(0, 1)); a single scalar distribution serves
    every parameter alike, and an elementwise one is the weight's alone, the others keeping Normal(0, 1)."""
    shapes = {name: loc.shape for name, loc in layer.random_parameters().items()}
    if isinstance(prior, PriorSpec):
        priors = prior.priors(layer)
    elif isinstance(prior, Mapping):
        unknown = set(prior) - set(layer.parameter_names)
        if unknown:
            names = " and/or ".join(repr(name) for name in layer.parameter_names)
            raise ValueError(f"prior mapping keys must be {names}, got {sorted(unknown)}")
        priors = {name: prior.get(name, _default_prior()) for name in shapes}
    else:
        first = next(iter(shapes))  # the weight
        priors = {name: prior if prior.batch_shape == () or name == first else _default_prior() for name in shapes}
    for name, distribution in priors.items():
        check_prior(distribution, shapes[name], f"prior for {name}")
    return priors


@register_layer
class Linear(BayesianLayer, nn.Linear):
    """Bayesian `torch.nn.Linear`: y = x Wᵀ + b with W, b drawn from the posterior.

    Input (*, in_features), output (*, out_features). Arguments as torch.nn.Linear, plus
    ``posterior`` (a distribution class with loc and scale, or `vinn.MatrixNormal`), ``prior`` (a distribution instance,
    or a mapping ``{"weight": ..., "bias": ...}``) and ``init_scale`` (initial posterior scale).
    """

    matrix_normal = True

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)


class _ConvNd(BayesianLayer):
    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # torch's own helper, so padding modes ("reflect", "circular", ...) and string padding behave
        # exactly as in torch.nn; padding x and then squaring equals padding x², so LRT stays exact.
        return self._conv_forward(input, weight, bias)


@register_layer
class Conv1d(_ConvNd, nn.Conv1d):
    """Bayesian `torch.nn.Conv1d`; arguments as torch.nn.Conv1d plus ``posterior``, ``prior``, ``init_scale``."""


@register_layer
class Conv2d(_ConvNd, nn.Conv2d):
    """Bayesian `torch.nn.Conv2d`; arguments as torch.nn.Conv2d plus ``posterior``, ``prior``, ``init_scale``."""


@register_layer
class Conv3d(_ConvNd, nn.Conv3d):
    """Bayesian `torch.nn.Conv3d`; arguments as torch.nn.Conv3d plus ``posterior``, ``prior``, ``init_scale``."""


class _ConvTransposeNd(BayesianLayer):
    output_dim = 1  # weight (in_channels, out_channels / groups, *kernel_size)
    _functional: ClassVar[Callable[..., Tensor]]

    def _multiply_adds(self, output: Tensor) -> int:
        # each input element meets a kernel of (out_channels / groups) weights: per output element,
        # fan_in = in_channels * kernel products shared out over the groups and the stride's positions
        return output.numel() * self.fan_in // (self.groups * math.prod(self.stride))

    def _op(self, input: Tensor, weight: Tensor, bias: Tensor | None, output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._spatial_dims, self.dilation
        )
        return type(self)._functional(
            input, weight, bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


@register_layer
class ConvTranspose1d(_ConvTransposeNd, nn.ConvTranspose1d):
    """Bayesian `torch.nn.ConvTranspose1d`; arguments as torch.nn plus ``posterior``, ``prior``, ``init_scale``."""

    _functional = F.conv_transpose1d


@register_layer
class ConvTranspose2d(_ConvTransposeNd, nn.ConvTranspose2d):
    """Bayesian `torch.nn.ConvTranspose2d`; arguments as torch.nn plus ``posterior``, ``prior``, ``init_scale``."""

    _functional = F.conv_transpose2d


@register_layer
class ConvTranspose3d(_ConvTransposeNd, nn.ConvTranspose3d):
    """Bayesian `torch.nn.ConvTranspose3d`; arguments as torch.nn plus ``posterior``, ``prior``, ``init_scale``."""

    _functional = F.conv_transpose3d


@register_layer
class Embedding(BayesianLayer, nn.Embedding):
    """Bayesian `torch.nn.Embedding`: every token's vector drawn from the posterior, fresh noise per token.

    Input (*) integer indices, output (*, embedding_dim). Arguments as torch.nn.Embedding
    (``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse``), plus
    ``posterior``, ``prior``, ``init_scale``, ``estimator`` (``"lrt"``, the default for Normal, or
    ``"sample"``: a lookup has no input features to flip). A lookup is a product with a one-hot
    input, so local reparameterization is exact per token: every token of every sequence gets its
    own noise on the looked-up row. The padding index's vector is its loc, without noise;
    ``max_norm`` renormalizes the looked-up locs (in place, as torch.nn does) or the drawn rows.
    """

    parameter_names = ("weight",)
    output_dim = 1  # weight (num_embeddings, embedding_dim): the output units are the features
    estimators = ("lrt", "sample")
    # a weight draw per sample is the whole table, for the few rows a batch looks up
    batched_draws = False
    fan_in = 1  # a lookup reads one row

    def _op(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def _variance(self, input: Tensor) -> Tensor:
        # the looked-up rows of σ²: exp on those rows alone, not on the whole vocabulary
        log_sigma2 = F.embedding(input, self.weight_log_sigma2, None, None, 2.0, self.scale_grad_by_freq, self.sparse)
        variance = sigma2(log_sigma2)
        if self.padding_idx is not None:
            variance = variance.masked_fill((input == self.padding_idx).unsqueeze(-1), 0.0)
        return variance


class RelativeScale:
    """Initial posterior scale proportional to the loc's magnitude, ``max(factor * |loc|, floor)``.

    The MOPED recipe (Krishnan et al. 2020) for starting from pretrained weights; the floor gives
    near-zero weights a positive scale. Picklable, unlike a lambda, so layers using it save whole.
    """

    def __init__(self, factor: float = 0.1, floor: float = 1e-4) -> None:
        for name, value, low in (("factor", factor, 0.0), ("floor", floor, MIN_SCALE)):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"RelativeScale {name} must be a float, got {type(value).__name__}")
            if not low < value < MAX_SCALE:
                raise ValueError(f"RelativeScale {name} must be in ({low}, {MAX_SCALE}), got {value!r}")
        self.factor, self.floor = float(factor), float(floor)

    def __call__(self, loc: Tensor) -> Tensor:
        return (self.factor * loc.abs()).clamp_min(self.floor)

    def __repr__(self) -> str:
        return f"RelativeScale(factor={self.factor}, floor={self.floor})"
