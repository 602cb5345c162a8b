"""vinn.plot: each function draws the expected panels and artists, and rejects bad input clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

import vinn
from vinn.plot import (
    confidence_histograms,
    image_grid,
    reliability_diagram,
    uncertainty_scatter,
)


@pytest.fixture
def probs_and_labels():
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(4, 50, 3, generator=generator).softmax(-1)  # (T, N, C)
    return probs, torch.randint(0, 3, (50,), generator=generator)


def test_reliability_diagram_has_one_panel_per_model_with_ece_in_title(probs_and_labels, tmp_path):
    probs, labels = probs_and_labels
    figure = reliability_diagram({"deterministic": probs[0].numpy(), "Bayesian": probs}, labels, n_bins=5)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2
    left, right = figure.axes
    assert left.get_title().startswith("deterministic: ECE ")
    assert right.get_title().startswith("Bayesian: ECE ")
    filled_bins = len(np.unique(np.ceil(probs.mean(0).max(1).values.numpy() * 5)))
    assert len(right.patches) == 2 * filled_bins  # accuracy and gap bar per non-empty bin
    figure.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_reliability_diagram_titles_agree_with_the_ece_metric_by_default(probs_and_labels):
    probs, labels = probs_and_labels
    (axis,) = reliability_diagram({"m": probs}, labels).axes
    assert axis.get_title() == f"m: ECE {vinn.expected_calibration_error(probs, labels):.3f}"


def test_confidence_histograms_one_panel_or_one_per_model():
    scores = {"correct": np.random.rand(30), "wrong": torch.rand(5), "noise": np.random.rand(20)}
    single = confidence_histograms(scores, bins=10)
    assert len(single.axes) == 1 and len(single.axes[0].patches) == 3  # one step outline per group
    panels = confidence_histograms({"deterministic": scores, "Bayesian": scores})
    assert [ax.get_title() for ax in panels.axes] == ["deterministic", "Bayesian"]


def test_confidence_histograms_keep_an_empty_group_in_the_legend():
    # a model that gets every example right has no "wrong" scores: the figure must still be drawn
    figure = confidence_histograms({"correct": np.random.rand(30), "wrong": np.zeros(0)})
    ax = figure.axes[0]
    assert len(ax.patches) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["correct (30)", "wrong (0)"]


def test_uncertainty_scatter_splits_correct_and_wrong():
    correct = np.arange(10) % 3 > 0
    figure = uncertainty_scatter(np.random.rand(10) / 4, torch.rand(10) / 4, correct)
    (ax,) = figure.axes
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [len(c.get_offsets()) for c in collections] == [correct.sum(), (~correct).sum()]


def test_image_grid_one_image_per_title_in_rows():
    figure = image_grid(torch.rand(10, 1, 8, 8), [str(i) for i in range(10)], n_columns=4)
    assert len(figure.axes) == 10  # 3 rows of 4, the 2 unused panels removed
    assert all(isinstance(ax.get_images()[0], AxesImage) for ax in figure.axes)
    assert figure.axes[3].get_title() == "3"


def test_bad_input_names_the_argument(probs_and_labels):
    probs, labels = probs_and_labels
    with pytest.raises(TypeError, match="probs_by_model must be a dict"):
        reliability_diagram(probs, labels)
    with pytest.raises(ValueError, match="probs_by_model must not be empty"):
        reliability_diagram({}, labels)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(50,\)"):
        reliability_diagram({"m": probs}, labels[:10])
    with pytest.raises(TypeError, match="n_bins must be a positive int"):
        reliability_diagram({"m": probs}, labels, n_bins=2.0)
    with pytest.raises(TypeError, match=r"scores\['wrong'\] must be a numpy array or torch tensor, got list"):
        confidence_histograms({"wrong": [0.5]})
    with pytest.raises(ValueError, match="bins must be a positive int, got 0"):
        confidence_histograms({"a": np.ones(3)}, bins=0)
    with pytest.raises(ValueError, match="aleatoric, epistemic and correct must have the same shape"):
        uncertainty_scatter(np.ones(3), np.ones(4), np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="correct must hold booleans"):
        uncertainty_scatter(np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\) or \(N, 1, H, W\)"):
        image_grid(np.ones((2, 3, 8, 8)), ["a", "b"])
    with pytest.raises(ValueError, match=r"titles must have one string per image \(2\), got 1"):
        image_grid(np.ones((2, 8, 8)), ["a"])
