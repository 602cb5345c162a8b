"""vinn beside the libraries a user would pick instead, bayesian-torch and torchbnn, in one process.

    python benchmarks/peers.py [--repeats 15] [--threads 1] [--image-size 32] [--quick] [--readme benchmarks/README.md]

The peers are optional (``pip install -e ".[bench]"`` pins them): a library that is not installed
gets a row saying so. Every figure is a ratio to the deterministic model in the same run, each
time the median over interleaved repetitions (`run.interleaved_medians`):

- **train step**: forward + KL + backward + Adam on torchvision's ResNet-18 (num_classes=10), batch
  32 of 3x32x32 (``--image-size`` for another size), against the same step of the deterministic
  model (`run.train_step`). vinn's loss is ``vinn.ELBO(model, nn.CrossEntropyLoss(),
  dataset_size=N)``; the peers' is the same cross-entropy + KL / N with their own KL:
  bayesian-torch's ``get_kl_loss(model)``, torchbnn's ``BKLLoss(reduction="sum")(model)``.
- **MC predict**: T=16 samples of class probabilities on a batch of 64, against 16 deterministic
  passes (`run.deterministic_passes`). vinn: ``vinn.predict(model.eval(), x, samples=16)``; the
  peers: what their documentation tells a user to do, a Python loop of 16 forward passes, each
  followed by a softmax, stacked as vinn.predict's (T, N, C).
- **ELBO gradient variance**: as benchmarks/run.py's rows (`run.gradient_problem`,
  `run.gradient_variance`): the same MLP 784-400-400-10, the same parameters and the same fixed
  batch of 128 for every library, so the only randomness is the estimator's; a multiple of the
  lowest over every row.

How the libraries are matched:

- Models: each library converts every Conv2d and Linear of the same deterministic model, as a
  user would: ``vinn.bayesify`` with each estimator; bayesian-torch's ``dnn_to_bnn`` with type
  "Reparameterization" (one weight draw per batch, as vinn's "sample") and "Flipout"; torchbnn
  1.2 has no conversion function that handles nested modules, so `torchbnn_variant` replaces
  each layer by its ``BayesConv2d`` / ``BayesLinear`` with every argument of the torch layer.
- Prior N(0, 1) everywhere: vinn's default; bayesian-torch's ``prior_mu=0, prior_sigma=1`` (its
  layers read it as a standard deviation); torchbnn's ``prior_mu=0, prior_sigma=1``.
- Initial posterior: loc at the deterministic weights, scale `SCALE` everywhere (`run.GRADIENT_SCALE`
  in the gradient rows). vinn's ``init_scale`` says so; the peers cannot (bayesian-torch draws
  ``mu ~ N(posterior_mu_init, 0.1)`` and ``rho ~ N(posterior_rho_init, 0.1)``, its MOPED option sets
  σ = δ|w|; torchbnn draws mu uniformly and starts log σ at the prior's), so `start_at` writes
  their parameters after the conversion: σ = softplus(ρ) for bayesian-torch, exp(log σ) for torchbnn.
- What differs still: bayesian-torch's KL averages over each tensor's elements before summing
  over tensors, so it is far smaller than the ELBO's KL; neither the time nor the gradient variance
  depends on that (the KL's gradient has no noise).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

import vinn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/run.py, also when this file is imported
import run  # noqa: E402
from readme_blocks import rewrite_block  # noqa: E402

README_BLOCK = "peers"
SCALE = 1e-3  # the initial posterior scale of every library in the speed rows: vinn's default for a converted model


@dataclass
class Variant:
    """A peer library's Bayesian version of a deterministic model: the model, its KL, its posterior weight locs."""

    model: nn.Module
    kl: Callable[[], torch.Tensor]
    locs: list[torch.Tensor]

    def loss(self, dataset_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Cross-entropy + KL / N: what ``vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=N)`` computes."""
        cross_entropy = nn.CrossEntropyLoss()
        return lambda outputs, targets: cross_entropy(outputs, targets) + self.kl() / dataset_size

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
        """`run.train_step` with this library's loss."""
        loss = self.loss(run.DATASET_SIZE)
        return run.adam_step(self.model.train(), lambda: loss(self.model(x), y))


def start_at(layer: nn.Module, original: nn.Module, names: dict[str, tuple[str, str]], raw_scale: float) -> None:
    """Set ``layer``'s posterior locs to ``original``'s parameters and every scale to one value.

    ``names`` maps a torch parameter name ("weight", "bias") to the names of its loc and scale
    parameters in ``layer``; ``raw_scale`` is the scale in the library's parametrization.
    """
    with torch.no_grad():
        for name, (loc, scale) in names.items():
            if getattr(original, name) is not None:
                getattr(layer, loc).copy_(getattr(original, name))
                getattr(layer, scale).fill_(raw_scale)


