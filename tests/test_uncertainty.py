"""vinn.uncertainty against inline numpy references, hand-computed cases and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from vinn.uncertainty import (
    auroc,
    brier_score,
    confidence_score,
    expected_calibration_error,
    mutual_information,
    predictive_entropy,
    regression_uncertainty,
    uncertainty,
)


def dirichlet_samples(t: int = 20, n: int = 50, c: int = 4) -> np.ndarray:
    """(T, N, C) probabilities; a small concentration gives spread-out, sometimes near-certain samples."""
    return np.random.default_rng(0).dirichlet(np.full(c, 0.7), size=(t, n))


def reference(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kwon et al. (2018) decomposition and Deodato et al. (2020) confidence, written out in numpy."""
    p_mean = p.mean(0)
    aleatoric = (p - p**2).mean(0)
    epistemic = ((p - p_mean) ** 2).mean(0)
    u = (aleatoric + epistemic)[np.arange(p.shape[1]), p_mean.argmax(1)]
    return aleatoric, epistemic, 1 - 2 * np.sqrt(u)


def reference_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Guo et al. (2017) ECE as the usual loop over bins (lower, upper]."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    ece = 0.0
    for k in range(n_bins):
        in_bin = (confidence > k / n_bins) & (confidence <= (k + 1) / n_bins)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


@pytest.mark.parametrize("kind", ["numpy", "float32", "float64"])
def test_confidence_and_uncertainty_match_reference(kind):
    p = dirichlet_samples()
    aleatoric, epistemic, confidence = reference(p)
    x = p if kind == "numpy" else torch.tensor(p, dtype=getattr(torch, kind))
    out = [*uncertainty(x), confidence_score(x)]
    tol = 1e-5 if kind == "float32" else 1e-12
    for got, want in zip(out, [aleatoric, epistemic, confidence]):
        if kind == "numpy":
            assert isinstance(got, np.ndarray) and got.dtype == np.float64
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == x.dtype and got.device == x.device
            got = got.numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_numpy_float32_stays_float32():
    p = dirichlet_samples().astype(np.float32)
    assert confidence_score(p).dtype == np.float32
    assert all(a.dtype == np.float32 for a in uncertainty(p))
    assert predictive_entropy(p).dtype == mutual_information(p).dtype == np.float32


def test_reversed_numpy_view_is_accepted():
    p = dirichlet_samples()[::-1]  # negative strides, which torch.from_numpy alone rejects
    np.testing.assert_allclose(confidence_score(p), reference(p)[2], rtol=1e-12)


def test_decomposition_sums_to_bernoulli_variance_of_mean():
    p = dirichlet_samples()
    aleatoric, epistemic = uncertainty(p)
    p_mean = p.mean(0)
    np.testing.assert_allclose(aleatoric + epistemic, p_mean * (1 - p_mean), rtol=1e-12, atol=1e-15)
    assert (aleatoric >= 0).all() and (epistemic >= 0).all()
    assert ((0 <= confidence_score(p)) & (confidence_score(p) <= 1)).all()


def test_identical_samples_have_no_epistemic_uncertainty():
    p = np.repeat(dirichlet_samples(t=1), 8, axis=0)
    aleatoric, epistemic = uncertainty(p)
    # mean_T of 8 equal floats can differ from them in the last bit, hence atol
    np.testing.assert_allclose(epistemic, 0, atol=1e-30)
    np.testing.assert_allclose(aleatoric, p[0] * (1 - p[0]), rtol=1e-12)
    mi = mutual_information(p)
    np.testing.assert_allclose(mi, 0, atol=1e-15)
    assert (mi >= 0).all()  # unclamped, rounding gives -2e-16 on 14 of these 50 examples
    np.testing.assert_allclose(predictive_entropy(p), -(p[0] * np.log(p[0])).sum(1), rtol=1e-12)


