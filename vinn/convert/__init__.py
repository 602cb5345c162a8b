"""Conversion of trained torch.nn models to Bayesian ones and back: `bayesify`, `to_deterministic`."""

from .bayesify import bayesify, to_deterministic
from .config import BayesConfig, LayerSpec
from .models import BayesianGraphModule
from .report import ConversionReport, LayerReport

__all__ = [
    "BayesConfig",
    "BayesianGraphModule",
    "ConversionReport",
    "LayerReport",
    "LayerSpec",
    "bayesify",
    "to_deterministic",
]