def bayesian_torch_variant(kind: str, det: nn.Module, scale: float) -> Variant:
    """``det`` converted by bayesian-torch's ``dnn_to_bnn`` with type ``kind``, starting at its weights with scale ``scale``."""
    from bayesian_torch.layers.base_variational_layer import BaseVariationalLayer_
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    rho = math.log(math.expm1(scale))  # σ = softplus(ρ)
    model = copy.deepcopy(det)
    parameters = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": rho, "type": kind, "moped_enable": False}
    dnn_to_bnn(model, parameters)
    model.to(next(det.parameters()).device)  # the new layers are built on the CPU
    layers = [m for m in model.modules() if isinstance(m, BaseVariationalLayer_)]
    originals = [m for m in det.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    locs = []
    for layer, original in zip(layers, originals, strict=True):
        weight = "kernel" if hasattr(layer, "mu_kernel") else "weight"  # its convolutions call their weight a kernel
        start_at(layer, original, {"weight": (f"mu_{weight}", f"rho_{weight}"), "bias": ("mu_bias", "rho_bias")}, rho)
        locs.append(getattr(layer, f"mu_{weight}"))
    return Variant(model, lambda: get_kl_loss(model), locs)


def torchbnn_variant(det: nn.Module, scale: float) -> Variant:
    """``det`` with every Conv2d and Linear a torchbnn layer, starting at its weights with scale ``scale``."""
    import torchbnn

    def bayesian(layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Conv2d):
            new: nn.Module = torchbnn.BayesConv2d(
                0.0, 1.0, layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
            )  # fmt: skip
        else:
            new = torchbnn.BayesLinear(0.0, 1.0, layer.in_features, layer.out_features, layer.bias is not None)
        start_at(new, layer, {"weight": ("weight_mu", "weight_log_sigma"), "bias": ("bias_mu", "bias_log_sigma")}, math.log(scale))
        return new

    model = run.replaced(det, bayesian).to(next(det.parameters()).device)  # the new layers are built on the CPU
    kl = torchbnn.BKLLoss(reduction="sum")
    locs = [m.weight_mu for m in model.modules() if isinstance(m, (torchbnn.BayesConv2d, torchbnn.BayesLinear))]
    return Variant(model, lambda: kl(model), locs)


# row name -> (the distribution that provides it, its conversion)
PEERS: dict[str, tuple[str, Callable[[nn.Module, float], Variant]]] = {
    "bayesian-torch `dnn_to_bnn`, Reparameterization": ("bayesian-torch", partial(bayesian_torch_variant, "Reparameterization")),
    "bayesian-torch `dnn_to_bnn`, Flipout": ("bayesian-torch", partial(bayesian_torch_variant, "Flipout")),
    "torchbnn `BayesConv2d` / `BayesLinear`": ("torchbnn", torchbnn_variant),
}


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def vinn_name(estimator: str) -> str:
    return f"vinn `bayesify`, {estimator}" + (" (default)" if estimator == "lrt" else "")


def mc_loop(model: nn.Module, x: torch.Tensor, samples: int) -> Callable[[], torch.Tensor]:
    """The peers' Monte Carlo prediction as their documentation writes it: (T, N, C) probabilities."""

    @torch.no_grad()
    def predict() -> torch.Tensor:
        return torch.stack([model(x).softmax(1) for _ in range(samples)])

    return predict


# what local reparameterization's training step cannot go below (benchmarks/run.py's floor row),
# measured in the same run so that the "at most 1.15x the floor" is one run's ratio
FLOOR = "floor: every conv and linear computed twice, no sampling"


def speed(
    peers: list[str], device: torch.device, repeats: int, batch: int, predict_batch: int, samples: int, size: int
) -> dict[str, tuple[float, float | None]]:
    """Train step and MC predict of each row on images of 3 x size x size, as ratios to the
    deterministic ResNet-18: row -> (train, predict); the floor has no prediction row."""
    torch.manual_seed(0)
    det = run.resnet18(device)
    vinn_models = {
        vinn_name(e): vinn.bayesify(det, config=vinn.BayesConfig().set_global(vinn.LayerSpec(estimator=e, init_scale=SCALE)))
        for e in run.ESTIMATORS
    }
    variants = {name: PEERS[name][1](det, SCALE) for name in peers}
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 10, (batch,), device=device)
    train = {"deterministic": run.train_step(det.train(), x, y, bayesian=False), FLOOR: run.train_step(run.two_pass(det).train(), x, y, bayesian=False)}
    train |= {name: run.train_step(model.train(), x, y, bayesian=True) for name, model in vinn_models.items()}
    train |= {name: variant.train_step(x, y) for name, variant in variants.items()}
    train_medians = interleaved_ratios(train, repeats, device)
    x = torch.randn(predict_batch, 3, size, size, device=device)
    predict = {"deterministic": run.deterministic_passes(det.eval(), x, samples)}
    predict |= {name: partial(vinn.predict, model.eval(), x, samples=samples) for name, model in vinn_models.items()}
    predict |= {name: mc_loop(variant.model.eval(), x, samples) for name, variant in variants.items()}
    predict_medians = interleaved_ratios(predict, repeats, device)
    return {name: (train_medians[name], predict_medians.get(name)) for name in train}


