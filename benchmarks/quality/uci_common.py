"""What the UCI regression benchmarks share: data, splits, the networks, training and scoring.

The protocol is the one of the published table (Hernández-Lobato & Adams 2015; Gal & Ghahramani
2016), described with the data in ``../shared/data/uci/README.md`` (beside the repository):
random 90/10 train/test splits, inputs and target standardized on the training split, one hidden
layer of 50 ReLU units, and the test RMSE and test log-likelihood of the predictive mixture in the
target's original units. Every network predicts the mean of the standardized target and learns one
homoscedastic noise variance.

Used by ``uci.py`` (the benchmark table) and ``scale_learning.py`` (how fast posterior scales learn).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import vinn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from readme_blocks import rewrite_block  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "uci"
DATASETS = ("boston", "wine")
HIDDEN = 50
BATCH_SIZE = 32
LR = 1e-3
TEST_FRACTION = 0.1
NOISE_VAR = 1.0  # initial noise variance (standardized units): the target's variance on the training split

# The published rows of the shared README: (RMSE, RMSE s.e., LL, LL s.e.) per dataset.
PUBLISHED = {
    "VI (Graves 2011)": {"boston": (4.32, 0.29, -2.90, 0.07), "wine": (0.65, 0.01, -0.98, 0.01)},
    "PBP": {"boston": (3.01, 0.18, -2.57, 0.09), "wine": (0.64, 0.01, -0.97, 0.01)},
    "MC dropout": {"boston": (2.97, 0.19, -2.46, 0.06), "wine": (0.62, 0.01, -0.93, 0.01)},
}


# -- data ----------------------------------------------------------------------------------------


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (N, D) and target (N,) of dataset ``name``, float64, from ``DATA_DIR/<name>.csv``."""
    table = np.loadtxt(DATA_DIR / f"{name}.csv", delimiter=",", comments="#", dtype=np.float64)
    return table[:, :-1], table[:, -1]


@dataclass
class Split:
    """One train/test split, standardized on its training part.

    ``x_train`` (N, D), ``y_train`` (N, 1), ``x_test`` (M, D) float32 tensors in standardized
    units; ``y_test`` (M,) float64 in the target's original units; ``y_mean``, ``y_std``: the
    training target's mean and standard deviation, to map predictions back.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    y_mean: float
    y_std: float


def split(x: np.ndarray, y: np.ndarray, index: int) -> Split:
    """Split number ``index``: a random 90/10 partition from a generator seeded with ``index``."""
    order = np.random.default_rng(index).permutation(len(y))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    x_mean, x_std = x[train].mean(0), x[train].std(0)
    x_std[x_std == 0] = 1.0  # a constant input column stays 0
    y_mean, y_std = float(y[train].mean()), float(y[train].std())

    def inputs(rows: np.ndarray) -> Tensor:
        return torch.as_tensor((x[rows] - x_mean) / x_std, dtype=torch.float32)

    y_train = torch.as_tensor((y[train] - y_mean) / y_std, dtype=torch.float32).unsqueeze(1)
    return Split(inputs(train), y_train, inputs(test), torch.as_tensor(y[test]), y_mean, y_std)


# -- networks ------------------------------------------------------------------------------------


class Regressor(nn.Module):
    """``body`` (B, D) -> (B, 1), the mean of the standardized target, and a learned noise variance.

    The noise variance (standardized units) is ``exp(noise_log_sigma2)``: named like the posterior
    scales, so that `vinn.param_groups` gives it their learning rate.
    """

    def __init__(self, body: nn.Module, noise_var: float) -> None:
        super().__init__()
        self.body = body
        self.noise_log_sigma2 = nn.Parameter(torch.tensor(math.log(noise_var)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    @property
    def noise_var(self) -> Tensor:
        """The noise variance, a 0-dim tensor (standardized units)."""
        return self.noise_log_sigma2.exp()


# The recommended recipe, measured in uci.py and scale_learning.py: vinn.Linear layers with their
# defaults (prior N(0, 1), init_scale 1e-2), the learned noise variance named like the posterior
# scales so that `vinn.param_groups` gives it their learning rate, `vinn.ELBO`.
RECIPE = f"vinn.Linear defaults (prior N(0, 1), init_scale 0.01), noise variance learned from {NOISE_VAR:g}"


def bayesian_regressor(inputs: int) -> Regressor:
    """The recommended vinn network: ``inputs`` -> 50 ReLU -> 1 with vinn.Linear layers."""
    body = nn.Sequential(vinn.Linear(inputs, HIDDEN), nn.ReLU(), vinn.Linear(HIDDEN, 1))
    return Regressor(body, NOISE_VAR)


# -- training ------------------------------------------------------------------------------------

# loss(model, x (B, D), y (B, 1)) -> 0-dim tensor to minimise
Loss = Callable[[Regressor, Tensor, Tensor], Tensor]


def gaussian_nll(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood (nats per example) of a deterministic or dropout net."""
    mean = model(x)
    return nn.functional.gaussian_nll_loss(mean, y, model.noise_var.expand_as(mean), full=True)


