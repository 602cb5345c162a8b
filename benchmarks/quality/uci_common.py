"""What the UCI regression benchmarks share: data, splits, the networks, training and scoring.

The protocol is the one of the published table (Hernández-Lobato & Adams 2015; Gal & Ghahramani
2016), described with the data in ``../shared/data/uci/README.md`` (beside the repository):
random 90/10 train/test splits, inputs and target standardized on the training split, one hidden
layer of 50 ReLU units, and the test RMSE and test log-likelihood of the predictive mixture in the
target's original units. Every network predicts the mean of the standardized target and a noise
variance: its own for each input (heteroscedastic, the recipe) or one learned for all inputs.
The recipe fits the mean first: for the first half of each budget the per-input model uses one
variance for all inputs (`WARMUP`).

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
MIN_NOISE_VAR = 1e-6  # floor of a per-input noise variance (standardized units), so the likelihood stays finite
# How the noise variance is learned, the recipe's first: an output of the network per input, or one
# parameter for all inputs (the published homoscedastic protocol).
NOISE_MODELS = ("per-input", "shared")
# The recipe's scale learning rate over the weights' (`vinn.param_groups`' scale_lr / lr). Not
# vinn.SCALE_LR_RATIO (3): on these 455-1439 examples the posterior that has converged underfits,
# and scales at the weights' rate predict better at every budget past 40 epochs (results-uci-*).
SCALE_LR_RATIO = 1.0
# The share of each training budget during which a per-input noise model uses its one shared
# variance, before its variance output takes over from that value: the mean is fitted first (Nix &
# Weigend 1994; Skafte et al. 2019). Learned from the start, the per-input variance explains hard
# targets as noise before the mean has fitted them: Boston RMSE 3.40 / 3.20 / 3.18 / 3.27 at 40 /
# 100 / 200 / 400 epochs without the warm-up, 3.32 / 3.08 / 2.99 / 3.00 with it, at the same
# log-likelihood (results-uci-2026-12-01-per-input-noise*.md).
WARMUP = 0.5

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
    """``body`` (B, D) -> (B, 2): the mean of the standardized target and the noise variance.

    ``noise="per-input"``: ``body`` has two outputs, the mean and the noise variance before a
    softplus (heteroscedastic); its last layer's second bias starts the variance at `NOISE_VAR`.
    ``noise="shared"``: ``body`` has one output, the mean, and the noise variance is
    ``exp(noise_log_sigma2)``, one parameter named like the posterior scales so that
    `vinn.param_groups` gives it their learning rate. A per-input model uses that shared variance
    too while ``self.shared`` is True (`share_noise`: the warm-up).
    """

    def __init__(self, body: nn.Sequential, noise: str) -> None:
        super().__init__()
        if noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {NOISE_MODELS}, got {noise!r}")
        self.body, self.noise, self.shared = body, noise, noise == "shared"
        self.noise_log_sigma2 = nn.Parameter(torch.tensor(math.log(NOISE_VAR)))
        if noise == "per-input":
            with torch.no_grad():  # softplus(b) = NOISE_VAR
                body[-1].bias[1] = math.log(math.expm1(NOISE_VAR))

    def forward(self, x: Tensor) -> Tensor:
        mean, *variance = self.body(x).split(1, dim=1)
        if self.shared:
            return torch.cat([mean, self.noise_log_sigma2.exp().expand_as(mean)], 1)
        return torch.cat([mean, nn.functional.softplus(variance[0]) + MIN_NOISE_VAR], 1)

    @torch.no_grad()
    def share_noise(self, shared: bool) -> None:
        """Use the shared variance (True) or, for a per-input model, its variance output (False).

        Handing over to the output starts it at the shared variance, the same for every input: the
        last layer's variance row is put back as it was when the sharing began (while unused, a
        Bayesian layer's KL alone moves it: its scales towards the prior's), then its weights are set
        to 0 and its bias to match."""
        if not shared and self.noise == "shared":
            raise ValueError("a model with noise='shared' has no per-input variance to hand over to")
        last = self.body[-1]
        if shared and not self.shared:
            self._variance_row = {name: p[1].clone() for name, p in last.named_parameters(recurse=False)}
        if self.shared and not shared:
            for name, row in self._variance_row.items():
                getattr(last, name)[1] = row
            last.weight[1] = 0.0
            variance = (self.noise_log_sigma2.exp() - MIN_NOISE_VAR).clamp_min(MIN_NOISE_VAR)
            last.bias[1] = variance.expm1().log()  # softplus⁻¹
        self.shared = shared


def outputs(noise: str) -> int:
    """How many outputs a body needs for the noise model ``noise`` (one of `NOISE_MODELS`)."""
    return 2 if noise == "per-input" else 1


# The recommended recipe, measured in uci.py and scale_learning.py: vinn.Linear layers with their
# defaults (prior N(0, 1), init_scale 1e-2), a noise variance per input after a shared warm-up, `vinn.ELBO`.
def recipe(noise: str, warmup: float) -> str:
    """The recipe's description, with the noise model ``noise`` and a warm-up of ``warmup`` of the budget."""
    learned = "per input (an output of the network)" if noise == "per-input" else "shared by all inputs"
    if noise == "per-input" and warmup:
        learned += f", shared by all inputs for the first {warmup:.0%} of each budget"
    return f"vinn.Linear defaults (prior N(0, 1), init_scale 0.01), noise variance {learned}, learned from {NOISE_VAR:g}"


