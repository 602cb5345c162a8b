"""Predictive uncertainty from Monte Carlo samples of a Bayesian network.

Classification functions take ``p`` of shape ``(T, N, C)``: the softmax probabilities of ``T``
stochastic forward passes for ``N`` examples over ``C`` classes. Every function accepts a numpy
array or a torch tensor and returns the same kind (a tensor keeps its device and dtype). Each
formula is written once, in torch; numpy input is viewed as a tensor and converted back.

References:
    Brier (1950), Verification of Forecasts Expressed in Terms of Probability.
    Houlsby et al. (2011), Bayesian Active Learning for Classification and Preference Learning.
    Guo et al. (2017), On Calibration of Modern Neural Networks.
    Kendall & Gal (2017), What Uncertainties Do We Need in Bayesian Deep Learning for Computer Vision?
    Kwon et al. (2018), Uncertainty quantification using Bayesian neural networks in
    classification: Application to ischemic stroke lesion segmentation.
    Deodato et al. (2020), Bayesian neural networks for cellular image classification and
    uncertainty analysis.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import finite, integer

__all__ = [
    "auroc",
    "brier_score",
    "confidence_score",
    "expected_calibration_error",
    "mutual_information",
    "predictive_entropy",
    "regression_uncertainty",
    "uncertainty",
]

Array = TypeVar("Array", np.ndarray, Tensor)

_LAYOUTS = {2: "(N, C) (examples, classes)", 3: "(T, N, C) (samples, examples, classes)"}


def _tensor(x: object, name: str) -> tuple[Tensor, bool]:
    """``x`` as a tensor (sharing memory where possible) and whether it came in as numpy."""
    if isinstance(x, Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        try:
            # from_numpy rejects negative strides (x[::-1]); ascontiguousarray copies only then
            return torch.from_numpy(np.ascontiguousarray(x)), True
        except TypeError:
            raise TypeError(f"{name} has numpy dtype {x.dtype}, which torch cannot hold") from None
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _probabilities(x: object, name: str, ranks: tuple[int, ...] = (3,)) -> tuple[Tensor, bool]:
    """Check that ``x`` is floating probabilities of one of the layouts in ``ranks``: each in
    [0, 1], no NaN, summing to 1 over the classes (the last dimension)."""
    t, was_numpy = _tensor(x, name)
    if t.ndim not in ranks or min(t.shape) < 1 or t.shape[-1] < 2:
        layouts = " or ".join(_LAYOUTS[r] for r in ranks)
        raise ValueError(f"{name} must have shape {layouts} with C >= 2, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point probabilities, got dtype {t.dtype}")
    _check_distribution(t.detach(), name)
    return t, was_numpy


def _check_distribution(t: Tensor, name: str) -> None:
    """ValueError unless every row of ``t`` along its last dimension is a probability vector."""
    if bool(t.isnan().any()):
        raise ValueError(f"{name} must hold probabilities, got NaN (a diverged model or a 0/0 upstream)")
    low, high = t.min().item(), t.max().item()
    if low < 0 or high > 1:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{low:.4g}, {high:.4g}]: this looks like "
            "logits; apply softmax over the classes (the last dimension), or use vinn.predict, which does"
        )
    # each term is off by its relative rounding error, so the sum by about eps (bfloat16: 0.8%);
    # probabilities printed with 3 decimals by up to C * 0.0005; unnormalised scores by far more
    tolerance = max(0.01, 2 * torch.finfo(t.dtype).eps)
    sums = t.sum(-1, dtype=_metric_dtype(t))
    error = (sums - 1).abs().max().item()
    if error > tolerance:
        raise ValueError(
            f"{name} must sum to 1 over the classes (the last dimension), got sums in [{sums.min().item():.4g}, "
            f"{sums.max().item():.4g}]: this looks like unnormalised scores or independent sigmoids; apply softmax "
            "over the classes, or use vinn.predict, which does"
        )


def _back(t: Tensor, was_numpy: bool) -> Any:  # the kind the caller gave: an Array
    return t.numpy() if was_numpy else t


def _decompose(p: Tensor) -> tuple[Tensor, Tensor]:
    return (p - p**2).mean(0), ((p - p.mean(0)) ** 2).mean(0)


def uncertainty(p: Array) -> tuple[Array, Array]:
    """Aleatoric and epistemic variance of each class probability, each of shape ``(N, C)``.

    Kendall & Gal (2017) in the diagonal form of Kwon et al. (2018)::

        aleatoric = mean_T p (1 - p)        epistemic = mean_T (p - p̄)²,   p̄ = mean_T p

    Both are variances of a probability (unitless, in ``[0, 1/4]``); their sum is ``p̄ (1 - p̄)``.
    ``p``: ``(T, N, C)`` softmax probabilities of ``T`` Monte Carlo forward passes.
    """
    t, was_numpy = _probabilities(p, "p")
    aleatoric, epistemic = _decompose(t)
    return _back(aleatoric, was_numpy), _back(epistemic, was_numpy)


def confidence_score(p: Array) -> Array:
    """Confidence ``1 - 2 sqrt(u)`` of the predicted class, shape ``(N,)``, in ``[0, 1]``.

    ``u`` is aleatoric + epistemic variance (see `uncertainty`) of the class maximising ``p̄``
    (Deodato et al. 2020): 1 for a certain prediction, 0 for an even two-way split.
    ``p``: ``(T, N, C)`` softmax probabilities.
    """
    t, was_numpy = _probabilities(p, "p")
    aleatoric, epistemic = _decompose(t)
    predicted = t.mean(0).argmax(1, keepdim=True)
    # no clamp before sqrt: for p in [0, 1], fl(p²) <= p, so every term of u is exactly >= 0
    u = (aleatoric + epistemic).gather(1, predicted).squeeze(1)
    return _back(1 - 2 * u.sqrt(), was_numpy)


def _entropy(p: Tensor) -> Tensor:
    return torch.special.entr(p).sum(-1)  # entr(0) = 0, i.e. 0 log 0 = 0


def predictive_entropy(p: Array) -> Array:
    """Entropy ``H[p̄] = -Σ_c p̄_c log p̄_c`` of the mean prediction, in nats, shape ``(N,)``.

    Total predictive uncertainty, between 0 and ``log C``. ``p``: ``(T, N, C)`` probabilities.
    """
    t, was_numpy = _probabilities(p, "p")
    return _back(_entropy(t.mean(0)), was_numpy)


def mutual_information(p: Array) -> Array:
    """BALD score ``H[p̄] - mean_T H[p_t]`` in nats, shape ``(N,)`` (Houlsby et al. 2011).

    Mutual information between the prediction and the weights: the epistemic part of
    `predictive_entropy`, 0 when all samples agree. ``p``: ``(T, N, C)`` probabilities.
    """
    t, was_numpy = _probabilities(p, "p")
    # >= 0 by Jensen; rounding can leave -1e-16 where the samples agree
    return _back((_entropy(t.mean(0)) - _entropy(t).mean(0)).clamp_min(0), was_numpy)


def _metric_dtype(t: Tensor) -> torch.dtype:
    # sums of up to N terms: float64 keeps them exact enough (MPS has no float64)
    return torch.float32 if t.device.type == "mps" else torch.float64


def _mean_probabilities_and_labels(probs: object, labels: object) -> tuple[Tensor, Tensor]:
    """Validated ``probs`` as ``(N, C)`` (averaged over ``T`` if given ``(T, N, C)``), detached, and
    ``labels`` as the ``(N, C)`` distribution of each example's label, on the same device and in
    the metrics' dtype (`_metric_dtype`): one-hot for ``(N,)`` integer class indices, as given for
    ``(N, C)`` label probabilities."""
    t, _ = _probabilities(probs, "probs", ranks=(2, 3))
    if t.ndim == 3:
        t = t.mean(0)
    y, _ = _tensor(labels, "labels")
    n, c = t.shape
    if y.shape == (n, c):  # a distribution over the labels (noisy or soft labels)
        q, _ = _probabilities(labels, "labels", ranks=(2,))
        return t.detach(), q.detach().to(device=t.device, dtype=_metric_dtype(t))
    if y.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},) or (N, C) = ({n}, {c}) to match probs, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels of shape (N,) must hold integer class indices, got dtype {y.dtype}")
    y = y.to(t.device)
    if y.min() < 0 or y.max() >= c:
        low, high = y.min().item(), y.max().item()
        raise ValueError(f"labels must be class indices in [0, {c}), got values in [{low}, {high}]")
    return t.detach(), F.one_hot(y.long(), c).to(_metric_dtype(t))  # metrics are returned as floats: no graph to keep


# Guo et al. 2017's choice; the reliability diagram (vinn.plot) bins the same way by default
ECE_BINS = 15


def expected_calibration_error(probs: Array, labels: Array, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error ``Σ_b (n_b / N) |acc_b - conf_b|`` (Guo et al. 2017).

    Confidence is the max probability, grouped into ``n_bins`` equal-width bins
    ``(k/n_bins, (k+1)/n_bins]``; ``acc_b`` and ``conf_b`` are the accuracy and mean confidence
    in bin ``b``. A fraction in ``[0, 1]``.

    ``probs``: ``(N, C)`` predictive probabilities, or ``(T, N, C)`` samples averaged over ``T``.
    ``labels``: ``(N,)`` integer class indices, or ``(N, C)`` the probability of each class being
    the label (noisy or soft labels): ``acc_b`` is then the expected accuracy, each prediction
    counting the probability that its class is the label.
    """
    n_bins = integer(n_bins, "n_bins")
    t, q = _mean_probabilities_and_labels(probs, labels)
    n = len(q)
    confidence, predicted = t.max(1)
    dtype = _metric_dtype(t)
    confidence = confidence.to(dtype)
    correct = q.gather(1, predicted.unsqueeze(1)).squeeze(1)
    edges = torch.arange(1, n_bins, dtype=dtype, device=t.device) / n_bins
    bins = torch.bucketize(confidence, edges)  # edges[b-1] < confidence <= edges[b]
    zeros = torch.zeros(n_bins, dtype=dtype, device=t.device)
    gap = zeros.index_add(0, bins, correct) - zeros.index_add(0, bins, confidence)
    # (n_b / N) |acc_b - conf_b| = |Σ_b correct - Σ_b confidence| / N, with no 0/0 for empty bins
    return float(gap.abs().sum() / n)


