"""How fast posterior scales learn, for each candidate scale learning-rate ratio (scale_lr / lr).

Adam moves every parameter by about its learning rate per step; a posterior scale has to travel
several units of log σ² from its initial value, a weight a fraction of one. This measures, for
each ratio in ``--ratios``, whether the scales of the recommended UCI network
(`uci_common.bayesian_regressor`, Adam lr 1e-3, batch 32, ``vinn.param_groups(scale_lr=ratio * lr)``)
converge within the deterministic model's budget of 40 epochs:

- every epoch, the median posterior σ over all weights and biases of the network;
- the run goes on until that median changes by less than 1% over 100 epochs (converged) or
  ``--max-epochs`` is reached;
- reported per ratio, as the geometric mean over ``--splits`` splits: the median σ at 10, 20 and
  40 epochs and at the end, the epoch it converged at, the share of the way (in log σ, from the
  initial scale to the converged value) covered by epoch 40, and the test log-likelihood (nats
  per point, target's units, 100 samples; mean over splits) at 40 epochs and at the end.

Run from the repository root::

    .venv/bin/python benchmarks/quality/scale_learning.py                      # Boston, 2 splits
    .venv/bin/python benchmarks/quality/scale_learning.py --datasets boston wine --splits 3
    .venv/bin/python benchmarks/quality/scale_learning.py --quick              # checks that it runs

Prints a Markdown table and writes it to ``benchmarks/quality/results-scale-learning-<date>.md``
(``--quick`` writes nothing unless ``--out`` is given); with ``--readme README.md``,
also into that file's ``scale-learning`` block.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import vinn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uci_common as uci  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLES = 100
BUDGET = 40  # the deterministic model's own budget (epochs), as in the published protocol
REPORTED_EPOCHS = (10, 20, BUDGET)
WINDOW = 100  # converged: the median σ moved by less than TOLERANCE over this many epochs
TOLERANCE = 0.01


def median_scale(model: torch.nn.Module) -> float:
    """Median posterior σ over every weight and bias element of the model's vinn layers."""
    scales = [
        scale.detach().flatten()
        for layer in model.modules()
        if isinstance(layer, vinn.BayesianLayer)
        for scale in (layer.weight_scale, layer.bias_scale)
        if scale is not None
    ]  # fmt: skip
    return float(torch.cat(scales).median())


def trajectory(dataset: str, ratio: float, index: int, max_epochs: int, noise: str) -> dict[str, object]:
    """Train the recipe (noise model ``noise``) on split ``index`` of ``dataset`` until converged.

    The scale learning rate is ``ratio * lr``.

    Returns ``sigma``: the median σ before training and after every epoch (list, epochs + 1
    values), ``converged``: the epoch it converged at or None, and ``ll``: {epoch: test LL} at
    `BUDGET` and at the last epoch.
    """
    torch.set_num_threads(1)
    x, y = uci.load(dataset)
    data = uci.split(x, y, index)
    torch.manual_seed(index)
    model = uci.bayesian_regressor(x.shape[1], noise)
    loss = uci.elbo_loss(model, len(data.y_train))
    optimizer = torch.optim.Adam(vinn.param_groups(model, lr=uci.LR, scale_lr=ratio * uci.LR))
    sigma, ll = [median_scale(model)], {}
    converged = None

    def on_epoch(epoch: int) -> bool:
        nonlocal converged
        sigma.append(median_scale(model))
        if epoch == BUDGET:
            ll[epoch] = uci.scores(model, data, SAMPLES, seed=index)[1]
        if epoch >= WINDOW and abs(math.log(sigma[-1] / sigma[-1 - WINDOW])) < math.log1p(TOLERANCE):
            converged = epoch
        return converged is not None

    uci.train(model, loss, optimizer, data, max_epochs, seed=index, on_epoch=on_epoch)
    ll[len(sigma) - 1] = uci.scores(model, data, SAMPLES, seed=index)[1]
    return {"sigma": sigma, "converged": converged, "ll": ll}