def bayesian_regressor(inputs: int, noise: str = NOISE_MODELS[0]) -> Regressor:
    """The recommended vinn network: ``inputs`` -> 50 ReLU -> mean and noise, vinn.Linear layers."""
    body = nn.Sequential(vinn.Linear(inputs, HIDDEN), nn.ReLU(), vinn.Linear(HIDDEN, outputs(noise)))
    return Regressor(body, noise)


# -- training ------------------------------------------------------------------------------------

# loss(model, x (B, D), y (B, 1)) -> 0-dim tensor to minimise
Loss = Callable[[Regressor, Tensor, Tensor], Tensor]


def gaussian_nll(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
    """Mean Gaussian negative log-likelihood (nats per example) of a deterministic or dropout net."""
    mean, variance = model(x).split(1, dim=1)
    return nn.functional.gaussian_nll_loss(mean, y, variance, full=True)


def elbo_loss(model: Regressor, dataset_size: int) -> Loss:
    """The negative ELBO per example, `vinn.ELBO` of the Gaussian likelihood with ``dataset_size``."""
    elbo = vinn.ELBO(model, nn.GaussianNLLLoss(full=True), dataset_size=dataset_size)

    def loss(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
        mean, variance = model(x).split(1, dim=1)
        return elbo(mean, y, variance)

    return loss


def train(
    model: Regressor,
    loss: Loss,
    optimizer: torch.optim.Optimizer,
    data: Split,
    epochs: int,
    *,
    seed: int,
    warmup: int = 0,
    on_epoch: Callable[[int], bool | None] | None = None,
) -> None:
    """Up to ``epochs`` passes of minibatch training (batch `BATCH_SIZE`, reshuffled every epoch).

    A per-input noise model uses its shared variance for the first ``warmup`` epochs
    (`Regressor.share_noise`). ``on_epoch(epoch)`` (1-based) is called after every epoch; training
    stops early when it returns True.
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    warmup = warmup if model.noise == "per-input" else 0  # a shared-noise model has nothing to hand over to
    if warmup:
        model.share_noise(True)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(n, generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad(set_to_none=True)
            loss(model, data.x_train[batch], data.y_train[batch]).backward()
            optimizer.step()
        if epoch == warmup:
            model.share_noise(False)
        if on_epoch is not None and on_epoch(epoch):
            return


# -- scoring -------------------------------------------------------------------------------------


@torch.no_grad()
def draws(model: Regressor, x: Tensor, samples: int) -> Tensor:
    """``samples`` draws of the predictive distribution's components, (T, M, 2): mean and noise variance.

    Standardized units. A network with vinn layers samples its posterior (`vinn.sample`); one with
    dropout samples masks (MC dropout: dropout kept on); a deterministic network gives its one
    prediction (T = 1).
    """
    if any(isinstance(m, vinn.BayesianLayer) for m in model.modules()):
        model.eval()
        return vinn.sample(model, x, samples)
    if any(isinstance(m, nn.Dropout) for m in model.modules()):
        model.train()
        return torch.stack([model(x) for _ in range(samples)])
    model.eval()
    return model(x).unsqueeze(0)


def mixture_scores(components: Tensor, data: Split) -> tuple[float, float]:
    """Test RMSE and mean test log-likelihood (nats per point) of an equal-weight Gaussian mixture.

    ``components`` (T, M, 2): each component's mean and variance in standardized units, mapped back
    to the target's units here. The log-likelihood of a point is
    ``logsumexp_t log N(y | μ_t, σ_t²) - log T``; the RMSE is that of the mixture's mean.
    """
    means = components[..., 0].double() * data.y_std + data.y_mean
    stds = components[..., 1].double().sqrt() * data.y_std
    log_prob = torch.distributions.Normal(means, stds).log_prob(data.y_test)
    ll = (log_prob.logsumexp(0) - math.log(len(means))).mean()
    rmse = (means.mean(0) - data.y_test).square().mean().sqrt()
    return float(rmse), float(ll)


def scores(model: Regressor, data: Split, samples: int, *, seed: int) -> tuple[float, float]:
    """Test RMSE and log-likelihood (nats per point) of ``model``'s predictive mixture on ``data``.

    ``samples`` draws (one if deterministic). The draws come from a generator seeded with ``seed``
    and leave the global random state as it was, so scoring in the middle of training does not
    change the rest of the training.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mixture_scores(draws(model, data.x_test, samples), data)


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
