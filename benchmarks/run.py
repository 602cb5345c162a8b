"""vinn's speed and memory as ratios to the deterministic model, measured in the same process.

    python benchmarks/run.py [--device cpu|cuda] [--repeats 9] [--quick] [--no-compile]
                             [--readme benchmarks/README.md] [--conversion-baseline REVISION]

Prints a Markdown table, dated (``--readme`` writes it into that file's run block). Every time is
the median over interleaved repetitions: the deterministic and the Bayesian variant run
alternately, so drifts of the machine hit both alike. ``--conversion-baseline`` adds the
conversion by vinn at an earlier git revision, timed in the same rounds (between processes this
machine's noise is larger than the differences between versions).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime
import gc
import importlib.util
import io
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from readme_blocks import rewrite_block  # noqa: E402

import vinn  # noqa: E402

ESTIMATORS = ("lrt", "flipout", "sample")
MOMENT_FLOOR = 1e-30  # a normal float32 far below any second moment a gradient that is not 0 leaves
DATASET_SIZE = 50_000  # the N of the ELBO's KL weight 1 / N in the training steps (CIFAR-10's)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, collect: bool = False
) -> dict[str, float]:
    """Median seconds of each function, run round-robin ``repeats`` times after one warm-up each,
    in a new random order every round (seeded): what one call leaves behind (freed memory that the
    next call reuses instead of faulting in fresh pages) then favours none of them. With
    ``collect``, each run after a garbage collection (for functions that leave cyclic garbage, such
    as a converted model: collecting it inside a later timed run charges its cost to whichever
    function runs then)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            if collect:
                gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, bayesian: bool, compiled: bool = False, moment_floor: float | None = None
) -> Callable[[], None]:
    """forward + (KL) + backward + Adam, as in a training loop; with ``compiled``, forward and loss
    (the KL included) go through ``torch.compile(fullgraph=True)``; ``moment_floor`` as for `adam_step`."""
    loss_fn = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=DATASET_SIZE) if bayesian else nn.CrossEntropyLoss()
    return adam_step(model, lambda: loss_fn(model(x), y), compiled, moment_floor)


def adam_step(
    model: nn.Module, loss: Callable[[], torch.Tensor], compiled: bool = False, moment_floor: float | None = None
) -> Callable[[], None]:
    """``loss()`` + backward + Adam on every parameter of ``model``; ``compiled`` as for `train_step`.

    With ``moment_floor``, one step is taken here and Adam's second moments below it (the exact
    zeros of gradients that are always 0) are raised to it: on a CPU torch takes Adam's square root
    with MKL, which is several times slower on zeros than on other values (benchmarks/README)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if compiled:
        loss = torch.compile(loss, fullgraph=True)

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    if moment_floor is not None:
        step()
        for state in optimizer.state.values():
            state["exp_avg_sq"].clamp_min_(moment_floor)
    return step


def deterministic_passes(model: nn.Module, x: torch.Tensor, passes: int) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        for _ in range(passes):
            model(x)

    return run


class TwoPass(nn.Module):
    """Two copies of a layer, summed: the arithmetic, parameters and Adam state of an exact two-pass
    estimator (mean and variance), without its sampling. A floor, not a model anyone trains."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.first, self.second = layer, copy.deepcopy(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + self.second(x)


