"""The demo's pipeline, in a fast mode: a model pretrained here on digits, bayesified, fine-tuned."""

import pytest

import demo


@pytest.mark.slow
def test_pretrained_digits_model_bayesified_and_fine_tuned(tmp_path):
    result = demo.main(str(tmp_path), epochs=15, finetune_epochs=4, samples=16)
    assert (tmp_path / "pretrained.pt").exists()
    deterministic, bayesian = result["deterministic"], result["bayesian"]
    assert deterministic["accuracy"] > 0.95
    assert abs(bayesian["accuracy"] - deterministic["accuracy"]) <= 0.01
    assert bayesian["confidence wrong"] < bayesian["confidence right"]
