"""The main job, end to end: a pretrained model in, a calibrated Bayesian model out.

    python examples/demo.py [--out runs/demo] [--epochs 30] [--finetune-epochs 10] [--samples 32]

1. trains a small deterministic ResNet-style CNN on scikit-learn's digits (the "pretrained"
   model) and saves it as a checkpoint;
2. loads the checkpoint, turns the model into a Bayesian one with `vinn.bayesify` and fine-tunes it
   with `vinn.ELBO`;
3. compares the two on held-out digits and on out-of-distribution inputs (noise, inverted digits):
   accuracy, NLL, expected calibration error, and the confidence score on right, wrong and
   out-of-distribution inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import vinn

try:
    from digits import load_digits_tensors
except ImportError:  # imported as examples.demo
    from .digits import load_digits_tensors

IMAGE_SIZE = 16


class Block(nn.Module):
    """A residual block: two 3x3 convolutions with batch norm, identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """(N, 1, 16, 16) digits -> (N, 10) logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.layer2 = Block(2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def fit(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, desc: str) -> None:
    """Adam on minibatches of 64, with a progress bar."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()


def out_of_distribution(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs no digit looks like: uniform noise, and digits with ink and paper swapped."""
    generator = torch.Generator().manual_seed(seed)
    return {"noise": torch.rand(x.shape, generator=generator), "inverted": 1.0 - x}


def report(p: torch.Tensor, y: torch.Tensor, ood: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics from predictive samples p (T, N, C) on test digits and ood {name: (T, M, C)}."""
    mean = p.mean(0)
    correct = mean.argmax(1) == y
    confidence = vinn.confidence_score(p)
    metrics = {
        "accuracy": correct.float().mean().item(),
        "nll": F.nll_loss(mean.clamp_min(1e-12).log(), y).item(),
        "ece": vinn.expected_calibration_error(p, y),
        "confidence right": confidence[correct].mean().item(),
        "confidence wrong": confidence[~correct].mean().item() if (~correct).any() else float("nan"),
    }
    for name, q in ood.items():
        metrics[f"confidence {name}"] = vinn.confidence_score(q).mean().item()
    return metrics


def main(out: str = "runs/demo", epochs: int = 30, finetune_epochs: int = 10, samples: int = 32, seed: int = 0) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(size=IMAGE_SIZE)
    ood = out_of_distribution(x_test)
    checkpoint = Path(out) / "pretrained.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)

    # 1. the "pretrained" deterministic model
    pretrained = SmallResNet()
    fit(pretrained, nn.CrossEntropyLoss(), x_train, y_train, epochs, lr=3e-3, desc="pretraining")
    torch.save(pretrained.state_dict(), checkpoint)

    # 2. load it, make it Bayesian, fine-tune with the ELBO
    model = SmallResNet()
    model.load_state_dict(torch.load(checkpoint))
    bnn = vinn.bayesify(model)
    print(bnn.conversion_report)
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=len(x_train))
    fit(bnn, elbo, x_train, y_train, finetune_epochs, lr=1e-3, desc="fine-tuning")

    # 3. compare: the deterministic model is one "sample" of itself
    model.eval(), bnn.eval()
    with torch.no_grad():
        deterministic = report(model(x_test).softmax(1)[None], y_test, {k: model(v).softmax(1)[None] for k, v in ood.items()})
    bayesian = report(
        vinn.predict(bnn, x_test, samples=samples), y_test, {k: vinn.predict(bnn, v, samples=samples) for k, v in ood.items()}
    )
    print(f"\n{'':22s}{'deterministic':>15s}{'Bayesian':>12s}")
    for key in deterministic:
        print(f"{key:22s}{deterministic[key]:15.3f}{bayesian[key]:12.3f}")
    return {"deterministic": deterministic, "bayesian": bayesian}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    main(args.out, args.epochs, args.finetune_epochs, args.samples)