def brier_score(probs: Array, labels: Array) -> float:
    """Brier score ``mean_N Σ_c (p_c - onehot(y)_c)²``, in ``[0, 2]``; lower is better (Brier 1950).

    ``probs``: ``(N, C)`` predictive probabilities, or ``(T, N, C)`` samples averaged over ``T``
    first. ``labels``: ``(N,)`` integer class indices, or ``(N, C)`` label probabilities (the
    expected Brier score under them, ``mean_N Σ_c (p_c - q_c)²`` plus their own variance
    ``mean_N (1 - Σ_c q_c²)``).
    """
    t, q = _mean_probabilities_and_labels(probs, labels)
    t = t.to(q.dtype)
    return float(((t - q) ** 2).sum(1).mean() + (1 - q.square().sum(1)).mean())


def _scores(x: object, name: str) -> Tensor:
    t, _ = _tensor(x, name)
    if t.ndim != 1 or len(t) == 0:
        raise ValueError(f"{name} must have shape (N,) with N >= 1, got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real scores, got dtype {t.dtype}")
    if t.is_floating_point() and t.isnan().any():
        raise ValueError(f"{name} contains NaN")
    return t.detach().to(_metric_dtype(t))


def auroc(scores_in: Array, scores_out: Array) -> float:
    """Area under the ROC curve of telling in- from out-of-distribution inputs by a score.

    The probability that a random in-distribution example scores higher than a random
    out-of-distribution one, ties counting 1/2 (the Mann-Whitney U statistic over
    ``N_in * N_out``): 1 separates perfectly, 0.5 is chance. Computed from ranks in
    ``O(N log N)``. ``scores_in``: ``(N_in,)``; ``scores_out``: ``(N_out,)``, higher meaning
    "more in-distribution" (e.g. `confidence_score`).
    """
    inside, outside = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    outside = outside.to(inside.device).sort().values
    below = torch.searchsorted(outside, inside, side="left")  # out-scores strictly lower
    not_above = torch.searchsorted(outside, inside, side="right")
    wins = (below + not_above).to(inside.dtype) / 2  # strictly lower + half the ties
    return float(wins.sum() / (len(inside) * len(outside)))


