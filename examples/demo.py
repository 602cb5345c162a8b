"""The main job, end to end: a pretrained model in, a calibrated Bayesian model out.

    python examples/demo.py [--out runs/demo] [--epochs 60] [--finetune-epochs 20] [--samples 64]
                            [--readme README.md]

1. trains a small deterministic ResNet-style CNN on scikit-learn's digits without the digit 9,
   10% of whose training labels are wrong (the "pretrained" model), and saves it as a checkpoint;
2. loads the checkpoint, turns the model into a Bayesian one with `vinn.bayesify` and fine-tunes it
   with `vinn.ELBO`;
3. compares the two on held-out digits and on out-of-distribution inputs (uniform noise, digits
   rotated by 90°, inverted digits, and the never-seen 9s): accuracy, NLL, expected calibration
   error, Brier score, and the AUROC of telling in- from out-of-distribution inputs by each
   model's best score (`ood_score`: the mutual information of the Bayesian model, the max
   probability of the deterministic one); prints a table and writes figures (and, with
   ``--readme``, the table and figure links into that Markdown file between its demo-results
   markers).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import vinn

try:
    from digits import load_digits_tensors
    from readme_blocks import rewrite_block
except ImportError:  # imported as examples.demo
    from .digits import load_digits_tensors
    from .readme_blocks import rewrite_block

IMAGE_SIZE = 16
HELD_OUT_CLASS = 9  # the last class: the model's classes 0..8 keep their labels as indices
N_CLASSES = HELD_OUT_CLASS
BATCH_SIZE = 64
README_BLOCK = "demo-results"
# Real labels are noisy: 10% of the training labels are replaced by a wrong class (the test labels
# stay clean). The pretrained network learns the noise and is miscalibrated on the test digits
# (underconfident); on clean digits it is calibrated (ECE 0.005) and leaves nothing to compare.
LABEL_NOISE = 0.1
PRETRAIN_LR = 3e-3
# Fine-tuning, the recipe benchmarks/quality/digits_ood.py measured over seeds 0-4: the head
# becomes Bayesian (N(0, 1) prior) with a matrix-normal posterior (`vinn.MatrixNormal`) whose
# column covariance starts from the training features (`vinn.init_column_covariance`): large
# across the directions the features span, which is what tells unseen inputs apart; each row's
# scale starts at 0.1. The whole network fine-tunes at 1e-3, which is what makes it less
# underconfident than the pretrained one, the posterior scales at 3e-3 (`vinn.param_groups`);
# batch norm keeps the pretrained statistics. The deterministic trunk runs once for all samples
# in `vinn.predict`.
LAST_LAYERS = 1
INIT_SCALE = 0.1
FINETUNE_LR = 1e-3
SCALE_LR = 3e-3
FIGURES = {
    "reliability": "reliability diagram of both models on held-out digits",
    "confidence": "confidence score on correct, wrong and out-of-distribution inputs",
    "uncertainty": "aleatoric vs epistemic uncertainty of the Bayesian model",
    "confident_digits": "least (top rows) and most (bottom rows) confident test digits, Bayesian model",
}


class Block(nn.Module):
    """A residual block: two 3x3 convolutions with batch norm, identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """(N, 1, 16, 16) digits -> (N, n_classes) logits."""

    def __init__(self, width: int = 16, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.layer2 = Block(2 * width)
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def fit(
    model: nn.Module,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    epochs: int,
    desc: str,
    freeze_batch_norm: bool = False,
) -> None:
    """Minibatches of 64 for ``epochs`` epochs, the learning rates decayed to 0 on a cosine, with a
    progress bar. ``x``: (N, 1, H, W); ``y``: (N,). ``freeze_batch_norm`` keeps batch norm's
    running statistics as they are (its layers in eval mode) while the rest trains."""
    model.train()
    if freeze_batch_norm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    steps = epochs * math.ceil(len(x) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        for batch in torch.randperm(len(x)).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()


def noisy_labels(y: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """A copy of labels ``y`` (N,) in which a ``fraction`` of them, chosen at random, is replaced by
    a different class, drawn uniformly from the other ``N_CLASSES - 1``."""
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(y), generator=generator)[: round(fraction * len(y))]
    shift = torch.randint(1, N_CLASSES, (len(flipped),), generator=generator)
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + shift) % N_CLASSES
    return noisy


def split_digits() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test, x_unseen): the digits of classes 0..8 split for training
    and test, and every digit of the held-out class, which neither model sees in training."""
    x_train, y_train, x_test, y_test = load_digits_tensors(size=IMAGE_SIZE)
    seen_train, seen_test = y_train != HELD_OUT_CLASS, y_test != HELD_OUT_CLASS
    x_unseen = torch.cat([x_train[~seen_train], x_test[~seen_test]])
    return x_train[seen_train], y_train[seen_train], x_test[seen_test], y_test[seen_test], x_unseen


def out_of_distribution(x_test: Tensor, x_unseen: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Inputs unlike the training digits, (M, 1, H, W) each: uniform noise, test digits rotated by
    90° and with ink and paper swapped, and the digits of the class held out from training."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.rand(x_test.shape, generator=generator),
        "rotated": torch.rot90(x_test, 1, dims=(2, 3)),
        "inverted": 1.0 - x_test,
        f"unseen {HELD_OUT_CLASS}s": x_unseen,
    }


def evaluate(p: Tensor, y: Tensor, p_ood: dict[str, Tensor]) -> dict[str, float]:
    """Metrics from predictive samples ``p`` (T, N, C) on test digits ``y`` (N,) and ``p_ood``
    {name: (T, M, C)}; a deterministic model is its one sample, T = 1."""
    mean = p.mean(0)
    correct = mean.argmax(1) == y
    confidence = vinn.confidence_score(p)
    metrics = {
        "accuracy": correct.float().mean().item(),
        "NLL": F.nll_loss(mean.clamp_min(1e-12).log(), y).item(),
        "ECE": vinn.expected_calibration_error(p, y),
        "Brier score": vinn.brier_score(p, y),
        "confidence right": confidence[correct].mean().item(),
        "confidence wrong": confidence[~correct].mean().item() if (~correct).any() else float("nan"),
    }
    aurocs = {f"AUROC {name}": vinn.auroc(ood_score(p), ood_score(q)) for name, q in p_ood.items()}
    return metrics | aurocs | {"AUROC mean OOD": sum(aurocs.values()) / len(aurocs)}


def ood_score(p: Tensor) -> Tensor:
    """How in-distribution each input looks, (N,) from predictive samples ``p`` (T, N, C): minus the
    mutual information for a sampled model, the max probability for a deterministic one (T = 1),
    each model's best score in benchmarks/quality/digits_ood.py."""
    return p[0].amax(1) if len(p) == 1 else -vinn.mutual_information(p)


