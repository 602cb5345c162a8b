"""UCI regression benchmark: vinn's recommended recipe beside the deterministic net, MC dropout and
the published VI, PBP and MC-dropout rows.

Measures, on Boston housing and red wine quality (``../shared/data/uci/``, beside the repository),
the test RMSE and test log-likelihood (nats per test point, of the predictive mixture, in the
target's original units) of a network with one hidden layer of 50 ReLU units trained with Adam (lr
1e-3, batch 32) for each budget in ``--epochs``, over ``--splits`` random 90/10 splits (split i is
seeded with i), as mean ± standard error over the splits. Every method learns its noise variance,
``--noise``: ``per-input`` (the default), a second output of the network, so the noise can differ
from input to input (heteroscedastic); ``shared``, one variance for all inputs, the published
rows' model, learned as a log-variance at the posterior scales' rate. With ``per-input``, every
method first fits its mean: it uses one shared variance for the first ``--warmup`` share of each
budget (default `uci_common.WARMUP`, a half), then its variance output, started at that value.
Every method is trained with the same optimizer groups (`vinn.param_groups`, scale lr
``--scale-lr-ratio`` x lr). Each budget is a training run of its own; without a warm-up one run is
scored at each budget (scoring leaves the training's random stream untouched, so the 40-epoch row
is the 40-epoch model). Methods:

- ``vinn``: the recommended recipe (`uci_common.bayesian_regressor`, trained on `vinn.ELBO`),
  100 posterior samples;
- ``deterministic``: the same network with torch.nn layers, trained on the Gaussian likelihood;
- ``MC dropout``: dropout with rate p (each of ``--dropout``; default 0.01 and 0.05, from their
  grid) on the input and the hidden layer as in Gal & Ghahramani (2016), their weight decay
  (length scale 1e-2), 100 dropout masks at test time.

Run from the repository root::

    .venv/bin/python benchmarks/quality/uci.py                   # 20 splits, 40 and 400 epochs
    .venv/bin/python benchmarks/quality/uci.py --quick           # 2 splits, 2 and 4 epochs: checks it runs
    .venv/bin/python benchmarks/quality/uci.py --epochs 40 --splits 5 --jobs 2
    .venv/bin/python benchmarks/quality/uci.py --epochs 40 100 200 400 --datasets boston --methods vinn

Prints a Markdown table and writes it to ``benchmarks/quality/results-uci-<date>.md``
(``--quick`` writes nothing unless ``--out`` is given); with ``--readme README.md``,
also into that file's ``uci`` block.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import vinn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uci_common as uci  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLES = 100
DROPOUT_RATES = (0.01, 0.05)
DROPOUT_LENGTH_SCALE = 1e-2  # Gal & Ghahramani's prior length scale, which sets their weight decay


@dataclass(frozen=True)
class Method:
    """A row of the table: ``build(inputs, train_size, noise)`` gives the network and its loss."""

    name: str
    build: Callable[[int, int, str], tuple[uci.Regressor, uci.Loss]]


def vinn_recipe(inputs: int, train_size: int, noise: str) -> tuple[uci.Regressor, uci.Loss]:
    """The recommended vinn network and its negative ELBO."""
    model = uci.bayesian_regressor(inputs, noise)
    return model, uci.elbo_loss(model, train_size)


def deterministic(inputs: int, train_size: int, noise: str) -> tuple[uci.Regressor, uci.Loss]:
    """The same network with torch.nn layers and the Gaussian negative log-likelihood."""
    body = nn.Sequential(nn.Linear(inputs, uci.HIDDEN), nn.ReLU(), nn.Linear(uci.HIDDEN, uci.outputs(noise)))
    return uci.Regressor(body, noise), uci.gaussian_nll


def mc_dropout(rate: float, inputs: int, train_size: int, noise: str) -> tuple[uci.Regressor, uci.Loss]:
    """Gal & Ghahramani's UCI network: dropout ``rate`` before each Linear, and their weight decay.

    The decay is their prior's, ``l² (1 - p) / (2 N) ||W||²`` per example with length scale
    ``l`` (the noise precision of their formula is learned here, inside the likelihood).
    """
    linears = [nn.Linear(inputs, uci.HIDDEN), nn.Linear(uci.HIDDEN, uci.outputs(noise))]
    body = nn.Sequential(nn.Dropout(rate), linears[0], nn.ReLU(), nn.Dropout(rate), linears[1])
    decay = DROPOUT_LENGTH_SCALE**2 * (1 - rate) / (2 * train_size)

    def loss(model: uci.Regressor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return uci.gaussian_nll(model, x, y) + decay * sum(linear.weight.square().sum() for linear in linears)

    return uci.Regressor(body, noise), loss


# The row families of the table, in table order, each giving its rows for the MC dropout rates asked.
METHOD_FAMILIES: dict[str, Callable[[list[float]], list[Method]]] = {
    "vinn": lambda rates: [Method("vinn (recipe)", vinn_recipe)],
    "deterministic": lambda rates: [Method("deterministic", deterministic)],
    "dropout": lambda rates: [Method(f"MC dropout p={rate:g}", functools.partial(mc_dropout, rate)) for rate in rates],
}


def methods(families: list[str], dropout_rates: list[float]) -> list[Method]:
    """The rows of the table for each family in ``families`` (keys of `METHOD_FAMILIES`), in table order."""
    return [method for family, rows in METHOD_FAMILIES.items() if family in families for method in rows(dropout_rates)]


def run_split(
    method: Method, dataset: str, index: int, epochs: tuple[int, ...], scale_lr_ratio: float, noise: str, warmup: float
) -> dict[int, tuple[float, float]]:
    """Train ``method`` with noise model ``noise`` on split ``index`` of ``dataset``, its variance
    shared for the first ``warmup`` share of each budget.

    Returns {epoch: (test RMSE, test LL)} for each budget in ``epochs``.
    """
    torch.set_num_threads(1)
    x, y = uci.load(dataset)
    data = uci.split(x, y, index)
    results = {}
    # the warm-up's length depends on the budget: then every budget is a run of its own
    for budgets in [epochs] if warmup == 0 or noise == "shared" else [(epoch,) for epoch in epochs]:
        torch.manual_seed(index)
        model, loss = method.build(x.shape[1], len(data.y_train), noise)
        optimizer = torch.optim.Adam(vinn.param_groups(model, lr=uci.LR, scale_lr=scale_lr_ratio * uci.LR))

        def on_epoch(epoch: int, model: uci.Regressor = model, budgets: tuple[int, ...] = budgets) -> None:
            if epoch in budgets:
                results[epoch] = uci.scores(model, data, SAMPLES, seed=index)

        budget = max(budgets)
        uci.train(model, loss, optimizer, data, budget, seed=index, warmup=round(warmup * budget), on_epoch=on_epoch)
    return results


def cell(values: list[float], digits: int = 2) -> str:
    """``mean ± s.e.`` of the values over splits."""
    mean, se = uci.mean_and_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(
    results: dict[tuple[str, str, int], list[tuple[float, float]]], rows: list[Method], epochs: tuple[int, ...], datasets: list[str]
) -> str:
    """The Markdown table: measured rows (method, epochs), then the published rows."""
    header = "| method | epochs | " + " | ".join(f"{d} RMSE | {d} LL" for d in datasets) + " |"
    lines = [header, "|---|---:|" + "---|---|" * len(datasets)]
    for method in rows:
        for epoch in epochs:
            cells = []
            for dataset in datasets:
                rmse, ll = zip(*results[method.name, dataset, epoch])
                cells += [cell(list(rmse)), cell(list(ll))]
            lines.append(f"| {method.name} | {epoch} | " + " | ".join(cells) + " |")
    for name, published in uci.PUBLISHED.items():
        cells = [f"{r[0]:.2f} ± {r[1]:.2f} | {r[2]:.2f} ± {r[3]:.2f}" for r in (published[d] for d in datasets)]
        lines.append(f"| {name} (published) | — | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 splits, 2 and 4 epochs: checks that everything runs")
    parser.add_argument("--epochs", type=int, nargs="+", help="training budgets to score (default: 40 400)")
    parser.add_argument("--splits", type=int, help="number of random splits (default: 20)")
    parser.add_argument("--datasets", nargs="+", choices=uci.DATASETS, default=list(uci.DATASETS))
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHOD_FAMILIES), default=list(METHOD_FAMILIES),
        help="the measured rows (default: all; dropout gives one row per --dropout rate)",
    )  # fmt: skip
    parser.add_argument(
        "--scale-lr-ratio", type=float, default=uci.SCALE_LR_RATIO,
        help=f"scale_lr / lr of vinn.param_groups, for every method (default: the recipe's {uci.SCALE_LR_RATIO:g})",
    )  # fmt: skip
    parser.add_argument(
        "--dropout", type=float, nargs="+", default=list(DROPOUT_RATES),
        help=f"MC dropout rates, one row each (default: {' '.join(map(str, DROPOUT_RATES))}, from Gal & Ghahramani's grid)",
    )  # fmt: skip
    parser.add_argument(
        "--noise", choices=uci.NOISE_MODELS, default=uci.NOISE_MODELS[0],
        help="noise variance of every method: per input, an output of the network (default), or shared by all inputs",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=float, default=uci.WARMUP,
        help=f"share of each budget a per-input noise model spends with a shared variance (default: the recipe's {uci.WARMUP:g})",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each (default: 1)")
    parser.add_argument("--out", type=Path, help="results file (default: results-uci-<date>.md here; none with --quick)")
    parser.add_argument("--readme", type=Path, help="Markdown file whose uci block gets the table (README.md)")
    args = parser.parse_args()
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup must be a share of the budget in [0, 1), got {args.warmup:g}")
    epochs = tuple(sorted(args.epochs or ([2, 4] if args.quick else [40, 400])))
    splits = args.splits or (2 if args.quick else 20)
    today = datetime.date.today().isoformat()
    out = args.out or (None if args.quick else HERE / f"results-uci-{today}.md")

    start = time.perf_counter()
    rows = methods(args.methods, args.dropout)
    tasks = [(m, d, i) for m in rows for d in args.datasets for i in range(splits)]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {task: pool.submit(run_split, *task, epochs, args.scale_lr_ratio, args.noise, args.warmup) for task in tasks}
        results: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
        for (method, dataset, _), future in futures.items():
            for epoch, score in future.result().items():
                results.setdefault((method.name, dataset, epoch), []).append(score)
    elapsed = time.perf_counter() - start

    report = "\n".join([
        f"# UCI regression, {today}",
        "",
        f"`{' '.join(['benchmarks/quality/uci.py', *sys.argv[1:]])}`: {splits} splits, {SAMPLES} samples, "
        f"Adam lr {uci.LR} batch {uci.BATCH_SIZE}, vinn.param_groups with scale lr = {args.scale_lr_ratio:g} x lr; "
        f"recipe: {uci.recipe(args.noise, args.warmup)}. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{args.jobs} process(es) x 1 thread, {elapsed:.0f} s. Test RMSE and test log-likelihood "
        "(nats per point) in the target's units, mean ± standard error over splits.",
        "",
        table(results, rows, epochs, args.datasets),
        "",
    ])  # fmt: skip
    uci.publish(report, out, args.readme, "uci")


if __name__ == "__main__":
    main()