def regression_uncertainty(mean: Array, var: Array) -> tuple[Array, Array]:
    """Aleatoric ``E_T[σ²]`` and epistemic ``Var_T[μ]`` for a model predicting mean and variance.

    ``mean`` and ``var``: the predicted mean ``μ`` and variance ``σ²`` of ``T`` Monte Carlo
    forward passes, both of shape ``(T, N, ...)``. Returns two arrays of shape ``(N, ...)`` in the
    squared units of the target; the variance over ``T`` divides by ``T`` (population variance),
    so their sum is the variance of the predictive mixture (Kendall & Gal 2017).
    """
    m, was_numpy = _tensor(mean, "mean")
    v, var_numpy = _tensor(var, "var")
    if var_numpy != was_numpy:
        raise TypeError("mean and var must both be numpy arrays or both torch tensors")
    if m.ndim < 2 or min(m.shape) < 1:
        raise ValueError(f"mean must have shape (T, N, ...) (samples, examples, ...), got {tuple(m.shape)}")
    if v.shape != m.shape:
        raise ValueError(f"var must have the shape of mean {tuple(m.shape)}, got {tuple(v.shape)}")
    for t, name in ((m, "mean"), (v, "var")):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        finite(t.detach(), name)
    if bool((v.detach() < 0).any()):
        raise ValueError(
            f"var must hold variances (>= 0), got values down to {v.min().item():.4g}: if the model predicts "
            "log-variances, pass their exp()"
        )
    return _back(v.mean(0), was_numpy), _back(m.var(0, correction=0), was_numpy)