def interleaved_ratios(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """`run.interleaved_medians`, each divided by the "deterministic" one."""
    medians = run.interleaved_medians(fns, repeats, device)
    return {name: median / medians["deterministic"] for name, median in medians.items()}


def gradient_variances(peers: list[str], device: torch.device, draws: int) -> dict[str, float]:
    """ELBO gradient variance of each Bayesian row, as a multiple of the lowest."""
    variances = {vinn_name(e): v for e, v in run.vinn_gradient_variances(device, draws).items()}
    det, x, y = run.gradient_problem(device)
    for name in peers:
        variant = PEERS[name][1](det, run.GRADIENT_SCALE)
        variances[name] = run.gradient_variance(variant.model, variant.loss(run.GRADIENT_DATASET_SIZE), variant.locs, x, y, draws)
    lowest = min(variances.values())
    return {name: v / lowest for name, v in variances.items()}


def table(speeds: dict[str, tuple[float, float | None]], variances: dict[str, float], samples: int) -> str:
    lines = [
        f"| model | train step | MC predict, T={samples} | ELBO gradient variance (× lowest) |",
        "|---|---:|---:|---:|",
    ]
    for name, (train, predict) in speeds.items():
        variance = f"{variances[name]:.2f}×" if name in variances else ""
        label = "deterministic ResNet-18" if name == "deterministic" else name
        lines.append(f"| {label} | {train:.2f}× | {'' if predict is None else f'{predict:.2f}×'} | {variance} |")
    for name, (distribution, _) in PEERS.items():
        if name not in speeds:
            lines.append(f"| {name} | {distribution} not installed | | |")
    return "\n".join(lines)


def main(arguments: argparse.Namespace) -> str:
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    quick = arguments.quick
    repeats, batch, predict_batch, samples, draws = (1, 2, 2, 4, 10) if quick else (arguments.repeats, 32, 64, 16, arguments.draws)
    versions = {distribution: installed(distribution) for distribution, _ in PEERS.values()}
    peers = [name for name, (distribution, _) in PEERS.items() if versions[distribution] is not None]
    size = arguments.image_size
    speeds = speed(peers, device, repeats, batch, predict_batch, samples, size)
    variances = gradient_variances(peers, device, draws)
    peer_versions = ", ".join(f"{d} {v}" for d, v in versions.items() if v is not None)
    result = table(speeds, variances, samples) + (
        f"\n\n`benchmarks/peers.py{' --quick' if quick else ''}`, {datetime.date.today()}, {platform.machine()}"
        f"{', ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, {peer_versions or 'no peer installed'}. "
        f"Train step: batch {batch} of 3x{size}x{size}; predict: batch {predict_batch}; medians of {repeats} interleaved "
        f"repetitions, ratios to the deterministic model. Gradient variance: MLP 784-400-400-10, batch 128, "
        f"posterior scale {run.GRADIENT_SCALE}, {draws} draws."
    )
    print(result)
    if arguments.readme is not None:
        rewrite_block(Path(arguments.readme), README_BLOCK, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in the issue's reference table)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repetitions (15: about 6 minutes on one core; fewer leave the ratios to this machine's noise)")
    parser.add_argument("--draws", type=int, default=200, help="gradient draws per row of the variance column")
    parser.add_argument(
        "--image-size",
        type=int,
        default=32,
        help="height and width of the input images (default 32, as in the issue's reference table; at 32 the "
        "deterministic model's last stage runs on 1x1 maps and most of its gradients are exactly 0, see benchmarks/README)",
    )
    parser.add_argument("--quick", action="store_true", help="one repetition on batches of 2, T=4: checks that everything runs")
    parser.add_argument("--readme", help="Markdown file whose peers block gets the table")
    main(parser.parse_args())