def format_table(results: dict[str, dict[str, float]], markdown: bool) -> str:
    """``results`` {model: {metric: value}} as a text or Markdown table, one row per metric."""
    models = list(results)
    metrics = list(results[models[0]])
    if markdown:
        rows = [f"| metric | {' | '.join(models)} |", "|---" + "|---:" * len(models) + "|"]
        rows += [f"| {m} | " + " | ".join(f"{results[k][m]:.3f}" for k in models) + " |" for m in metrics]
    else:
        rows = [f"{'':22s}" + "".join(f"{k:>15s}" for k in models)]
        rows += [f"{m:22s}" + "".join(f"{results[k][m]:15.3f}" for k in models) for m in metrics]
    return "\n".join(rows)


def write_figures(out: Path, p_det: Tensor, p_bnn: Tensor, y: Tensor, x: Tensor, ood: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Path]:
    """The demo's figures as PNG files in ``out``: {figure name: path}.

    ``p_det`` (1, N, C) and ``p_bnn`` (T, N, C): predictive samples on the test digits ``x``
    (N, 1, H, W) with labels ``y`` (N,); ``ood``: {name: (p_det, p_bnn)} on out-of-distribution inputs.
    """
    from vinn.plot import (
        confidence_histograms,
        image_grid,
        reliability_diagram,
        uncertainty_scatter,
    )

    models = {"deterministic": (p_det, 0), "Bayesian": (p_bnn, 1)}
    scores = {}
    for model_name, (p, index) in models.items():
        confidence = vinn.confidence_score(p)
        correct = p.mean(0).argmax(1) == y
        ood_confidence = torch.cat([vinn.confidence_score(pair[index]) for pair in ood.values()])
        scores[model_name] = {"correct": confidence[correct], "wrong": confidence[~correct], "out-of-distribution": ood_confidence}
    predicted = p_bnn.mean(0).argmax(1, keepdim=True)
    aleatoric, epistemic = (u.gather(1, predicted).squeeze(1) for u in vinn.uncertainty(p_bnn))
    confidence = vinn.confidence_score(p_bnn)
    order = confidence.argsort()
    shown = torch.cat([order[:16], order[-16:]])  # two rows of 8 at each end
    figures = {
        "reliability": reliability_diagram({k: p for k, (p, _) in models.items()}, y),
        "confidence": confidence_histograms(scores),
        "uncertainty": uncertainty_scatter(aleatoric, epistemic, (predicted.squeeze(1) == y)),
        "confident_digits": image_grid(x[shown], [f"{predicted[i].item()} ({confidence[i]:.2f})" for i in shown]),
    }
    paths = {}
    for name, figure in figures.items():
        paths[name] = out / f"{name}.png"
        figure.savefig(paths[name], dpi=100)
    return paths