def test_confidence_extremes():
    certain = np.zeros((5, 1, 3))
    certain[:, 0, 1] = 1
    uniform = np.full((5, 1, 2), 0.5)
    assert confidence_score(certain)[0] == 1
    assert confidence_score(uniform)[0] == 0
    # an even split across samples: each sample certain, the mean maximally unsure
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    aleatoric, epistemic = uncertainty(disagree)
    np.testing.assert_array_equal(aleatoric, 0)
    np.testing.assert_array_equal(epistemic, [[0.25, 0.25]])
    assert confidence_score(disagree)[0] == 0


@pytest.mark.parametrize("c", [2, 3, 10])
def test_entropy_of_uniform_is_log_c(c):
    p = torch.full((4, 3, c), 1 / c, dtype=torch.float64)
    torch.testing.assert_close(predictive_entropy(p), torch.full((3,), math.log(c), dtype=torch.float64))
    torch.testing.assert_close(mutual_information(p), torch.zeros(3, dtype=torch.float64))


def test_entropy_treats_zero_probability_as_zero_contribution():
    p = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.5, 0.5]]])
    np.testing.assert_allclose(predictive_entropy(p), [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))])
    assert np.isfinite(mutual_information(p)).all()


def test_mutual_information_hand_computed():
    p = np.array([[[0.8, 0.2]], [[0.4, 0.6]]])

    def h(*q):
        return -sum(x * math.log(x) for x in q)

    entropy_of_mean = h(0.6, 0.4)
    mean_entropy = (h(0.8, 0.2) + h(0.4, 0.6)) / 2
    np.testing.assert_allclose(predictive_entropy(p), [entropy_of_mean], rtol=1e-12)
    np.testing.assert_allclose(mutual_information(p), [entropy_of_mean - mean_entropy], rtol=1e-12)
    assert entropy_of_mean - mean_entropy > 0.05
    # samples that are each certain but disagree: all of log 2 is epistemic
    np.testing.assert_allclose(mutual_information(np.array([[[1.0, 0.0]], [[0.0, 1.0]]])), [math.log(2)])


def test_mutual_information_is_nonnegative_and_below_entropy():
    p = torch.tensor(dirichlet_samples(), dtype=torch.float32)
    mi, h = mutual_information(p), predictive_entropy(p)
    assert (mi >= 0).all() and (mi <= h + 1e-6).all()
    assert mi.dtype == torch.float32 and mi.shape == (50,)


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.65, 0.35], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    # n_bins=5: bin (0.8,1]: 0.9 right; bin (0.6,0.8]: 0.7 wrong, 0.65 right; bin (0.4,0.6]: 0.55 right
    want = 1 / 4 * 0.1 + 2 / 4 * abs(0.5 - 0.675) + 1 / 4 * 0.45
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(want, abs=1e-12)
    assert expected_calibration_error(torch.tensor(probs), torch.tensor(labels), n_bins=5) == pytest.approx(want)


def test_ece_bins_are_closed_on_the_right():
    probs = np.array([[0.75, 0.25], [0.2, 0.8]])
    labels = np.array([0, 0])
    # 0.75 belongs to (0.5, 0.75], apart from 0.8: (0.25 + 0.8) / 2, not |1 - 1.55| / 2
    assert expected_calibration_error(probs, labels, n_bins=4) == pytest.approx(0.525, abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    probs = np.array([[0.8, 0.2]] * 5 + [[0.4, 0.6]] * 5)
    labels = np.array([0, 0, 0, 0, 1] + [1, 1, 1, 0, 0])  # 80% and 60% right
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0, abs=1e-12)
    # flipped labels: 20% right at 0.8 and 40% right at 0.6
    assert expected_calibration_error(probs, 1 - labels, n_bins=10) == pytest.approx(0.5 * 0.6 + 0.5 * 0.2)


