"""vinn: Bayesian neural networks trained by variational inference, as drop-in torch.nn layers."""

from .attention import MultiheadAttention
from .convert import (
    BayesConfig,
    ConversionReport,
    LayerReport,
    LayerSpec,
    bayesify,
    to_deterministic,
)
from .distributions import MatrixNormal
from .elbo import ELBO
from .initialization import init_column_covariance
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
    Embedding,
    Linear,
    RelativeScale,
    layer_types,
    register_layer,
)
from .mixture import Mixture
from .module import Module, kl
from .normalization import BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, LayerNorm, RMSNorm
from .optim import SCALE_LR_RATIO, param_groups
from .parametrization import BayesianParameter
from .prediction import predict, sample
from .priors import EmpiricalBayesPrior, FanInPrior, PretrainedPrior, PriorSpec
from .recurrent import GRU, LSTM, RNN
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
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BayesConfig",
    "BayesianLayer",
    "BayesianParameter",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "ConversionReport",
    "ELBO",
    "GRU",
    "GroupNorm",
    "Embedding",
    "EmpiricalBayesPrior",
    "FanInPrior",
    "LSTM",
    "LayerNorm",
    "LayerReport",
    "LayerSpec",
    "Linear",
    "MAX_SCALE",
    "MIN_SCALE",
    "MatrixNormal",
    "Mixture",
    "Module",
    "MultiheadAttention",
    "PretrainedPrior",
    "PriorSpec",
    "RMSNorm",
    "RNN",
    "RelativeScale",
    "SCALE_LR_RATIO",
    "auroc",
    "bayesify",
    "brier_score",
    "confidence_score",
    "deterministic",
    "expected_calibration_error",
    "init_column_covariance",
    "kl",
    "layer_types",
    "mutual_information",
    "param_groups",
    "predict",
    "predictive_entropy",
    "register_layer",
    "regression_uncertainty",
    "sample",
    "to_deterministic",
    "uncertainty",
]
