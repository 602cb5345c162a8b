"""1-D heteroscedastic regression with a gap in the training inputs: aleatoric versus epistemic uncertainty.

    python examples/regression.py [--epochs 3000] [--plot regression.png] [--fast]

The network predicts a mean and a variance (aleatoric noise, learnt from the data); sampling
its weights spreads the predicted mean (epistemic uncertainty, from too little data). The noise
grows with |x|, so aleatoric uncertainty does too; no training input lies in (-1, 1), so
epistemic uncertainty is largest there.

The hidden units are local bumps exp(-h²) (like RBF features) rather than tanh or ReLU: a bump
unit that sits in the gap never sees data, so its posterior stays wide there. Every monotone unit
active in the gap is active on training data too, and mean-field VI with such units is known to
give *less* epistemic uncertainty between two clusters of data than on them (Foong et al. 2019,
"'In-Between' Uncertainty in Bayesian Neural Networks"); try it by swapping the activation.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vinn

GAP = (-1.0, 1.0)
TRAIN_RANGE = (-4.0, 4.0)


def make_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x uniform on [-4, -1] ∪ [1, 4]; y = x sin(x) + noise of standard deviation 0.1 + 0.1 |x|."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = GAP[1] + (TRAIN_RANGE[1] - GAP[1]) * torch.rand(n, 1, generator=generator)
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    x = sign * magnitude
    noise_std = 0.1 + 0.1 * x.abs()
    return x, x * torch.sin(x) + noise_std * torch.randn(n, 1, generator=generator)


class Bump(nn.Module):
    """exp(-h²): a unit responds only near the input where its pre-activation is 0."""

    def forward(self, h: Tensor) -> Tensor:
        return torch.exp(-h.square())


class HeteroscedasticNet(vinn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(vinn.Linear(1, hidden), Bump())
        self.mean = vinn.Linear(hidden, 1)
        self.var = vinn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        # softplus, not exp: in the gap the head's weights are as uncertain as the prior, and exp of
        # them would give heavy-tailed variances; the floor keeps the NLL finite
        return self.mean(h), F.softplus(self.var(h)) + 1e-3


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 1e-2) -> None:
    """Full-batch training with the ELBO; GaussianNLLLoss's variance follows the targets."""
    elbo = vinn.ELBO(model, nn.GaussianNLLLoss(reduction="sum"), dataset_size=len(x))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        mean, var = model(x)
        elbo(mean, y, var).backward()
        optimizer.step()


def plot(path: str, x_train: Tensor, y_train: Tensor, x: Tensor, mean: Tensor, aleatoric: Tensor, epistemic: Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, mean = x.squeeze(1), mean.squeeze(1)
    total_std, epistemic_std = (aleatoric + epistemic).sqrt().squeeze(1), epistemic.sqrt().squeeze(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(x, mean - 2 * total_std, mean + 2 * total_std, alpha=0.25, label="±2σ total")
    ax.fill_between(x, mean - 2 * epistemic_std, mean + 2 * epistemic_std, alpha=0.5, label="±2σ epistemic")
    ax.plot(x, mean, label="predictive mean")
    ax.scatter(x_train.squeeze(1), y_train.squeeze(1), s=4, c="k", label="training data")
    ax.axvspan(*GAP, color="grey", alpha=0.1)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(epochs: int = 3000, samples: int = 200, plot_path: str | None = None, fast: bool = False, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    if fast:
        epochs, samples = 600, 64
    x_train, y_train = make_data(400, seed)
    model = HeteroscedasticNet()
    train(model, x_train, y_train, epochs)

    model.eval()
    x = torch.linspace(-6.0, 6.0, 241).unsqueeze(1)
    mean, var = vinn.sample(model, x, samples=samples)  # each (T, N, 1)
    aleatoric, epistemic = vinn.regression_uncertainty(mean, var)  # each (N, 1)
    in_gap = (x > GAP[0] + 0.25) & (x < GAP[1] - 0.25)
    on_train = (x.abs() >= GAP[1]) & (x.abs() <= TRAIN_RANGE[1])
    result = {
        "epistemic_gap": epistemic[in_gap].mean().item(),
        "epistemic_train": epistemic[on_train].mean().item(),
        "aleatoric_inner": aleatoric[on_train & (x.abs() < 2.0)].mean().item(),
        "aleatoric_outer": aleatoric[on_train & (x.abs() > 3.0)].mean().item(),
    }
    print(
        f"mean epistemic variance: in the gap {result['epistemic_gap']:.4f}, on the training range {result['epistemic_train']:.4f}\n"
        f"mean aleatoric variance: 1 <= |x| < 2 {result['aleatoric_inner']:.4f}, 3 < |x| <= 4 {result['aleatoric_outer']:.4f}"
    )
    if plot_path:
        plot(plot_path, x_train, y_train, x, mean.mean(0), aleatoric, epistemic)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--plot", metavar="PATH", help="save the predictive band to this image")
    parser.add_argument("--fast", action="store_true", help="tiny settings, for tests")
    args = parser.parse_args()
    main(args.epochs, plot_path=args.plot, fast=args.fast)