def elbo_loss(model: Regressor, dataset_size: int) -> Loss:
    """The negative ELBO per example, `vinn.ELBO` of the Gaussian likelihood with ``dataset_size``."""
    elbo = vinn.ELBO(model, nn.GaussianNLLLoss(full=True), dataset_size=dataset_size)

    def loss(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
        mean = model(x)
        return elbo(mean, y, model.noise_var.expand_as(mean))

    return loss


def train(
    model: Regressor,
    loss: Loss,
    optimizer: torch.optim.Optimizer,
    data: Split,
    epochs: int,
    *,
    seed: int,
    on_epoch: Callable[[int], bool | None] | None = None,
) -> None:
    """Up to ``epochs`` passes of minibatch training (batch `BATCH_SIZE`, reshuffled every epoch).

    ``on_epoch(epoch)`` (1-based) is called after every epoch; training stops early when it
    returns True.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad(set_to_none=True)
            loss(model, data.x_train[batch], data.y_train[batch]).backward()
            optimizer.step()
        if on_epoch is not None and on_epoch(epoch):
            return


# -- scoring -------------------------------------------------------------------------------------


@torch.no_grad()
def draws(model: Regressor, x: Tensor, samples: int) -> Tensor:
    """Means of ``samples`` draws of the predictive distribution, (T, M), standardized units.

    A network with vinn layers samples its posterior (`vinn.sample`); one with dropout samples
    masks (MC dropout: dropout kept on); a deterministic network gives its one prediction (T = 1).
    """
    if any(isinstance(m, vinn.BayesianLayer) for m in model.modules()):
        model.eval()
        return vinn.sample(model, x, samples).squeeze(2)
    if any(isinstance(m, nn.Dropout) for m in model.modules()):
        model.train()
        return torch.stack([model(x).squeeze(1) for _ in range(samples)])
    model.eval()
    return model(x).squeeze(1).unsqueeze(0)


def mixture_scores(means: Tensor, noise_var: Tensor, data: Split) -> tuple[float, float]:
    """Test RMSE and mean test log-likelihood (nats per point) of an equal-weight Gaussian mixture.

    ``means`` (T, M) and ``noise_var`` (0-dim): the components' means and their common variance in
    standardized units, mapped back to the target's units here. The log-likelihood of a point is
    ``logsumexp_t log N(y | μ_t, σ²) - log T``; the RMSE is that of the mixture's mean.
    """
    means = means.double() * data.y_std + data.y_mean
    std = noise_var.double().sqrt() * data.y_std
    log_prob = torch.distributions.Normal(means, std).log_prob(data.y_test)
    ll = (log_prob.logsumexp(0) - math.log(len(means))).mean()
    rmse = (means.mean(0) - data.y_test).square().mean().sqrt()
    return float(rmse), float(ll)


def scores(model: Regressor, data: Split, samples: int, *, seed: int) -> tuple[float, float]:
    """Test RMSE and log-likelihood (nats per point) of ``model``'s predictive mixture on ``data``.

    ``samples`` draws (one if deterministic), each with the model's noise variance. The draws come
    from a generator seeded with ``seed`` and leave the global random state as it was, so scoring
    in the middle of training does not change the rest of the training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        means = draws(model, data.x_test, samples)
    return mixture_scores(means, model.noise_var.detach(), data)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    se = array.std(ddof=1) / math.sqrt(len(array)) if len(array) > 1 else 0.0
    return float(array.mean()), float(se)


def publish(report: str, out: Path | None, readme: Path | None, block: str) -> None:
    """Print ``report`` (a Markdown title line, then the text), write it to ``out``, and its text
    without the title into the README block ``block`` of the Markdown file ``readme``."""
    print(report)
    if out is not None:
        out.write_text(report)
        print(f"written to {out}")
    if readme is not None:
        rewrite_block(readme, block, report.split("\n", 1)[1].strip())
        print(f"written to the {block} block of {readme}")
