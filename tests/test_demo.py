"""The demo end to end: fast mode for the artefacts, full settings for the Bayesian model's claims."""

from __future__ import annotations

import math

import demo
import pytest
import readme_blocks
import torch
from torch import nn

METRICS = ["accuracy", "NLL", "ECE", "Brier score", "confidence right", "confidence wrong",
           "AUROC noise", "AUROC rotated", "AUROC inverted", "AUROC unseen 9s", "AUROC mean OOD"]  # fmt: skip


def test_fast_demo_writes_checkpoint_figures_table_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    start, end = readme_blocks.markers(demo.README_BLOCK)
    readme.write_text(f"# title\n\nbefore\n{start}\nold results\n{end}\nafter\n")
    out = tmp_path / "docs" / "figures"
    result = demo.main(str(out), epochs=6, finetune_epochs=2, samples=4, readme=str(readme))

    assert (out / "pretrained.pt").exists()
    for name in demo.FIGURES:
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert list(result) == ["deterministic", "Bayesian"]
    for metrics in result.values():
        assert list(metrics) == METRICS
    text = readme.read_text()
    assert "old results" not in text
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{end}\nafter\n")
    assert "| metric | deterministic | Bayesian |" in text
    assert all(f"| {metric} |" in text for metric in METRICS)
    assert all(f"](docs/figures/{name}.png)" in text for name in demo.FIGURES)  # relative to the README


def test_readme_without_one_marker_block_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="must hold exactly one"):
        readme_blocks.rewrite_block(readme, "results", "table")
    start, end = readme_blocks.markers("results")
    readme.write_text(f"{start}\n{end}\n" * 2)
    with pytest.raises(ValueError, match="must hold exactly one"):
        readme_blocks.rewrite_block(readme, "results", "table")


@pytest.mark.slow
def test_full_demo_bayesian_model_is_better_calibrated_and_detects_out_of_distribution_better(tmp_path):
    # The claim, on the demo's default settings (seed 0): the README reports these figures.
    result = demo.main(str(tmp_path))
    deterministic, bayesian = result["deterministic"], result["Bayesian"]
    assert deterministic["accuracy"] > 0.95  # 10% of the training labels are wrong
    assert abs(bayesian["accuracy"] - deterministic["accuracy"]) <= 0.01
    assert bayesian["ECE"] < deterministic["ECE"]
    assert bayesian["AUROC mean OOD"] > deterministic["AUROC mean OOD"]
    assert bayesian["NLL"] < deterministic["NLL"]
    if not math.isnan(bayesian["confidence wrong"]):  # NaN: no wrong prediction at all
        assert bayesian["confidence wrong"] < bayesian["confidence right"]
    for metrics in result.values():
        assert metrics["AUROC mean OOD"] > 0.8


def test_noisy_labels_flip_the_given_fraction_to_other_classes():
    y = torch.arange(1000) % demo.N_CLASSES
    noisy = demo.noisy_labels(y, 0.1, seed=0)
    changed = noisy != y
    assert changed.sum().item() == 100
    assert noisy.min().item() >= 0 and noisy.max().item() < demo.N_CLASSES
    assert torch.equal(demo.noisy_labels(y, 0.1, seed=0), noisy)  # reproducible
    assert not torch.equal(demo.noisy_labels(y, 0.1, seed=1), noisy)
    # the wrong labels are spread over all the other classes
    assert len(set(zip(y[changed].tolist(), noisy[changed].tolist()))) > demo.N_CLASSES * (demo.N_CLASSES - 1) // 2


def test_fit_with_frozen_batch_norm_keeps_running_statistics_and_decays_the_learning_rate():
    torch.manual_seed(0)
    model = demo.SmallResNet(width=4)
    x, y = torch.rand(70, 1, 16, 16), torch.randint(0, demo.N_CLASSES, (70,))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    weights = model.head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    demo.fit(model, nn.CrossEntropyLoss(), optimizer, x, y, epochs=2, desc="test", freeze_batch_norm=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert not torch.equal(model.head.weight, weights)  # the rest trained
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at the end
    demo.fit(model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1), x, y, epochs=1, desc="test")
    assert not torch.equal(model.state_dict()["stem.1.running_mean"], stats["stem.1.running_mean"])
