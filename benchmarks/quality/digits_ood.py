"""Digits out-of-distribution benchmark: does the Bayesian model know what it doesn't know?

    .venv/bin/python benchmarks/quality/digits_ood.py [--seeds 0 1 2 3 4] [--quick] [--jobs N] [--out DIR]

For every seed, on the demo's data (`examples/demo.py`: scikit-learn digits 0-8 at 16x16, 10% of
the training labels wrong, clean test labels), in the same script (``--jobs``: several seeds at
a time, each in its own single-threaded process):

1. pretrains the demo's `SmallResNet` (the deterministic baseline, the demo's own budget);
2. evaluates ten methods on the test digits and on four out-of-distribution sets (uniform noise,
   test digits rotated by 90°, inverted digits, the never-seen 9s):
   - the pretrained model itself;
   - the pretrained model fine-tuned as the Bayesian ones are, deterministic (cross-entropy, the
     same epochs, learning rate and frozen batch norm): what the fine-tuning does without a
     posterior;
   - `vinn.bayesify` of every layer, the head a `vinn.MatrixNormal` whose column covariance starts
     from the training features (`vinn.init_column_covariance`), fine-tuned with `vinn.ELBO`
     (`FULL_RECIPE`);
   - the same head alone Bayesian, the recommended recipe (`MATRIX_NORMAL_RECIPE`);
   - each of these two as a `vinn.Mixture` of 3 fine-tunings of the same pretrained model (seeds
     s, s + 100, s + 200; the first is the single model's), predicting by T samples in all;
   - a mean-field head alone Bayesian, the earlier recipe (`LAST_LAYER_RECIPE`);
   - laplace-torch's last-layer KFAC Laplace on the same pretrained model, as its README
     recommends (``subset_of_weights="last_layer"``, ``hessian_structure="kron"``, ``fit``,
     ``optimize_prior_precision``), predicting by ``T`` samples of its linearised (GLM)
     predictive; the row is skipped, with a message, if laplace-torch is not installed
     (``pip install -e '.[bench]'``);
   - MC dropout: the same CNN with dropout, trained with the same budget, ``T`` dropout samples;
   - a deep ensemble of 5: the pretrained CNN and 4 more trained the same way from other seeds.

Metrics: accuracy, mean confidence (the mean of the max mean probability: below the accuracy,
the model is underconfident), NLL (nats), ECE (15 bins), Brier score, NLL and ECE against the
labels' training distribution (`noisy_label_distribution`: what the models were trained to
predict), and the AUROC of telling the test digits from each out-of-distribution set by five
scores (higher = more in-distribution): the max mean probability, `vinn.confidence_score`, minus the predictive entropy, minus the mutual
information (BALD) and minus the epistemic variance summed over classes (`vinn.uncertainty`).
The main table scores each set as the README recommends (`RECOMMENDED_SCORE`): the mutual
information for inputs unlike the training data, the predictive entropy for the unseen class; a
model of one sample, which has no epistemic part, by the max probability instead of the mutual
information. The second table gives every score. Prints the two Markdown tables (mean ±
standard error over the seeds) and writes them to ``DIR/results-digits-ood-<date>.md``
(``--quick``: ``...-quick.md``; default DIR is this folder), and with ``--readme README.md``
into that file's ``digits-ood`` block. ``--quick``: one seed, a few epochs and samples, to check
that everything runs (< 60 s).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import demo  # noqa: E402  (the demo's model, data, training loop)
from readme_blocks import rewrite_block  # noqa: E402

import vinn  # noqa: E402

ENSEMBLE_SIZE = 5
DROPOUT = 0.2  # MC dropout: after each residual stage (channels) and before the head
MIXTURE_SIZE = 3
# The recipes also run as a `vinn.Mixture` of MIXTURE_SIZE fine-tunings (`mixture_name`).
MIXED = ("bayesify full", "bayesify last layer, MatrixNormal")


def mixture_name(method: str) -> str:
    return f"{method}, mixture of {MIXTURE_SIZE}"


METHODS = (
    "pretrained",
    "fine-tuned, deterministic",
    "bayesify full",
    mixture_name("bayesify full"),
    "bayesify last layer, mean-field",
    "bayesify last layer, MatrixNormal",
    mixture_name("bayesify last layer, MatrixNormal"),
    "laplace-torch last layer",
    "MC dropout",
    "deep ensemble",
)
# Models of one sample, which have no epistemic part: scored by `DETERMINISTIC_SCORES`.
DETERMINISTIC_METHODS = ("pretrained", "fine-tuned, deterministic")
README_BLOCK = "digits-ood"
LAPLACE_MISSING = "laplace-torch is not installed (pip install -e '.[bench]'): its row is skipped"


@dataclass(frozen=True)
class Budget:
    """Training and prediction budget: epochs of pretraining (every deterministic model), of ELBO
    fine-tuning, and the Monte Carlo samples ``T`` of every sampled prediction."""

    pretrain_epochs: int
    finetune_epochs: int
    samples: int


FULL_BUDGET = Budget(pretrain_epochs=60, finetune_epochs=20, samples=64)
QUICK_BUDGET = Budget(pretrain_epochs=1, finetune_epochs=1, samples=4)


@dataclass(frozen=True)
class Recipe:
    """How the pretrained model is made Bayesian and fine-tuned with `vinn.ELBO`.

    ``head``: the `vinn.LayerSpec` of the last layer (the network's one ``nn.Linear``);
    ``trunk``: that of every convolution, None to keep them deterministic. The whole network
    trains (batch norm keeps its pretrained statistics): Adam at ``lr`` for the posterior locs
    and the deterministic parameters, ``scale_lr`` for the posterior scales (None:
    ``lr * vinn.SCALE_LR_RATIO``), by `vinn.param_groups`. ``data_shaped``: a `vinn.MatrixNormal`
    head's column covariance starts from the training inputs (`vinn.init_column_covariance`).
    """

    head: vinn.LayerSpec
    trunk: vinn.LayerSpec | None
    lr: float
    scale_lr: float | None = None
    data_shaped: bool = False

    def config(self) -> vinn.BayesConfig:
        """The `vinn.BayesConfig` for `vinn.bayesify`."""
        return vinn.BayesConfig().set_global(self.trunk).set_type(nn.Linear, self.head)

    def __str__(self) -> str:
        def spec(s: vinn.LayerSpec | None) -> str:
            posterior = "" if s is None or s.posterior is Normal else f"posterior {s.posterior.__name__}, "
            return "deterministic" if s is None else f"{posterior}init_scale {s.init_scale}, prior {s.prior}"

        scale_lr = self.lr * vinn.SCALE_LR_RATIO if self.scale_lr is None else self.scale_lr
        shaped = "; column covariance from the training inputs (vinn.init_column_covariance)" if self.data_shaped else ""
        return f"head: {spec(self.head)}{shaped}; convolutions: {spec(self.trunk)}; Adam lr {self.lr:g}, scale lr {scale_lr:g}"


# The recommended recipe, the demo's (`examples/demo.py`: one place for it): the head a
# `vinn.MatrixNormal` whose column covariance starts from the training features
# (`vinn.init_column_covariance`), the whole network fine-tuned at 1e-3 and the scales at 3e-3.
# Chosen by scratch runs on seeds 0-4, whose figures are in benchmarks/README.md ("Leads"): the
# start, not the learning, gives the detection (at lr 3e-4, init_scale 0.07, V = I detects noise
# no better than a mean-field head); faster scales or larger heads detect more and calibrate
# worse; a frozen trunk or a lower learning rate leaves the model underconfident.
SHAPED_HEAD = vinn.LayerSpec(posterior=vinn.MatrixNormal, init_scale=demo.INIT_SCALE, prior=Normal(0.0, 1.0))
MATRIX_NORMAL_RECIPE = Recipe(head=SHAPED_HEAD, trunk=None, lr=demo.FINETUNE_LR, scale_lr=demo.SCALE_LR, data_shaped=True)
# Every layer Bayesian: the convolutions start at a small fraction of each weight and learn their
# scales from there, under N(0, 1). A prior centred on the pretrained weights whose scale is fitted
# to the posterior (EmpiricalBayesPrior(pretrained=True)) holds the means where they were, which
# leaves the model as underconfident as a frozen trunk (benchmarks/README.md, "Leads").
FULL_RECIPE = Recipe(
    head=SHAPED_HEAD,
    trunk=vinn.LayerSpec(init_scale=vinn.RelativeScale(0.003, floor=1e-4), prior=Normal(0.0, 1.0)),
    lr=demo.FINETUNE_LR,
    scale_lr=demo.SCALE_LR,
    data_shaped=True,
)
# The earlier recipe, a mean-field head at the same scale learning rate, for comparison: as
# calibrated, but it tells unseen inputs apart less well.
LAST_LAYER_RECIPE = Recipe(
    head=vinn.LayerSpec(init_scale=0.07, prior=Normal(0.0, 1.0)), trunk=None, lr=3e-4, scale_lr=demo.SCALE_LR
)


# Out-of-distribution scores, higher = more in-distribution; the last two are 0 for a model of
# one sample (`DETERMINISTIC_METHODS`), so its per-score rows stop before them.
SCORE_NAMES = ("max probability", "confidence score", "-entropy", "-mutual information", "-epistemic variance")
DETERMINISTIC_SCORES = SCORE_NAMES[:3]
# The score the README recommends for each kind of set (measured: the mutual information, or the
# epistemic variance close to it, is the best single score of every sampled method on the first
# three sets; the entropy of most on the unseen class).
RECOMMENDED_SCORE = {"noise": "-mutual information", "rotated": "-mutual information", "inverted": "-mutual information"}
UNSEEN_CLASS_SCORE = "-entropy"


def recommended_score(ood_set: str, deterministic: bool) -> str:
    """The score of the main table for ``ood_set``; a model of one sample, whose mutual information
    is 0, is scored by the max probability instead."""
    score = RECOMMENDED_SCORE.get(ood_set, UNSEEN_CLASS_SCORE)
    return "max probability" if deterministic and score == "-mutual information" else score


def scores(p: Tensor) -> dict[str, Tensor]:
    """The `SCORE_NAMES` scores of predictive samples ``p`` (T, N, C), each (N,)."""
    values = (
        p.mean(0).amax(1),
        vinn.confidence_score(p),
        -vinn.predictive_entropy(p),
        -vinn.mutual_information(p),
        -vinn.uncertainty(p)[1].sum(1),
    )
    return dict(zip(SCORE_NAMES, values))


def noisy_label_distribution(y: Tensor) -> Tensor:
    """(N, C): the law of each label of ``y`` (N,) under the training labels' noise
    (`demo.noisy_labels`): kept with probability 1 - `demo.LABEL_NOISE`, else any other class."""
    other = demo.LABEL_NOISE / (demo.N_CLASSES - 1)
    onehot = F.one_hot(y, demo.N_CLASSES).float()
    return onehot * (1 - demo.LABEL_NOISE) + (1 - onehot) * other


def evaluate(p: Tensor, y: Tensor, p_ood: dict[str, Tensor]) -> dict[str, float]:
    """Metrics of predictive samples ``p`` (T, N, C) on the test digits with labels ``y`` (N,)
    and ``p_ood`` {set: (T, M, C)}: accuracy, mean confidence, NLL, ECE, Brier score, NLL and ECE
    against the labels' training distribution, and ``"AUROC <set> / <score>"`` for every
    out-of-distribution set and score of `scores`."""
    mean, noisy = p.mean(0), noisy_label_distribution(y)
    log_mean = mean.clamp_min(1e-12).log()
    metrics = {
        "accuracy": (mean.argmax(1) == y).float().mean().item(),
        "confidence": mean.amax(1).mean().item(),
        "NLL": F.nll_loss(log_mean, y).item(),
        "ECE": vinn.expected_calibration_error(p, y),
        "Brier": vinn.brier_score(p, y),
        "NLL (noisy labels)": -(noisy * log_mean).sum(1).mean().item(),
        "ECE (noisy labels)": vinn.expected_calibration_error(p, noisy),
    }
    inside = scores(p)
    for name, q in p_ood.items():
        outside = scores(q)
        metrics |= {f"AUROC {name} / {score}": vinn.auroc(inside[score], outside[score]) for score in inside}
    return metrics


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = demo.PRETRAIN_LR, freeze_batch_norm: bool = False) -> nn.Module:
    """``model`` trained as the demo pretrains (Adam at ``lr``, cross-entropy, cosine decay; batch
    norm's statistics kept with ``freeze_batch_norm``), returned in eval mode. ``x``: (N, 1, 16,
    16) images; ``y``: (N,) labels."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    demo.fit(model, nn.CrossEntropyLoss(), optimizer, x, y, epochs, desc="training", freeze_batch_norm=freeze_batch_norm)
    return model.eval()


def with_dropout(model: nn.Module, p: float) -> nn.Module:
    """``model`` (a `demo.SmallResNet`) with channel dropout after each residual stage and dropout
    before the head, all of rate ``p``; modified in place and returned."""
    model.layer1 = nn.Sequential(model.layer1, nn.Dropout2d(p))
    model.layer2 = nn.Sequential(model.layer2, nn.Dropout2d(p))
    model.head = nn.Sequential(nn.Dropout(p), model.head)
    return model


@torch.no_grad()
def mc_dropout_predict(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """(T, N, C) probabilities of ``samples`` passes of ``model`` on ``x`` (N, ...) with its
    dropout layers active and batch norm in eval mode."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
    probabilities = torch.stack([model(x).softmax(1) for _ in range(samples)])
    model.eval()
    return probabilities


def bayesify_and_finetune(pretrained: nn.Module, recipe: Recipe, x: Tensor, y: Tensor, epochs: int) -> nn.Module:
    """A Bayesian copy of ``pretrained`` made and fine-tuned with ``vinn.ELBO`` by ``recipe``
    for ``epochs`` epochs on ``x`` (N, 1, 16, 16), ``y`` (N,); returned in eval mode."""
    bnn = vinn.bayesify(pretrained, recipe.config())
    if recipe.data_shaped:
        vinn.init_column_covariance(bnn, x)
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=recipe.lr, scale_lr=recipe.scale_lr))
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=len(x))
    demo.fit(bnn, elbo, optimizer, x, y, epochs, desc="fine-tuning", freeze_batch_norm=True)
    return bnn.eval()


def laplace_predict(pretrained: nn.Module, x: Tensor, y: Tensor, inputs: dict[str, Tensor], samples: int, seed: int) -> dict[str, Tensor] | None:
    """laplace-torch's last-layer KFAC Laplace of ``pretrained``, fitted on ``x``, ``y``, its
    prior precision optimised by marginal likelihood: {name: (T, M, C) probabilities} of
    ``samples`` draws of the GLM predictive on each of ``inputs`` {name: (M, ...)}; None if
    laplace-torch is not installed."""
    try:
        from laplace import Laplace
    except ImportError:
        return None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=demo.BATCH_SIZE)
    la = Laplace(pretrained, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision()
    generator = torch.Generator().manual_seed(seed)
    return {name: la.predictive_samples(v, pred_type="glm", n_samples=samples, generator=generator) for name, v in inputs.items()}


def run_seed(seed: int, budget: Budget) -> dict[str, dict[str, float]]:
    """Every method's metrics (see `evaluate`) for one seed: {method: {metric: value}}."""
    x_train, y_train, x_test, y_test, x_unseen = demo.split_digits()
    y_train = demo.noisy_labels(y_train, demo.LABEL_NOISE, seed)
    ood = demo.out_of_distribution(x_test, x_unseen, seed)
    inputs = {"test": x_test, **ood}

    members = []
    for member in range(ENSEMBLE_SIZE):  # member 0, seeded as the demo seeds, is "the pretrained model"
        torch.manual_seed(seed + 1000 * member)
        members.append(train(demo.SmallResNet(), x_train, y_train, budget.pretrain_epochs))
    pretrained = members[0]
    torch.manual_seed(seed)
    dropout_model = train(with_dropout(demo.SmallResNet(), DROPOUT), x_train, y_train, budget.pretrain_epochs)

    torch.manual_seed(seed)  # fine-tuned as `bayesify_and_finetune` fine-tunes, with cross-entropy instead of the ELBO
    finetuned = train(copy.deepcopy(pretrained), x_train, y_train, budget.finetune_epochs, lr=demo.FINETUNE_LR, freeze_batch_norm=True)

    predictions: dict[str, dict[str, Tensor] | None] = {}
    with torch.no_grad():
        predictions["pretrained"] = {k: pretrained(v).softmax(1)[None] for k, v in inputs.items()}
        predictions["fine-tuned, deterministic"] = {k: finetuned(v).softmax(1)[None] for k, v in inputs.items()}
        predictions["deep ensemble"] = {k: torch.stack([m(v).softmax(1) for m in members]) for k, v in inputs.items()}
    predictions["MC dropout"] = {k: mc_dropout_predict(dropout_model, v, budget.samples) for k, v in inputs.items()}
    recipes = {
        "bayesify full": FULL_RECIPE,
        "bayesify last layer, mean-field": LAST_LAYER_RECIPE,
        "bayesify last layer, MatrixNormal": MATRIX_NORMAL_RECIPE,
    }
    for method, recipe in recipes.items():
        fine_tunings = []
        for member in range(MIXTURE_SIZE if method in MIXED else 1):  # member 0 is the single model
            torch.manual_seed(seed + 100 * member)
            fine_tunings.append(bayesify_and_finetune(pretrained, recipe, x_train, y_train, budget.finetune_epochs))
        models = {method: fine_tunings[0]} | ({mixture_name(method): vinn.Mixture(fine_tunings)} if method in MIXED else {})
        for name, model in models.items():
            predictions[name] = {k: vinn.predict(model, v, samples=budget.samples, generator=seed) for k, v in inputs.items()}
    predictions["laplace-torch last layer"] = laplace_predict(pretrained, x_train, y_train, inputs, budget.samples, seed)

    return {method: evaluate(p["test"], y_test, {k: p[k] for k in ood}) for method, p in predictions.items() if p is not None}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)


def tables(runs: list[dict[str, dict[str, float]]], ood_sets: list[str]) -> str:
    """Three Markdown tables from per-seed results ``runs`` [{method: {metric: value}}]: the main
    one (each set scored as the README recommends), its differences from the pretrained model
    paired by seed, and the AUROC of every score, method and set."""
    methods = [m for m in METHODS if m in runs[0]]
    summary = {m: {k: mean_se([run[m][k] for run in runs]) for k in runs[0][m]} for m in methods}

    def cell(method: str, metric: str) -> str:
        mean, se = summary[method][metric]
        return f"{mean:.3f} ± {se:.3f}"

    def mean_auroc(method: str, score: str) -> float:
        return sum(summary[method][f"AUROC {s} / {score}"][0] for s in ood_sets) / len(ood_sets)

    candidates = {m: DETERMINISTIC_SCORES if m in DETERMINISTIC_METHODS else SCORE_NAMES for m in methods}
    best = {m: max(candidates[m], key=lambda score: mean_auroc(m, score)) for m in methods}
    metrics = ["accuracy", "confidence", "NLL", "ECE", "Brier", "NLL (noisy labels)", "ECE (noisy labels)"]
    columns = metrics + [f"AUROC {s} ({recommended_score(s, deterministic=False).removeprefix('-')})" for s in ood_sets]

    def main_keys(method: str) -> list[str]:
        return metrics + [f"AUROC {s} / {recommended_score(s, deterministic=method in DETERMINISTIC_METHODS)}" for s in ood_sets]

    header = [f"| method | {' | '.join(columns)} |", "|---" + "|---:" * len(columns) + "|"]
    main = header + [f"| {m} | {' | '.join(cell(m, k) for k in main_keys(m))} |" for m in methods]
    # The targets compare each method with the pretrained model. Paired by seed, what a seed makes
    # easier or harder for both cancels: the standard error is that of the difference.
    paired = header.copy()
    for m in methods[1:]:
        differences = [mean_se([run[m][k] - run["pretrained"][p] for run in runs]) for k, p in zip(main_keys(m), main_keys("pretrained"))]
        paired.append(f"| {m} | {' | '.join(f'{mean:+.3f} ± {se:.3f}' for mean, se in differences)} |")
    per_score = [f"| method | score | {' | '.join(ood_sets)} | mean |", "|---|---" + "|---:" * (len(ood_sets) + 1) + "|"]
    for m in methods:
        for score in candidates[m]:
            values = [cell(m, f"AUROC {s} / {score}") for s in ood_sets]
            marker = " **(best)**" if score == best[m] else ""
            per_score.append(f"| {m} | {score}{marker} | {' | '.join(values)} | {mean_auroc(m, score):.3f} |")
    return (
        "\n".join(main)
        + "\n\nMinus the pretrained model, paired by seed (mean ± standard error of the per-seed differences):\n\n"
        + "\n".join(paired)
        + "\n\nAUROC of each out-of-distribution score:\n\n"
        + "\n".join(per_score)
    )


def main(seeds: list[int], quick: bool, out: str, jobs: int, readme: str | None = None) -> str:
    """Run the benchmark, ``jobs`` seeds at a time in separate processes (one thread each);
    returns the results as Markdown (also printed and written to a file)."""
    torch.set_num_threads(1)
    budget = QUICK_BUDGET if quick else FULL_BUDGET
    seeds = seeds[:1] if quick else seeds
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        runs = list(pool.map(run_seed, seeds, [budget] * len(seeds)))
    ood_sets = list(dict.fromkeys(k.split(" / ")[0].removeprefix("AUROC ") for k in runs[0]["pretrained"] if k.startswith("AUROC")))
    if "laplace-torch last layer" not in runs[0]:
        print(LAPLACE_MISSING, file=sys.stderr)
    seconds = time.perf_counter() - started
    today = datetime.date.today().isoformat()
    header = (
        f"# Digits out-of-distribution benchmark, {today}\n\n"
        f"`{' '.join(['benchmarks/quality/digits_ood.py', '--seeds', *map(str, seeds)] + (['--quick'] if quick else []))}`: "
        f"mean ± standard error over seeds {', '.join(map(str, seeds))}; {budget.pretrain_epochs} epochs of pretraining, "
        f"{budget.finetune_epochs} of fine-tuning, T = {budget.samples} samples; torch {torch.__version__}, "
        f"1 thread per seed, {jobs} seed(s) at a time, {platform.machine()}; {seconds:.0f} s.\n"
        f"fine-tuned, deterministic: cross-entropy, Adam lr {demo.FINETUNE_LR:g}, batch norm frozen.\n"
        f"bayesify full: {FULL_RECIPE}.\nbayesify last layer, mean-field: {LAST_LAYER_RECIPE}.\n"
        f"bayesify last layer, MatrixNormal: {MATRIX_NORMAL_RECIPE}.\n"
        f"mixture of {MIXTURE_SIZE}: vinn.Mixture of the recipe fine-tuned from seeds s, s + 100, s + 200, T samples in all.\n"
        f"laplace-torch last layer: KFAC, prior precision by marginal likelihood, T samples of the GLM predictive"
        f"{'' if 'laplace-torch last layer' in runs[0] else f' ({LAPLACE_MISSING})'}; "
        f"MC dropout: rate {DROPOUT}, T samples; deep ensemble: its {ENSEMBLE_SIZE} members are its samples.\n"
        "AUROC columns: each set scored as the README recommends; the deterministic models, of one sample, by the max probability "
        "where the others use the mutual information. Confidence: the mean max probability. "
        f"Noisy labels: NLL and ECE against the labels' training distribution (each kept with probability {1 - demo.LABEL_NOISE:g}, "
        "else any other class).\n"
    )
    text = header + "\n" + tables(runs, ood_sets) + "\n"
    path = Path(out) / f"results-digits-ood-{today}{'-quick' if quick else ''}.md"
    path.write_text(text)
    print(text + f"\nwritten to {path}")
    if readme is not None:
        rewrite_block(Path(readme), README_BLOCK, text.split("\n", 1)[1].strip())  # without the title line
        print(f"written to the {README_BLOCK} block of {readme}")
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs and samples: checks that everything runs")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at a time, each in its own single-threaded process")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the results file")
    parser.add_argument("--readme", help="Markdown file whose digits-ood block gets the tables (README.md)")
    return parser.parse_args()


if __name__ == "__main__":
    main(**vars(parse_args()))
