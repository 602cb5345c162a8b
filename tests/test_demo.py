"""The demo end to end: fast mode for the artefacts, full settings for the Bayesian model's claims."""

from __future__ import annotations

import math

import demo
import pytest

METRICS = ["accuracy", "NLL", "ECE", "Brier score", "confidence right", "confidence wrong",
           "AUROC noise", "AUROC rotated", "AUROC inverted", "AUROC unseen 9s", "AUROC mean OOD"]  # fmt: skip


def test_fast_demo_writes_checkpoint_figures_table_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{demo.README_START}\nold results\n{demo.README_END}\nafter\n")
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
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{demo.README_END}\nafter\n")
    assert "| metric | deterministic | Bayesian |" in text
    assert all(f"| {metric} |" in text for metric in METRICS)
    assert all(f"](docs/figures/{name}.png)" in text for name in demo.FIGURES)  # relative to the README


def test_readme_without_one_marker_block_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="must hold exactly one"):
        demo.rewrite_readme_block(readme, "table")
    readme.write_text(f"{demo.README_START}\n{demo.README_END}\n" * 2)
    with pytest.raises(ValueError, match="must hold exactly one"):
        demo.rewrite_readme_block(readme, "table")


@pytest.mark.slow
def test_full_demo_keeps_accuracy_and_separates_right_wrong_and_out_of_distribution(tmp_path):
    # The Bayesian model's ECE and mean OOD AUROC are not asserted better than the deterministic
    # model's: on these digits that depends on the fine-tuning seed (measured, see examples/demo.py).
    result = demo.main(str(tmp_path))
    deterministic, bayesian = result["deterministic"], result["Bayesian"]
    assert deterministic["accuracy"] > 0.99
    assert abs(bayesian["accuracy"] - deterministic["accuracy"]) <= 0.01
    assert bayesian["ECE"] < 0.02
    if not math.isnan(bayesian["confidence wrong"]):  # NaN: no wrong prediction at all
        assert bayesian["confidence wrong"] < bayesian["confidence right"]
    for metrics in result.values():
        assert all(metrics[f"AUROC {name}"] > 0.9 for name in ["noise", "rotated", "inverted", "unseen 9s"])
