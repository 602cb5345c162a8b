"""What `vinn.bayesify` makes Bayesian, and how: `LayerSpec` and `BayesConfig`.

In the spirit of ``torch.ao.quantization.QConfigMapping``: a `LayerSpec` says how one layer
becomes Bayesian (posterior family, prior, initial posterior scale); a `BayesConfig` maps layers
to a spec, or to None to keep them deterministic, globally, by module type and by name pattern,
and by name pattern any other parameter too (opt-in).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Real

from torch import nn
from torch.distributions import Distribution, Normal

from ..distributions import PosteriorFamily, check_posterior
from ..layers import InitScale, _check_estimator, _check_init_scale, _check_prior_argument, _default_prior, layer_types
from ..priors import PriorSpec
from ..validation import wrong_type, wrong_value

# Starting from a pretrained network, the posterior scale starts an order of magnitude below a
# fresh vinn layer's (vinn.layers.DEFAULT_INIT_SCALE): the converted model's samples stay close to
# the pretrained function until the ELBO grows the scale where the data allow.
CONVERTED_INIT_SCALE = 1e-3


@dataclass(frozen=True)
class LayerSpec:
    """How one layer becomes Bayesian.

    - ``posterior``: a ``torch.distributions`` class built from ``loc`` and ``scale`` (Normal,
      Laplace, ..., ``functools.partial(StudentT, df)``); its loc starts at the pretrained weights.
    - ``prior``: a distribution instance (scalar, broadcast to every element, or of the weight's
      shape), or a vinn prior: `PretrainedPrior` (centred on the pretrained weights),
      `EmpiricalBayesPrior` (its scale learned; ``pretrained=True`` centres it on the pretrained
      weights), `FanInPrior`.
    - ``init_scale``: the initial posterior scale: a float (the same for every element) or a
      callable from the loc tensor to a scale tensor, such as ``vinn.RelativeScale(0.1, 1e-4)``
      (MOPED: proportional to ``|w|``, with a floor).
    - ``estimator``: how the forward pass samples, ``"lrt"``, ``"flipout"`` or ``"sample"``, as
      for any vinn layer; None picks the layer's default for the posterior.
    """

    posterior: PosteriorFamily = Normal
    prior: Distribution | PriorSpec = field(default_factory=_default_prior)
    init_scale: InitScale = CONVERTED_INIT_SCALE
    estimator: str | None = None

    def __post_init__(self) -> None:
        check_posterior(self.posterior)
        if not isinstance(self.prior, (Distribution, PriorSpec)):
            raise TypeError(
                "prior must be a torch.distributions.Distribution instance such as Normal(0., 1.) or a vinn "
                f"prior (PretrainedPrior, FanInPrior, EmpiricalBayesPrior), got {type(self.prior).__name__}"
            )
        _check_prior_argument(self.prior, self.posterior)
        if not callable(self.init_scale) and (isinstance(self.init_scale, bool) or not isinstance(self.init_scale, Real)):
            raise TypeError(
                f"init_scale must be a float or a callable loc -> scale tensor, got {type(self.init_scale).__name__}"
            )
        _check_init_scale(self.init_scale)
        _check_estimator(self.estimator, self.posterior)


def layer_type_name(layer_type: type) -> str:
    """``nn.Linear`` for a torch.nn layer type, the bare class name for any other."""
    return f"nn.{layer_type.__name__}" if layer_type.__module__.startswith("torch.nn") else layer_type.__name__


def addresses_parameters(pattern: str) -> bool:
    """Whether a `BayesConfig.set_name` pattern names parameters as well as layers: one not ending in ``*``."""
    return not pattern.endswith("*")


def _check_spec(spec: object) -> None:
    if spec is not None and not isinstance(spec, LayerSpec):
        raise wrong_type("spec", "a vinn.LayerSpec or None (keep deterministic)", spec)


class BayesConfig:
    """Which layers `vinn.bayesify` makes Bayesian, each with its `LayerSpec`; None keeps a layer deterministic.

    Every setter returns the config, so calls chain::

        config = (vinn.BayesConfig()
                  .set_global(None)                                        # nothing by default ...
                  .set_type(nn.Linear, vinn.LayerSpec(init_scale=1e-2))    # ... but every Linear
                  .set_name("features.*", vinn.LayerSpec()))               # and everything under features

    Precedence, lowest to highest: the global spec (default ``LayerSpec()``: every layer Bayesian),
    then the spec of the layer's exact type, then name patterns, where a pattern set later wins
    over one set earlier. Patterns are ``fnmatch`` patterns matched against the whole qualified
    name (``"*"`` also matches dots: ``"layer4.*"`` matches ``"layer4.1.conv2"``). A layer that
    ``F.linear`` / ``F.conv*d`` calls in ``forward`` (see `vinn.bayesify`) is matched by the
    qualified name of its weight and by the torch.nn type that computes the same (``nn.Linear``,
    ``nn.Conv2d``, ...). `vinn.bayesify`'s ``last=k`` then applies on top of the config.

    **Parameters.** A name pattern that does not end in ``*`` also addresses parameters by their
    qualified name: ``set_name("class_token", spec)``, ``set_name("encoder.pos_embedding", spec)``,
    ``set_name("*.in_proj_weight", spec)``. A qualified name is a module's or a parameter's, never
    both, so a pattern tells them apart by what it matches; ending in ``*`` (``"layer4.*"``,
    ``"*"``) keeps a pattern to layers, so that a rule written for the layers under a module does
    not also turn every other parameter there random. Parameters are opt-in: neither the global
    spec nor a type rule reaches them, and among the name patterns that address a parameter, the
    one set last decides (None keeps it deterministic). A parameter that belongs to a layer that
    becomes Bayesian is Bayesian with that layer; any other parameter a rule names becomes a
    `vinn.BayesianParameter` (weight sampling, whatever module reads it), and ``last=k`` does not
    apply to it.
    """

    def __init__(self) -> None:
        self._global: LayerSpec | None = LayerSpec()
        self._by_type: dict[type[nn.Module], LayerSpec | None] = {}
        self._by_name: dict[str, LayerSpec | None] = {}  # insertion order = precedence, last wins

    def set_global(self, spec: LayerSpec | None) -> BayesConfig:
        """The spec of every layer that no type or name rule matches; None: keep those deterministic."""
        _check_spec(spec)
        self._global = spec
        return self

    def set_type(self, module_type: type[nn.Module], spec: LayerSpec | None) -> BayesConfig:
        """The spec of every layer of ``module_type`` (``nn.Linear``, ``nn.Conv2d``, ...), and of its
        subclasses that have no vinn layer type of their own (`vinn.bayesify` draws those whole)."""
        if not isinstance(module_type, type):
            raise wrong_type("module_type", "a torch.nn layer class", module_type)
        supported = layer_types()
        if module_type not in supported:
            names = ", ".join(map(layer_type_name, supported))
            raise wrong_value("module_type", f"a layer type vinn converts ({names}; see vinn.register_layer)", module_type)
        _check_spec(spec)
        self._by_type[module_type] = spec
        return self

    def set_name(self, pattern: str, spec: LayerSpec | None) -> BayesConfig:
        """The spec of every layer whose qualified name matches the fnmatch ``pattern``; set later, wins.

        A pattern not ending in ``*`` also names parameters (``"class_token"``), which then become
        Bayesian by weight sampling; see the class docstring."""
        if not isinstance(pattern, str):
            raise wrong_type("pattern", "a str (an fnmatch pattern)", pattern)
        _check_spec(spec)
        self._by_name.pop(pattern, None)  # setting a pattern again moves it to the end: it wins
        self._by_name[pattern] = spec
        return self

    def spec_for(self, name: str, module_type: type[nn.Module]) -> tuple[LayerSpec | None, str]:
        """The spec of the layer ``name`` of type ``module_type``, and the rule that chose it.

        The rule is ``"global"``, ``"type Conv2d"`` or ``"name 'features.*'"``. A subclass of a
        supported type (timm's ``ScaledStdConv2d``) follows the rules of that type. The global spec does
        not apply to the opt-in types (normalization layers: ``converted_by_default`` False): they
        are converted where a type or name rule matches them, and otherwise kept, the rule then
        saying so.
        """
        for pattern in reversed(self._by_name):
            if fnmatch.fnmatchcase(name, pattern):
                return self._by_name[pattern], f"name {pattern!r}"
        supported = layer_types()
        module_type = next(t for t in module_type.__mro__ if t in supported)
        if module_type in self._by_type:
            return self._by_type[module_type], f"type {module_type.__name__}"
        if not supported[module_type].converted_by_default:
            return None, "opt-in type: name it with set_type or set_name"
        return self._global, "global"

    def spec_for_parameter(self, name: str) -> tuple[LayerSpec | None, str] | None:
        """The spec of the parameter ``name`` and the rule that chose it (``"name 'class_token'"``);
        None when no name rule addresses it (only patterns not ending in ``*`` do): it stays as it is."""
        for pattern in reversed(self._by_name):
            if addresses_parameters(pattern) and fnmatch.fnmatchcase(name, pattern):
                return self._by_name[pattern], f"name {pattern!r}"
        return None

    def unused_rules(self, layers: list[tuple[str, type[nn.Module] | None]], parameters: Iterable[str] = ()) -> list[str]:
        """The type and name rules that match none of ``layers`` ((qualified name, torch.nn type)
        pairs) nor, for a pattern that addresses parameters, any of ``parameters`` (qualified names),
        as readable strings: most likely a typo in a pattern, or a type the model lacks."""
        parameters = list(parameters)
        unused = [
            f"set_type({layer_type_name(t)}, ...)" for t in self._by_type if not any(kind is not None and issubclass(kind, t) for _, kind in layers)
        ]
        unused += [
            f"set_name({pattern!r}, ...)"
            for pattern in self._by_name
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in layers)
            and not (addresses_parameters(pattern) and any(fnmatch.fnmatchcase(name, pattern) for name in parameters))
        ]
        return unused

    def __repr__(self) -> str:
        rules = [f"set_global({self._global!r})"]
        rules += [f"set_type(nn.{t.__name__}, {s!r})" for t, s in self._by_type.items()]
        rules += [f"set_name({p!r}, {s!r})" for p, s in self._by_name.items()]
        return "BayesConfig()." + ".".join(rules)