def test_ece_matches_loop_reference_and_averages_samples():
    p = dirichlet_samples()
    labels = np.random.default_rng(1).integers(0, 4, size=50)
    for n_bins in (1, 7, 15):
        want = reference_ece(p.mean(0), labels, n_bins)
        got = expected_calibration_error(p, labels, n_bins=n_bins)
        assert isinstance(got, float)
        assert got == pytest.approx(want, abs=1e-12)
        assert got == pytest.approx(expected_calibration_error(p.mean(0), labels, n_bins=n_bins), abs=1e-12)
    got32 = expected_calibration_error(torch.tensor(p, dtype=torch.float32), torch.tensor(labels))
    assert got32 == pytest.approx(reference_ece(p.mean(0), labels, 15), abs=1e-5)


def test_tensor_results_keep_the_graph_and_ece_needs_none():
    logits = torch.randn(5, 3, 4, requires_grad=True)
    p = torch.softmax(logits, -1)
    confidence_score(p).sum().backward()
    assert logits.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad warns
        assert isinstance(expected_calibration_error(p, torch.tensor([0, 1, 2])), float)


def test_regression_uncertainty_hand_computed():
    mean = np.array([[1.0, 2.0], [3.0, 2.0]])  # (T=2, N=2)
    var = np.array([[0.5, 1.0], [1.5, 3.0]])
    aleatoric, epistemic = regression_uncertainty(mean, var)
    np.testing.assert_allclose(aleatoric, [1.0, 2.0])
    np.testing.assert_allclose(epistemic, [1.0, 0.0])  # divisor T: ((1-2)² + (3-2)²) / 2
    aleatoric_t, epistemic_t = regression_uncertainty(torch.tensor(mean), torch.tensor(var))
    assert isinstance(aleatoric_t, torch.Tensor) and aleatoric_t.dtype == torch.float64
    torch.testing.assert_close(aleatoric_t, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(epistemic_t, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_regression_uncertainty_shapes():
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=(6, 4, 3, 2)), rng.uniform(size=(6, 4, 3, 2))
    aleatoric, epistemic = regression_uncertainty(mean, var)
    assert aleatoric.shape == epistemic.shape == (4, 3, 2)
    np.testing.assert_allclose(epistemic, mean.var(0), rtol=1e-12)
    np.testing.assert_allclose(aleatoric, var.mean(0), rtol=1e-12)
    single = regression_uncertainty(torch.ones(1, 4, dtype=torch.float32), torch.ones(1, 4))
    assert single[1].dtype == torch.float32 and (single[1] == 0).all()


@pytest.mark.parametrize("fn", [uncertainty, confidence_score, predictive_entropy, mutual_information])
def test_bad_p(fn):
    with pytest.raises(TypeError, match="p must be a numpy array or torch tensor, got list"):
        fn([[[0.5, 0.5]]])
    with pytest.raises(ValueError, match=r"p must have shape \(T, N, C\) .*got shape \(5, 10\)"):
        fn(np.full((5, 10), 0.1))
    with pytest.raises(ValueError, match=r"p must have shape .*C >= 2.*got shape \(5, 10, 1\)"):
        fn(np.ones((5, 10, 1)))
    with pytest.raises(ValueError, match=r"p must have shape .*got shape \(0, 10, 2\)"):
        fn(torch.ones(0, 10, 2))
    with pytest.raises(TypeError, match="p must hold floating-point probabilities, got dtype torch.int64"):
        fn(np.ones((2, 3, 2), dtype=np.int64))


def test_bad_ece_arguments():
    probs, labels = np.full((4, 2), 0.5), np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="n_bins must be a positive int, got 0"):
        expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(TypeError, match="n_bins must be a positive int"):
        expected_calibration_error(probs, labels, n_bins=2.5)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(4,\).*got \(3,\)"):
        expected_calibration_error(probs, labels[:3])
    with pytest.raises(TypeError, match=r"labels of shape \(N,\) must hold integer class indices"):
        expected_calibration_error(probs, labels.astype(float))
    with pytest.raises(TypeError, match="labels must be a numpy array or torch tensor"):
        expected_calibration_error(probs, [0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 2\), got values in \[0, 2\]"):
        expected_calibration_error(probs, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"probs must have shape \(N, C\) .* or \(T, N, C\)"):
        expected_calibration_error(np.full(4, 0.5), labels)


def test_bad_regression_arguments():
    with pytest.raises(ValueError, match=r"var must have the shape of mean \(3, 4\), got \(3, 5\)"):
        regression_uncertainty(np.zeros((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"mean must have shape \(T, N, \.\.\.\)"):
        regression_uncertainty(np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="mean and var must both be numpy arrays or both torch tensors"):
        regression_uncertainty(np.zeros((3, 4)), torch.ones(3, 4))
    with pytest.raises(TypeError, match="var must be a numpy array or torch tensor"):
        regression_uncertainty(np.zeros((3, 4)), 1.0)
    with pytest.raises(TypeError, match="mean must be floating point"):
        regression_uncertainty(np.zeros((3, 4), dtype=np.int32), np.ones((3, 4)))


def test_brier_score_hand_computed():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = np.array([0, 2])
    # (0.09 + 0.04 + 0.01) and (0.25 + 0.25 + 1), averaged over the 2 examples
    assert brier_score(probs, labels) == pytest.approx((0.14 + 1.5) / 2)
    assert brier_score(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(0.82)
    samples = np.stack([probs, probs[:, [1, 0, 2]]])  # (T=2, N, C): averaged over T first
    assert brier_score(samples, labels) == pytest.approx(brier_score(samples.mean(0), labels))
    assert brier_score(np.eye(3), np.arange(3)) == 0.0


def test_auroc_hand_computed_and_ties():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(torch.ones(3), torch.ones(5)) == 0.5  # all ties count 1/2
    # pairs (in, out): 2>1, 2=2, 2<3, 5>1, 5>2, 5>3 -> (4 + 0.5) / 6
    assert auroc(np.array([2.0, 5.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(4.5 / 6)


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores_in = rng.normal(1.0, 1.0, 300).round(1)  # rounded: many ties
    scores_out = rng.normal(0.0, 1.0, 200).round(1)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[scores_in, scores_out])
    assert auroc(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)
    assert auroc(torch.tensor(scores_in), torch.tensor(scores_out)) == pytest.approx(expected, abs=1e-12)


def test_label_distributions_give_the_expected_ece_and_brier_score():
    torch.manual_seed(0)
    p = torch.softmax(3 * torch.randn(8, 50, 4, dtype=torch.float64), -1)
    labels = torch.randint(0, 4, (50,))
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    assert expected_calibration_error(p, onehot) == expected_calibration_error(p, labels)
    assert brier_score(p, onehot) == pytest.approx(brier_score(p, labels), abs=1e-12)
    # labels flipped to another class with probability 0.2: the expectation over every label draw
    q = 0.8 * onehot + 0.2 / 3 * (1 - onehot)
    outcomes = torch.arange(4)
    expected_brier = sum(q[i, c] * brier_score(p[:, i : i + 1], outcomes[c : c + 1]) for i in range(50) for c in range(4)) / 50
    assert brier_score(p, q) == pytest.approx(float(expected_brier), abs=1e-12)
    # one bin: |expected accuracy - confidence|, each prediction right with the probability q gives its class
    flat = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    assert expected_calibration_error(flat, torch.tensor([[0.8, 0.2], [0.6, 0.4]]), n_bins=1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="labels must sum to 1"):
        expected_calibration_error(flat, torch.tensor([[0.8, 0.8], [0.6, 0.4]]))
    with pytest.raises(TypeError, match="labels must hold floating-point probabilities"):
        brier_score(flat, torch.tensor([[1, 0], [0, 1]]))


def test_bad_brier_and_auroc_arguments():
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(2,\)"):
        brier_score(np.full((2, 2), 0.5), np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match="probs must be a numpy array or torch tensor"):
        brier_score([[0.5, 0.5]], np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"scores_out must have shape \(N,\) with N >= 1, got \(0,\)"):
        auroc(np.ones(3), np.ones(0))
    with pytest.raises(ValueError, match=r"scores_in must have shape \(N,\).*got \(2, 2\)"):
        auroc(np.ones((2, 2)), np.ones(3))
    with pytest.raises(ValueError, match="scores_in contains NaN"):
        auroc(np.array([np.nan]), np.ones(3))
    with pytest.raises(TypeError, match="scores_out must hold real scores"):
        auroc(np.ones(3), np.ones(3, dtype=bool))


# -- what is not a set of probabilities: logits, unnormalised scores, NaN -----------------------------


def _logits():
    return np.random.default_rng(0).normal(size=(5, 4, 3)) * 3


NOT_PROBABILITIES = {
    "logits": (_logits, r"p must hold probabilities in \[0, 1\].*looks like logits.*softmax.*vinn.predict"),
    "unnormalised": (lambda: np.full((5, 4, 3), 0.5), r"p must sum to 1 over the classes.*got sums in \[1.5, 1.5\]"),
    "sigmoids": (lambda: np.full((5, 4, 3), 0.1), r"p must sum to 1 over the classes"),
    "nan": (lambda: np.where(np.eye(3, dtype=bool)[:1], np.nan, 0.5)[None].repeat(5, 0).repeat(4, 1), r"p must hold probabilities, got NaN"),
}
PROBABILITY_FUNCTIONS = [uncertainty, confidence_score, predictive_entropy, mutual_information]


@pytest.mark.parametrize("case", NOT_PROBABILITIES)
@pytest.mark.parametrize("fn", PROBABILITY_FUNCTIONS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_not_probabilities_are_refused(case, fn, kind):
    make, match = NOT_PROBABILITIES[case]
    p = make()
    with pytest.raises(ValueError, match=match):
        fn(p if kind == "numpy" else torch.tensor(p))


@pytest.mark.parametrize("case", NOT_PROBABILITIES)
@pytest.mark.parametrize("metric", [expected_calibration_error, brier_score])
@pytest.mark.parametrize("averaged", [False, True])
def test_metrics_refuse_what_is_not_probabilities(case, metric, averaged):
    make, match = NOT_PROBABILITIES[case]
    p = make()
    if not averaged:
        p = p[0]
    with pytest.raises(ValueError, match=match.replace("^p", "probs").replace("p must", "probs must")):
        metric(p, np.zeros(4, dtype=np.int64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rounded_softmax_probabilities_are_accepted(dtype):
    p = torch.softmax(torch.randn(8, 16, 1000) * 4, -1).to(dtype)
    uncertainty(p)
    brier_score(p[0], torch.zeros(16, dtype=torch.long))
    rounded = np.round(np.random.default_rng(0).dirichlet(np.ones(5), size=(3, 4)), 3)  # three decimals, as printed
    uncertainty(rounded)


@pytest.mark.parametrize(
    "mean, var, match",
    [
        (np.zeros((3, 4)), np.full((3, 4), -0.5), r"var must hold variances \(>= 0\), got values down to -0.5.*exp\(\)"),
        (np.full((3, 4), np.nan), np.ones((3, 4)), "mean must hold finite values, got .* with NaN"),
        (np.zeros((3, 4)), np.full((3, 4), np.nan), "var must hold finite values, got .* with NaN"),
        (np.zeros((3, 4)), np.full((3, 4), np.inf), "var must hold finite values, got .* with an infinite value"),
    ],
)
def test_regression_uncertainty_refuses_nan_and_negative_variances(mean, var, match):
    with pytest.raises(ValueError, match=match):
        regression_uncertainty(mean, var)


def test_n_bins_takes_numpy_integers():
    probs, labels = np.full((4, 2), 0.5), np.zeros(4, dtype=np.int64)
    assert expected_calibration_error(probs, labels, n_bins=np.int64(3)) == expected_calibration_error(probs, labels, n_bins=3)