def main(
    out: str = "runs/demo",
    epochs: int = 60,
    finetune_epochs: int = 20,
    samples: int = 64,
    seed: int = 0,
    readme: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run the demo; returns {"deterministic": metrics, "Bayesian": metrics} (see `evaluate`)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test, x_unseen = split_digits()
    y_train = noisy_labels(y_train, LABEL_NOISE, seed)
    ood = out_of_distribution(x_test, x_unseen, seed)

    # 1. the "pretrained" deterministic model
    pretrained = SmallResNet()
    optimizer = torch.optim.Adam(pretrained.parameters(), lr=PRETRAIN_LR)
    fit(pretrained, nn.CrossEntropyLoss(), optimizer, x_train, y_train, epochs, desc="pretraining")
    checkpoint = out_dir / "pretrained.pt"
    torch.save(pretrained.state_dict(), checkpoint)

    # 2. load it, make it Bayesian, fine-tune with the ELBO
    model = SmallResNet()
    model.load_state_dict(torch.load(checkpoint))
    model.eval()
    bnn = vinn.bayesify(model, posterior=vinn.MatrixNormal, init_scale=INIT_SCALE, last=LAST_LAYERS)
    vinn.init_column_covariance(bnn, x_train)
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=len(x_train))
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=FINETUNE_LR, scale_lr=SCALE_LR))
    fit(bnn, elbo, optimizer, x_train, y_train, finetune_epochs, desc="fine-tuning", freeze_batch_norm=True)

    # 3. compare: the deterministic model (the pretrained checkpoint) is one "sample" of itself
    bnn.eval()
    with torch.no_grad():
        p_det = {name: model(x).softmax(1)[None] for name, x in {"test": x_test, **ood}.items()}
    p_bnn = {name: vinn.predict(bnn, x, samples=samples) for name, x in tqdm({"test": x_test, **ood}.items(), desc="predicting", leave=False)}
    results = {
        "deterministic": evaluate(p_det["test"], y_test, {k: p_det[k] for k in ood}),
        "Bayesian": evaluate(p_bnn["test"], y_test, {k: p_bnn[k] for k in ood}),
    }
    figures = write_figures(out_dir, p_det["test"], p_bnn["test"], y_test, x_test, {k: (p_det[k], p_bnn[k]) for k in ood})
    seconds = time.perf_counter() - started
    settings = (
        f"deterministic: the pretrained checkpoint ({epochs} epochs); Bayesian: its last {LAST_LAYERS} layer(s) bayesified, fine-tuned "
        f"{finetune_epochs} epochs, {samples} samples; trained on digits 0-{HELD_OUT_CLASS - 1} with "
        f"{LABEL_NOISE:.0%} of the training labels wrong, "
        f"{len(x_test)} held-out test digits; {seconds:.0f} s on {datetime.date.today().isoformat()}"
    )
    print(f"\n{format_table(results, markdown=False)}\n\n{settings}\nfigures and checkpoint in {out_dir}")
    if readme is not None:
        readme_path = Path(readme)
        links = "\n".join(
            f"![{caption}]({Path(os.path.relpath(figures[name], readme_path.parent)).as_posix()})" for name, caption in FIGURES.items()
        )
        rewrite_block(readme_path, README_BLOCK, f"{format_table(results, markdown=True)}\n\n{settings}.\n\n{links}")
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the checkpoint and the figures")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of pretraining")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="epochs of ELBO fine-tuning")
    parser.add_argument("--samples", type=int, default=64, help="Monte Carlo samples per prediction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", help="Markdown file whose demo-results block gets the table and figure links")
    return parser.parse_args()


if __name__ == "__main__":
    main(**vars(parse_args()))