def row(dataset: str, ratio: float, runs: list[dict[str, object]]) -> str:
    """One table row: geometric means of the median σ over splits, mean test LL."""

    def geometric_mean(values: list[float]) -> float:
        return float(np.exp(np.mean(np.log(values))))

    def at(epoch: int) -> float:
        return geometric_mean([run["sigma"][min(epoch, len(run["sigma"]) - 1)] for run in runs])

    start, final = at(0), geometric_mean([run["sigma"][-1] for run in runs])
    share = math.log(at(BUDGET) / start) / math.log(final / start)
    epochs = [run["converged"] for run in runs]
    converged = "/".join("not" if e is None else str(e) for e in epochs)
    ll_budget = np.mean([run["ll"][BUDGET] for run in runs])
    ll_final = np.mean([run["ll"][len(run["sigma"]) - 1] for run in runs])
    sigmas = " | ".join(f"{at(e):.4f}" for e in REPORTED_EPOCHS)
    return f"| {dataset} | {ratio:g} | {sigmas} | {final:.4f} | {converged} | {100 * share:.0f}% | {ll_budget:.2f} | {ll_final:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 split, ratios 1 and 10, at most 120 epochs")
    parser.add_argument("--ratios", type=float, nargs="+", help="scale_lr / lr ratios (default: 1 3 10 30 100)")
    parser.add_argument("--datasets", nargs="+", choices=uci.DATASETS, default=["boston"])
    parser.add_argument("--splits", type=int, help="splits per ratio (default: 2)")
    parser.add_argument("--max-epochs", type=int, help="stop a run that has not converged by then (default: 1000)")
    parser.add_argument(
        "--noise", choices=uci.NOISE_MODELS, default=uci.NOISE_MODELS[0],
        help="noise variance: per input, an output of the network (default), or shared by all inputs",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one thread each (default: 1)")
    parser.add_argument("--out", type=Path, help="results file (default: results-scale-learning-<date>.md here)")
    parser.add_argument("--readme", type=Path, help="Markdown file whose scale-learning block gets the table (README.md)")
    args = parser.parse_args()
    ratios = args.ratios or ([1.0, 10.0] if args.quick else [1.0, 3.0, 10.0, 30.0, 100.0])
    splits = args.splits or (1 if args.quick else 2)
    max_epochs = args.max_epochs or (WINDOW + 20 if args.quick else 1000)
    today = datetime.date.today().isoformat()
    out = args.out or (None if args.quick else HERE / f"results-scale-learning-{today}.md")

    start = time.perf_counter()
    keys = [(d, r) for d in args.datasets for r in ratios]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {key: [pool.submit(trajectory, *key, i, max_epochs, args.noise) for i in range(splits)] for key in keys}
        runs = {key: [f.result() for f in fs] for key, fs in futures.items()}
    elapsed = time.perf_counter() - start

    header = " | ".join(f"median σ at {e}" for e in REPORTED_EPOCHS)
    lines = [
        f"# Posterior scale learning, {today}",
        "",
        f"`{' '.join(['benchmarks/quality/scale_learning.py', *sys.argv[1:]])}`: recipe {uci.recipe(args.noise, 0)}; Adam lr "
        f"{uci.LR}, batch {uci.BATCH_SIZE}, scale lr = ratio x lr; {splits} split(s) per ratio (σ: geometric "
        f"mean over splits, LL: mean); converged = median σ moved < {TOLERANCE:.0%} over {WINDOW} epochs, "
        f"at most {max_epochs} epochs. \"% at {BUDGET}\": share of the way from the initial to the final median "
        f"σ covered by epoch {BUDGET}, in log σ. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{args.jobs} process(es) x 1 thread, {elapsed:.0f} s.",
        "",
        f"| dataset | ratio | {header} | final median σ | converged at epoch | % at {BUDGET} | test LL at {BUDGET} | test LL at end |",
        "|---|---:|" + "---:|" * (len(REPORTED_EPOCHS) + 5),
        *(row(d, r, runs[d, r]) for d, r in keys),
        "",
    ]  # fmt: skip
    report = "\n".join(lines)
    uci.publish(report, out, args.readme, "scale-learning")


if __name__ == "__main__":
    main()
