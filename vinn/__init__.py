"""vinn: Bayesian neural networks trained by variational inference, as drop-in torch.nn layers."""

from .convert import (
    BayesConfig,
    ConversionReport,
    LayerReport,
    LayerSpec,
    PretrainedPrior,
    bayesify,
    to_deterministic,
)
from .elbo import ELBO
from .layers import (
    MAX_SCALE,
    MIN_SCALE,
    BayesianLayer,
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    Linear,
    RelativeScale,
)
from .module import Module, kl
from .prediction import predict, sample
from .sampling import deterministic
from .uncertainty import (
    auroc,
    brier_score,
    confidence_score,
    expected_calibration_error,
    mutual_information,
    predictive_entropy,
    regression_uncertainty,
    uncertainty,
)

__version__ = "0.1.0"

__all__ = [
    "BayesConfig",
    "BayesianLayer",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "ConversionReport",
    "ELBO",
    "LayerReport",
    "LayerSpec",
    "Linear",
    "MAX_SCALE",
    "MIN_SCALE",
    "Module",
    "PretrainedPrior",
    "RelativeScale",
    "auroc",
    "bayesify",
    "brier_score",
    "confidence_score",
    "deterministic",
    "expected_calibration_error",
    "kl",
    "mutual_information",
    "predict",
    "predictive_entropy",
    "regression_uncertainty",
    "sample",
    "to_deterministic",
    "uncertainty",
]
