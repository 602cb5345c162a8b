"""Last-layer Bayesian (`bayesify(model, last=1)`) versus full conversion of the same pretrained CNN.

    python examples/last_layer_vs_full.py [--epochs 3] [--fast]

A small deterministic CNN is trained on digits first; two Bayesian copies of it are then
fine-tuned with the ELBO for the same number of epochs, and compared on accuracy, calibration
(ECE), number of Bayesian parameters and the time taken by fine-tuning and by `vinn.predict`.
The last-layer recipe is the cheap one: few Bayesian parameters, and `vinn.predict` runs the
deterministic trunk once and only the last layer per sample.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import vinn

try:
    from digits import load_digits_tensors
    from lenet_digits import train
except ImportError:  # imported as examples.last_layer_vs_full
    from .digits import load_digits_tensors
    from .lenet_digits import train


def small_cnn() -> nn.Module:
    """A deterministic CNN for 1x16x16 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x8x8
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32x4x4
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def main(pretrain_epochs: int = 10, epochs: int = 3, samples: int = 32, fast: bool = False, seed: int = 0) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    if fast:
        pretrain_epochs, epochs, samples = 3, 1, 8
    x_train, y_train, x_test, y_test = load_digits_tensors(size=16)
    pretrained = small_cnn()
    train(pretrained, x_train, y_train, pretrain_epochs)  # no vinn layer: the plain NLL
    pretrained.eval()

    results = {}
    for name, keyword in (("last layer", {"last": 1}), ("full", {})):
        bnn = vinn.bayesify(pretrained, **keyword)  # pretrained itself is left unchanged
        start = time.perf_counter()
        train(bnn, x_train, y_train, epochs, lr=1e-3)  # a fine-tuning learning rate: start where pretraining ended
        finetune_seconds = time.perf_counter() - start
        bnn.eval()
        start = time.perf_counter()
        p = vinn.predict(bnn, x_test, samples=samples)
        predict_seconds = time.perf_counter() - start
        results[name] = {
            "accuracy": (p.mean(0).argmax(1) == y_test).float().mean().item(),
            "ece": vinn.expected_calibration_error(p, y_test),
            "bayesian_parameters": bnn.conversion_report.bayesian_parameters,
            "finetune_seconds": finetune_seconds,
            "predict_seconds": predict_seconds,
        }

    print(f"{'':12}{'accuracy':>10}{'ECE':>8}{'Bayesian params':>17}{'fine-tune s':>13}{'predict s':>11}")
    for name, r in results.items():
        print(
            f"{name:12}{r['accuracy']:10.3f}{r['ece']:8.3f}{r['bayesian_parameters']:17,}"
            f"{r['finetune_seconds']:13.2f}{r['predict_seconds']:11.3f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fast", action="store_true", help="tiny settings, for tests")
    args = parser.parse_args()
    main(args.pretrain_epochs, args.epochs, fast=args.fast)
