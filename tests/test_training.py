"""End to end: the seed's LeNet of vinn layers, trained with the ELBO on digits."""

import lenet_digits


def test_lenet_learns_digits_and_knows_when_it_is_wrong():
    metrics = lenet_digits.main(epochs=10)
    assert metrics["accuracy"] >= 0.90
    assert metrics["confidence_wrong"] < metrics["confidence_correct"]
