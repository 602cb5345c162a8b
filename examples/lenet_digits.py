"""The seed's LeNet written with vinn layers, trained from scratch with the ELBO on digits.

    python examples/lenet_digits.py [--epochs 15]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import vinn

try:
    from digits import load_digits_tensors
except ImportError:  # imported as examples.lenet_digits
    from .digits import load_digits_tensors


class Net(vinn.Module):  # class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = vinn.Conv2d(1, 6, 5)  # nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = vinn.Conv2d(6, 16, 5)
        self.fc1 = vinn.Linear(256, 120)
        self.fc2 = vinn.Linear(120, 84)
        self.fc3 = vinn.Linear(84, 10)

    def forward(self, x):  # x: (N, 1, 28, 28)
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # logits (N, 10)


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int = 64, lr: float = 1e-2) -> None:
    """Minibatch training with the ELBO (the KL weight follows from the dataset size); a model
    without vinn layers, pretrained before `vinn.bayesify`, with the cross-entropy alone."""
    bayesian = any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    elbo = vinn.ELBO(net, nn.CrossEntropyLoss(), dataset_size=len(x)) if bayesian else nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(batch_size):
            optimizer.zero_grad()
            loss = elbo(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 32) -> dict[str, float]:
    """Accuracy of the Monte Carlo mean prediction and mean confidence score on right and wrong digits."""
    net.eval()
    p = vinn.predict(net, x, samples=samples)
    correct = p.mean(0).argmax(1) == y
    confidence = vinn.confidence_score(p)
    return {
        "accuracy": correct.float().mean().item(),
        "confidence_correct": confidence[correct].mean().item(),
        "confidence_wrong": confidence[~correct].mean().item() if (~correct).any() else float("nan"),
        "ece": vinn.expected_calibration_error(p, y),
    }


def main(epochs: int = 15, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors()
    net = Net()
    train(net, x_train, y_train, epochs)
    metrics = evaluate(net, x_test, y_test)
    print(
        f"test accuracy {metrics['accuracy']:.3f} | mean confidence: correct {metrics['confidence_correct']:.3f}, "
        f"wrong {metrics['confidence_wrong']:.3f} | ECE {metrics['ece']:.3f}"
    )
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    main(parser.parse_args().epochs)