def two_pass(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every Conv2d and Linear is a `TwoPass`."""
    return replaced(model, TwoPass)


def replaced(model: nn.Module, replace: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``model`` whose every Conv2d and Linear ``layer`` is ``replace(layer)``."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (nn.Conv2d, nn.Linear):
                setattr(parent, name, replace(child))
    return model


def numel(model: nn.Module) -> int:
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


def resnet18(device: torch.device) -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).to(device)


def bench_training(device: torch.device, repeats: int, batch: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    det = resnet18(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    two_passes = train_step(two_pass(det), x, y, bayesian=False)
    weights = sum(p.numel() for p in det.parameters())

    def two_passes_and_a_weight_draw() -> None:  # flipout's floor: it draws every weight's perturbation once a step
        two_passes()
        torch.randn(weights, device=device)

    fns = {
        "deterministic": train_step(det, x, y, bayesian=False),
        "two passes": two_passes,
        "two passes + weight draw": two_passes_and_a_weight_draw,
        # what the two steps above cost once their gradients' exact zeros no longer slow Adam down
        "deterministic, no zero moments": train_step(copy.deepcopy(det), x, y, bayesian=False, moment_floor=MOMENT_FLOOR),
        "two passes, no zero moments": train_step(two_pass(det), x, y, bayesian=False, moment_floor=MOMENT_FLOOR),
    }
    for estimator in ESTIMATORS:
        bnn = vinn.bayesify(det, config=vinn.BayesConfig().set_global(vinn.LayerSpec(estimator=estimator))).train()
        fns[estimator] = train_step(bnn, x, y, bayesian=True)
    medians = interleaved_medians(fns, repeats, device)
    rows = [
        (f"train step, bayesify(resnet18), {estimator}, batch {batch}", medians[estimator] / medians["deterministic"])
        for estimator in ESTIMATORS
    ]
    floor = f"floor: train step, resnet18 with every conv and linear computed twice (no sampling), batch {batch}"
    flipout_floor = f"floor of flipout: the same + drawing one weight set (torch.randn, {weights / 1e6:.1f}M normals), batch {batch}"
    raised = f"Adam's second moments below {MOMENT_FLOOR:g} raised to it after one step"
    return rows + [
        (floor, medians["two passes"] / medians["deterministic"]),
        (flipout_floor, medians["two passes + weight draw"] / medians["deterministic"]),
        (f"train step, resnet18 with {raised} / resnet18, batch {batch}", medians["deterministic, no zero moments"] / medians["deterministic"]),
        (f"the floor's train step with {raised} / resnet18, batch {batch}", medians["two passes, no zero moments"] / medians["deterministic"]),
    ]


def bench_compile(device: torch.device, repeats: int, batch: int) -> list[tuple[str, float]]:
    """The training step of bench_training (lrt) under torch.compile; compiling takes minutes on a CPU."""
    torch.manual_seed(0)
    det = resnet18(device).train()
    bnn = vinn.bayesify(det).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns = {
        "deterministic compiled": train_step(det, x, y, bayesian=False, compiled=True),
        "bayesian compiled": train_step(bnn, x, y, bayesian=True, compiled=True),
        "bayesian eager": train_step(bnn, x, y, bayesian=True),
    }
    fns["bayesian compiled"]()  # a second call specialises on the gradients the first one created
    medians = interleaved_medians(fns, repeats, device)
    step = f"train step, bayesify(resnet18), lrt, batch {batch}"
    return [
        (f"{step}, compiled / deterministic compiled", medians["bayesian compiled"] / medians["deterministic compiled"]),
        (f"{step}, compiled / eager", medians["bayesian compiled"] / medians["bayesian eager"]),
    ]


def bench_prediction(device: torch.device, repeats: int, batch: int, samples: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    det = resnet18(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    folded = x.repeat(samples, 1, 1, 1)
    full = vinn.bayesify(det).eval()
    last = vinn.bayesify(det, last=1).eval()
    doubled = two_pass(det).eval()
    weights = sum(p.numel() for p in det.parameters())
    fns = {
        "deterministic": deterministic_passes(det, x, samples),
        "full": lambda: vinn.predict(full, x, samples=samples),
        **{f"full, {draw}": partial(vinn.predict, full, x, samples=samples, draw=draw) for draw in vinn.prediction.DRAWS},
        "last": lambda: vinn.predict(last, x, samples=samples),
        "two passes": deterministic_passes(doubled, folded, 1),
        "weight draws": lambda: torch.randn(samples * weights, device=device),
    }
    medians = interleaved_medians(fns, repeats, device)
    reference = f"{samples} deterministic passes"
    draws = [
        (f"vinn.predict, bayesify(resnet18), T={samples}, batch {batch}, every layer draw={draw!r} / {reference}",
         medians[f"full, {draw}"] / medians["deterministic"])
        for draw in vinn.prediction.DRAWS
    ]
    return [
        (f"vinn.predict, bayesify(resnet18), T={samples}, batch {batch} / {reference}", medians["full"] / medians["deterministic"]),
        *draws,
        (f"vinn.predict, last layer Bayesian, T={samples}, batch {batch} / {reference}", medians["last"] / medians["deterministic"]),
        (f"floor: one pass of resnet18 with every conv and linear computed twice on the folded batch of {samples}x{batch} / {reference}",
         medians["two passes"] / medians["deterministic"]),
        (f"floor: drawing {samples} weight sets of resnet18 (torch.randn, {samples} x {weights / 1e6:.1f}M normals) / {reference}",
         medians["weight draws"] / medians["deterministic"]),
    ]


CONVERSION_ROUNDS = 4  # times the other rows' repetitions: a conversion takes a fraction of a second, and its time swings


def vinn_at(revision: str) -> ModuleType:
    """The ``vinn`` package as it was at git ``revision`` of this repository, imported beside this
    checkout's as ``vinn_at_revision`` (vinn's modules import each other relatively), to time a
    change against an earlier version in one process. ValueError if git cannot produce it."""
    folder = Path(tempfile.mkdtemp(prefix="vinn-at-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "vinn"], capture_output=True)
    if archive.returncode != 0:
        raise ValueError(f"--conversion-baseline {revision!r}: git archive failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "vinn_at_revision"
    (folder / "vinn").rename(package)
    spec = importlib.util.spec_from_file_location(package.name, package / "__init__.py", submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package.name] = module
    spec.loader.exec_module(module)
    return module


def bench_memory_and_conversion(device: torch.device, repeats: int, baseline: str | None = None) -> list[tuple[str, float]]:
    """The memory row and the conversion row; with ``baseline`` (a git revision), the conversion
    also by vinn at that revision, interleaved with the others in the same process."""
    det = resnet18(device)
    rows = [("parameters + buffers, bayesify(resnet18) / resnet18", numel(vinn.bayesify(det)) / numel(det))]
    resnet50 = torchvision.models.resnet50().to(device)
    versions = {"": vinn} if baseline is None else {"": vinn, f" with vinn at {baseline}": vinn_at(baseline)}
    fns = {f"bayesify{label}": partial(version.bayesify, resnet50) for label, version in versions.items()}
    medians = interleaved_medians({"deepcopy": partial(copy.deepcopy, resnet50), **fns}, repeats, device, collect=True)
    for label in versions:
        rows.append((f"time of bayesify(resnet50){label} / copy.deepcopy(resnet50)", medians[f"bayesify{label}"] / medians["deepcopy"]))
    return rows


GRADIENT_SCALE = 0.05  # the posterior scale of the gradient-variance rows: one at which the noise matters, as after some training
GRADIENT_DATASET_SIZE = 60_000  # their ELBO's N (MNIST's)


def gradient_problem(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The deterministic MLP 784-400-400-10 of the gradient-variance rows and its fixed batch of 128: (model, x, y)."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 784, device=device), torch.randint(0, 10, (128,), device=device)
    model = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
    return model.to(device), x, y


def gradient_variance(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], locs: list[torch.Tensor],
    x: torch.Tensor, y: torch.Tensor, draws: int,
) -> float:
    """Variance of the gradient of ``loss_fn(model(x), y)`` w.r.t. ``locs`` over ``draws`` passes, averaged over their elements."""
    grads = [torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(model(x), y), locs)]) for _ in range(draws)]
    return torch.stack(grads).var(0).mean().item()


def vinn_gradient_variances(device: torch.device, draws: int) -> dict[str, float]:
    """Variance of the minibatch ELBO gradient w.r.t. the posterior weight locs, over fresh noise only, per estimator.

    Same MLP, same parameters (the locs at the deterministic weights, every scale `GRADIENT_SCALE`),
    same fixed batch for every estimator (`gradient_problem`): the only randomness is the estimator's.
    """
    det, x, y = gradient_problem(device)
    variances = {}
    for estimator in ESTIMATORS:
        spec = vinn.LayerSpec(estimator=estimator, init_scale=GRADIENT_SCALE)
        model = vinn.bayesify(det, config=vinn.BayesConfig().set_global(spec))
        elbo = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=GRADIENT_DATASET_SIZE)
        locs = [m.weight for m in model.modules() if isinstance(m, vinn.BayesianLayer)]
        variances[estimator] = gradient_variance(model, elbo, locs, x, y, draws)
    return variances


def bench_gradient_variance(device: torch.device, draws: int) -> list[tuple[str, float]]:
    """`vinn_gradient_variances`, each as a multiple of the lowest."""
    variances = vinn_gradient_variances(device, draws)
    lowest = min(variances.values())
    return [(f"ELBO gradient variance, MLP 784-400-400-10, batch 128, {name} (x lowest)", v / lowest) for name, v in variances.items()]


def header(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (
        f"{datetime.date.today()} · {name} · {os.cpu_count()} CPUs, torch.get_num_threads()={torch.get_num_threads()} · "
        f"torch {torch.__version__} · Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="one repetition on small batches: checks that everything runs")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (minutes of compiling)")
    parser.add_argument("--readme", help="Markdown file whose run block gets the table (benchmarks/README.md)")
    parser.add_argument("--conversion-baseline", metavar="REVISION", help="also time bayesify by vinn at this git revision, in the same run")
    args = parser.parse_args()
    device = torch.device(args.device)
    # quick: one repetition on small batches, to check that every row runs
    repeats, batch, predict_batch, samples = (1, 4, 4, 4) if args.quick else (args.repeats, 32, 64, 16)
    lines = [header(device), "", "| measurement | ratio |", "|---|---|"]
    print("\n".join(lines))
    sections = [
        lambda: bench_training(device, repeats, batch=batch),
        lambda: bench_prediction(device, repeats, batch=predict_batch, samples=samples),
        lambda: bench_memory_and_conversion(device, CONVERSION_ROUNDS * repeats, args.conversion_baseline),
        lambda: bench_gradient_variance(device, draws=10 if args.quick else 200),
    ]
    if not args.no_compile:
        sections.append(lambda: bench_compile(device, repeats, batch=32))
    for section in sections:
        for name, ratio in section():
            lines.append(f"| {name} | {ratio:.2f}× |")
            print(lines[-1], flush=True)
    if args.readme is not None:
        rewrite_block(Path(args.readme), "run", "\n".join(lines))


if __name__ == "__main__":
    main()
