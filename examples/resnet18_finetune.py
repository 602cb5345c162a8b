"""A torchvision ResNet-18 made Bayesian with vinn.bayesify and fine-tuned on digits with the ELBO.

    python examples/resnet18_finetune.py [--epochs 3] [--fast]

Here the ResNet starts untrained (no download at run time); on your own machine, start from
ImageNet weights by changing one line (see `build_model`).
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn

import vinn

try:
    from digits import load_digits_tensors
    from lenet_digits import evaluate, train
except ImportError:  # imported as examples.resnet18_finetune
    from .digits import load_digits_tensors
    from .lenet_digits import evaluate, train


def build_model() -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    # From ImageNet weights instead (downloads once), replace the line above with:
    #   model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.DEFAULT); model.fc = nn.Linear(512, 10)
    return model


def main(epochs: int = 3, samples: int = 16, fast: bool = False, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(size=32)
    # ResNet expects RGB: repeat the grey channel
    x_train, x_test = x_train.expand(-1, 3, -1, -1), x_test.expand(-1, 3, -1, -1)
    if fast:  # a few hundred examples, two epochs, few samples: enough to be well above chance
        x_train, y_train, x_test, y_test = x_train[:512], y_train[:512], x_test[:128], y_test[:128]
        epochs, samples = 2, 4
    bnn = vinn.bayesify(build_model())
    print(f"Bayesian parameters: {bnn.conversion_report.bayesian_parameters:,}")
    train(bnn, x_train, y_train, epochs, batch_size=32, lr=1e-3)
    metrics = evaluate(bnn, x_test, y_test, samples=samples)
    print(
        f"test accuracy {metrics['accuracy']:.3f} | mean confidence: correct {metrics['confidence_correct']:.3f}, "
        f"wrong {metrics['confidence_wrong']:.3f}"
    )
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fast", action="store_true", help="tiny settings, for tests")
    args = parser.parse_args()
    main(args.epochs, fast=args.fast)
