"""Figures of predictive uncertainty, for your own data as for the demo (optional: needs matplotlib).

Every function takes numpy arrays or torch tensors and returns a `matplotlib.figure.Figure`
built without pyplot, so it needs no display, leaves no global figure open and works under any
backend; save it with ``fig.savefig("name.png")``. matplotlib is imported inside the functions:
``import vinn`` never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from .uncertainty import ECE_BINS, expected_calibration_error
from .validation import integer, wrong_type

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["confidence_histograms", "image_grid", "reliability_diagram", "uncertainty_scatter"]

_PANEL_SIZE = 3.6  # inches per panel: readable in a README at GitHub's column width


def _array(x: object, name: str, ndim: tuple[int, ...], empty: bool = False) -> np.ndarray:
    """``x`` as a numpy array of one of the ranks in ``ndim``, with at least one element unless ``empty``."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim not in ndim or (x.size == 0 and not empty):
        raise ValueError(f"{name} must be a non-empty array with {' or '.join(map(str, ndim))} dimensions, got shape {x.shape}")
    return x


def _figure(n_panels: int, n_columns: int | None = None, panel_size: float = _PANEL_SIZE) -> tuple[Figure, np.ndarray]:
    from matplotlib.figure import Figure

    n_columns = n_columns or n_panels
    n_rows = math.ceil(n_panels / n_columns)
    figure = Figure(figsize=(panel_size * n_columns, panel_size * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
    for unused in axes[n_panels:]:
        figure.delaxes(unused)
    return figure, axes[:n_panels]


def _non_empty_mapping(x: object, name: str) -> Mapping:
    if not isinstance(x, Mapping):
        raise wrong_type(name, "a dict", x)
    if not x:
        raise ValueError(f"{name} must not be empty")
    return x


def reliability_diagram(probs_by_model: Mapping[str, object], labels: object, n_bins: int = ECE_BINS) -> Figure:
    """One reliability diagram per model, side by side: accuracy against confidence in each bin.

    ``probs_by_model``: ``{model name: probs}``, each ``(N, C)`` predictive probabilities or
    ``(T, N, C)`` Monte Carlo samples (averaged over ``T``). ``labels``: ``(N,)`` class indices.
    Confidence is the max probability, in ``n_bins`` equal-width bins; bars show each bin's
    accuracy, the red part the gap to perfect calibration (the diagonal). Each title gives the
    model's expected calibration error (`vinn.expected_calibration_error` with these bins; the
    default is the metric's, so the titles agree with it).
    """
    _non_empty_mapping(probs_by_model, "probs_by_model")
    integer(n_bins, "n_bins")
    labels = _array(labels, "labels", (1,))
    figure, axes = _figure(len(probs_by_model))
    edges = np.linspace(0, 1, n_bins + 1)
    for ax, (model_name, probs) in zip(axes, probs_by_model.items()):
        probs = _array(probs, f"probs_by_model[{model_name!r}]", (2, 3))
        ece = expected_calibration_error(probs, labels, n_bins=n_bins)  # also validates the shapes
        mean = probs.mean(0) if probs.ndim == 3 else probs
        confidence, correct = mean.max(1), mean.argmax(1) == labels
        # bins (k/n, (k+1)/n], as in expected_calibration_error
        bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
        counts = np.bincount(bins, minlength=n_bins)
        filled = counts > 0
        accuracy = np.bincount(bins, correct, minlength=n_bins)[filled] / counts[filled]
        mean_confidence = np.bincount(bins, confidence, minlength=n_bins)[filled] / counts[filled]
        left, width = edges[:-1][filled], 1 / n_bins
        ax.bar(left, accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
        ax.bar(left, mean_confidence - accuracy, bottom=accuracy, width=width, align="edge",
               color="tab:red", alpha=0.4, edgecolor="tab:red", label="gap")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy")
        ax.set_title(f"{model_name}: ECE {ece:.3f}")
        ax.legend(loc="upper left", fontsize="small")
    return figure


def confidence_histograms(scores: Mapping[str, object], bins: int = 20) -> Figure:
    """Histograms of a confidence score in ``[0, 1]`` for groups of inputs, overlaid.

    ``scores``: ``{group name: (N,) scores}`` (e.g. "correct", "wrong", "noise") for one panel,
    or ``{panel title: {group name: (N,) scores}}`` for panels side by side with shared axes
    (e.g. one per model). Each histogram is normalised to a density, so groups of different
    sizes compare.
    """
    scores = _non_empty_mapping(scores, "scores")
    panels = scores if all(isinstance(v, Mapping) for v in scores.values()) else {"": scores}
    integer(bins, "bins")
    figure, axes = _figure(len(panels))
    edges = np.linspace(0, 1, bins + 1)
    for ax, (title, groups) in zip(axes, panels.items()):
        groups = _non_empty_mapping(groups, f"scores[{title!r}]")
        for group_name, group_scores in groups.items():
            # a group may be empty (a model with no wrong prediction): it stays in the legend, as (0)
            group_scores = _array(group_scores, f"scores[{group_name!r}]", (1,), empty=True)
            label = f"{group_name} ({len(group_scores)})"
            if len(group_scores):
                ax.hist(group_scores, bins=edges, density=True, histtype="step", linewidth=1.5, label=label)
            else:
                ax.plot([], [], label=label)
        ax.set(xlim=(0, 1), xlabel="confidence score", ylabel="density", title=title)
        ax.legend(loc="upper left", fontsize="small")
    return figure


def uncertainty_scatter(aleatoric: object, epistemic: object, correct: object) -> Figure:
    """Aleatoric against epistemic uncertainty, one point per example, correct and wrong apart.

    ``aleatoric``, ``epistemic``: ``(N,)``, e.g. the columns of the predicted class in the two
    outputs of `vinn.uncertainty`. ``correct``: ``(N,)`` booleans, whether each prediction is right.
    """
    aleatoric = _array(aleatoric, "aleatoric", (1,))
    epistemic = _array(epistemic, "epistemic", (1,))
    correct = _array(correct, "correct", (1,))
    if not aleatoric.shape == epistemic.shape == correct.shape:
        raise ValueError(f"aleatoric, epistemic and correct must have the same shape (N,), got "
                         f"{aleatoric.shape}, {epistemic.shape}, {correct.shape}")  # fmt: skip
    if correct.dtype != bool:
        raise TypeError(f"correct must hold booleans, got dtype {correct.dtype}")
    figure, (ax,) = _figure(1, panel_size=4.5)
    for chosen, label, color in ((correct, "correct", "tab:blue"), (~correct, "wrong", "tab:red")):
        ax.scatter(aleatoric[chosen], epistemic[chosen], s=10, alpha=0.6, color=color, label=f"{label} ({chosen.sum()})")
    ax.set(xlabel="aleatoric variance", ylabel="epistemic variance", title="uncertainty of the predicted class")
    ax.legend(fontsize="small")
    return figure


def image_grid(images: object, titles: Sequence[str], n_columns: int = 8) -> Figure:
    """Grayscale images in a grid, each with its title (e.g. prediction and confidence).

    ``images``: ``(N, H, W)`` or ``(N, 1, H, W)``; ``titles``: ``N`` strings. ``n_columns`` images
    per row.
    """
    images = _array(images, "images", (3, 4))
    if images.ndim == 4:
        if images.shape[1] != 1:
            raise ValueError(f"images must be (N, H, W) or (N, 1, H, W) (grayscale), got shape {images.shape}")
        images = images[:, 0]
    if isinstance(titles, str) or not isinstance(titles, Sequence) or not all(isinstance(t, str) for t in titles):
        raise TypeError("titles must be a sequence of strings, one per image")
    if len(titles) != len(images):
        raise ValueError(f"titles must have one string per image ({len(images)}), got {len(titles)}")
    integer(n_columns, "n_columns")
    figure, axes = _figure(len(images), min(n_columns, len(images)), panel_size=1.4)
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(title, fontsize="small")
        ax.set_axis_off()
    return figure
