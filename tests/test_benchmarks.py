"""The benchmark scripts run, the floor model is what it claims to be and the peers start where vinn does."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vinn

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str, path: str):
    """The benchmark script ``benchmarks/<path>`` imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass of the script looks its module up there
    spec.loader.exec_module(module)
    return module


run = _benchmark("vinn_benchmarks_run", "run.py")
peers = _benchmark("vinn_benchmarks_peers", "peers.py")


def test_two_pass_floor_doubles_every_conv_and_linear_and_their_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    doubled = run.two_pass(model)
    assert sum(p.numel() for p in doubled.parameters()) == 2 * sum(p.numel() for p in model.parameters())
    assert all(isinstance(doubled[i], run.TwoPass) for i in (0, 3)) and isinstance(model[0], nn.Conv2d)  # a copy
    x = torch.randn(5, 1, 4, 4)
    # both copies start equal: each layer computes 2 * layer(x)
    torch.testing.assert_close(doubled(x), 2 * model[3](model[2](model[1](2 * model[0](x)))))


@pytest.mark.slow
def test_benchmark_command_prints_every_row_and_writes_them_into_its_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- run:start -->\nold\n<!-- run:end -->\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-compile", "--readme", str(readme)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.endswith("× |")]
    assert len(rows) == 18, result.stdout
    assert any(row.startswith("| floor: train step") for row in rows)
    assert sum(row.startswith("| floor: ") for row in rows) == 3
    assert any(row.startswith("| floor of flipout: ") for row in rows)
    assert readme.read_text() == f"intro\n<!-- run:start -->\n{result.stdout.strip()}\n<!-- run:end -->\n"


def test_conversion_baseline_is_vinn_at_a_git_revision_imported_beside_this_checkout():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = run.vinn_at("HEAD")
    assert head is not vinn and head.Linear is not vinn.Linear
    assert isinstance(head.bayesify(nn.Sequential(nn.Linear(3, 2))).get_submodule("0"), head.Linear)
    rows = run.bench_memory_and_conversion(torch.device("cpu"), repeats=1, baseline="HEAD")
    assert [name for name, _ in rows[1:]] == [
        "time of bayesify(resnet50) / copy.deepcopy(resnet50)",
        "time of bayesify(resnet50) with vinn at HEAD / copy.deepcopy(resnet50)",
    ]
    with pytest.raises(ValueError, match="git archive failed"):
        run.vinn_at("no-such-revision")


def test_every_installed_peer_starts_at_the_deterministic_weights_with_the_scale_asked():
    torch.manual_seed(0)
    det = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(6, 3, 5, 5)
    linear, features = nn.Linear(100, 3), torch.randn(1, 100)
    for name, (distribution, convert) in peers.PEERS.items():
        if peers.installed(distribution) is None:
            continue
        variant = convert(det, 1e-5)
        assert [tuple(loc.shape) for loc in variant.locs] == [(4, 3, 3, 3), (3, 100)], name
        # locs and biases copied: the output moves by about 1e-5 * sqrt(75 or 100) per layer (1e-4 seen),
        # against about 0.8 for the peer's own initialisation
        torch.testing.assert_close(variant.model(x), det(x), atol=1e-3, rtol=0, msg=name)
        assert torch.isfinite(variant.loss(1000)(variant.model(x), torch.tensor([0, 1, 2, 0, 1, 2]))).all(), name
        # weight and bias drawn with scale s: Var(output) = s² (|x|² + 1) for each output; at s = 0.5
        # a scale written in the wrong parametrization (softplus for exp) would give 0.66 of it
        model = convert(nn.Sequential(linear), 0.5).model
        draws = torch.cat([model(features) for _ in range(400)])
        expected = 0.5**2 * (features.square().sum() + 1)
        # 3 outputs x 400 draws: the relative standard error of the mean variance is sqrt(2 / 1200) = 4%
        torch.testing.assert_close(draws.var(0).mean(), expected, rtol=0.16, atol=0, msg=name)


def test_peer_rows_say_when_their_library_is_not_installed():
    speeds = {"deterministic": (1.0, 1.0), peers.vinn_name("lrt"): (2.0, 1.5)}
    text = peers.table(speeds, {peers.vinn_name("lrt"): 1.0}, samples=16)
    assert "| vinn `bayesify`, lrt (default) | 2.00× | 1.50× | 1.00× |" in text
    for name, (distribution, _) in peers.PEERS.items():
        assert f"| {name} | {distribution} not installed | | |" in text


def test_at_32x32_most_deterministic_gradients_are_exactly_zero_and_at_64x64_almost_none():
    """benchmarks/README: at the reference size ResNet-18's last stage runs on 1x1 maps and the outer
    taps of its 3x3 kernels see only padding, so the deterministic model's (and the floor's) Adam
    takes MKL's slow sqrt of zeros that no Bayesian step has; `peers.py --image-size 64` avoids it."""
    torch.manual_seed(0)
    model = run.resnet18(torch.device("cpu"))
    zero_share = {}
    for size in (32, 64):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 3, size, size)), torch.randint(0, 10, (32,))).backward()
        grads = [p.grad for p in model.parameters()]
        zero_share[size] = sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)
        if size == 32:  # only the centre tap of the last stage's 3x3 kernels sees its 1x1 map
            taps = model.layer4[1].conv2.weight.grad.ne(0).flatten(0, 1).float().mean(0)
            assert taps[1, 1] > 0.99 and taps.sum() == taps[1, 1], taps
    assert zero_share[32] > 0.5 and zero_share[64] < 0.01, zero_share


@pytest.mark.slow
def test_peers_benchmark_writes_every_row_into_its_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- peers:start -->\nold\n<!-- peers:end -->\n")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick", "--readme", str(readme)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    text = readme.read_text()
    assert "old" not in text and "| deterministic ResNet-18 | 1.00× | 1.00× |  |" in text
    for name in [peers.vinn_name(e) for e in run.ESTIMATORS] + list(peers.PEERS):
        assert sum(line.startswith(f"| {name} | ") for line in text.splitlines()) == 1, (name, text)


@pytest.mark.slow
def test_bayesian_share_table_is_written_into_its_readme_block(tmp_path):
    share = _benchmark("vinn_benchmarks_share", "bayesian_share.py")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bayesian-share:start -->\nold\n<!-- bayesian-share:end -->\n")
    share.main(quick=True, readme=str(readme))
    text = readme.read_text()
    assert "old" not in text and "| torchvision resnet18 | 11,689,512 | 11,679,912 | 100.0% | yes |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| torchvision", "| timm", "| transformers"))]
    assert len(rows) == 2 + 2 * ("timm" in sys.modules) + 3 * ("transformers" in sys.modules)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["uci.py", "scale_learning.py"])
def test_uci_quality_benchmarks_run_in_quick_mode(script, tmp_path):
    out = tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    table = out.read_text()
    assert "| boston |" in table or "| vinn (recipe) |" in table, result.stdout


def test_uci_benchmark_measures_the_method_families_asked_in_table_order():
    uci = _benchmark("vinn_benchmarks_uci", "quality/uci.py")
    names = lambda families: [m.name for m in uci.methods(families, [0.01, 0.05])]  # noqa: E731
    assert names(["vinn"]) == ["vinn (recipe)"]
    assert names(["dropout", "vinn"]) == ["vinn (recipe)", "MC dropout p=0.01", "MC dropout p=0.05"]
    assert names(list(uci.METHOD_FAMILIES)) == ["vinn (recipe)", "deterministic", "MC dropout p=0.01", "MC dropout p=0.05"]


def test_uci_regressor_predicts_mean_and_noise_variance_per_input_or_shared():
    uci = _benchmark("vinn_benchmarks_uci_common", "quality/uci_common.py")
    x = torch.randn(5, 13)
    per_input, shared = uci.bayesian_regressor(13, "per-input"), uci.bayesian_regressor(13, "shared")
    for model in (per_input, shared):
        out = vinn.sample(model.eval(), x, 3)
        assert out.shape == (3, 5, 2) and (out[..., 1] > 0).all()
    # shared: one variance, a log-variance trained at the scales' rate; per input: the body's output
    assert torch.equal(shared(x)[:, 1], torch.full((5,), uci.NOISE_VAR))
    assert per_input(x)[:, 1].unique().numel() == 5
    scale_group = lambda model: {id(p) for p in vinn.param_groups(model, lr=1e-3)[1]["params"]}  # noqa: E731
    assert id(shared.noise_log_sigma2) in scale_group(shared)
    body = nn.Sequential(nn.Linear(13, 2))
    torch.nn.init.zeros_(body[0].weight)
    assert torch.allclose(uci.Regressor(body, "per-input")(x)[:, 1], torch.tensor(uci.NOISE_VAR))  # starts there
    with pytest.raises(ValueError, match="noise must be one of"):
        uci.Regressor(body, "homoscedastic")


def test_uci_per_input_noise_warms_up_on_the_shared_variance_and_hands_over_from_its_value():
    uci = _benchmark("vinn_benchmarks_uci_common", "quality/uci_common.py")
    torch.manual_seed(0)
    x, y = torch.randn(64, 13), torch.randn(64, 1)
    data = uci.Split(x, y, x[:8], y[:8], y_mean=0.0, y_std=1.0)
    model = uci.bayesian_regressor(13, "per-input")
    last = model.body[-1]
    start = last.weight_log_sigma2[1].clone()
    optimizer = torch.optim.Adam(vinn.param_groups(model, lr=1e-2))
    shared_by_epoch = {}

    def on_epoch(epoch):
        shared_by_epoch[epoch] = model.shared
        if epoch == 1:  # during the warm-up: one variance for every input, that of the shared parameter
            variance = model.eval()(x)[:, 1]
            assert torch.equal(variance, model.noise_log_sigma2.exp().expand(64))

    uci.train(model, uci.elbo_loss(model, 64), optimizer, data, 3, seed=0, warmup=2, on_epoch=on_epoch)
    assert shared_by_epoch == {1: True, 2: False, 3: False}
    # the variance output took over at epoch 2 with the shared value, its row's scales as before the warm-up
    handover = uci.bayesian_regressor(13, "per-input")
    handover.share_noise(True)
    with torch.no_grad():
        handover.noise_log_sigma2.fill_(math.log(0.3))
        handover.body[-1].weight_log_sigma2[1] += 5.0  # what the KL alone does to an unused row
    handover.share_noise(False)
    with vinn.deterministic():
        assert torch.allclose(handover(x)[:, 1], torch.tensor(0.3))
    assert torch.equal(handover.body[-1].weight_log_sigma2[1], uci.bayesian_regressor(13, "per-input").body[-1].weight_log_sigma2[1])
    assert not torch.equal(last.weight_log_sigma2[1], start)  # and the trained model learned on from there
    with pytest.raises(ValueError, match="no per-input variance"):
        uci.bayesian_regressor(13, "shared").share_noise(False)


def test_uci_mixture_log_likelihood_is_that_of_the_components_in_the_targets_units():
    uci = _benchmark("vinn_benchmarks_uci_common", "quality/uci_common.py")
    y_test = torch.tensor([10.0, 14.0], dtype=torch.float64)
    data = uci.Split(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(2, 1), y_test, y_mean=12.0, y_std=2.0)
    # two components per point, standardized (mean, variance); in the target's units N(12 ± 2, 4 var)
    components = torch.tensor([[[-1.0, 1.0], [1.0, 0.25]], [[1.0, 1.0], [1.0, 0.25]]])
    rmse, ll = uci.mixture_scores(components, data)
    normal = torch.distributions.Normal
    point0 = torch.stack([normal(10.0, 2.0).log_prob(torch.tensor(10.0)), normal(14.0, 2.0).log_prob(torch.tensor(10.0))])
    point1 = normal(14.0, 1.0).log_prob(torch.tensor(14.0))
    expected = ((point0.logsumexp(0) - math.log(2)) + point1) / 2
    assert ll == pytest.approx(float(expected), rel=1e-6)
    assert rmse == pytest.approx(math.sqrt((2.0**2 + 0.0**2) / 2))


@pytest.mark.slow
def test_digits_ood_benchmark_runs_in_quick_mode(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- digits-ood:start -->\nold\n<!-- digits-ood:end -->\n")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality" / "digits_ood.py"), "--quick", "--out", str(tmp_path), "--readme", str(readme)],
        capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    text = readme.read_text()
    assert "old" not in text
    for method in (
        "pretrained", "fine-tuned, deterministic", "bayesify full", "bayesify full, mixture of 3", "bayesify last layer, mean-field",
        "bayesify last layer, MatrixNormal", "bayesify last layer, MatrixNormal, mixture of 3", "MC dropout", "deep ensemble",
    ):  # fmt: skip
        assert f"| {method} |" in text, text


def test_digits_ood_tables_pair_each_method_with_the_pretrained_model_by_seed():
    digits = _benchmark("vinn_benchmarks_digits_ood", "quality/digits_ood.py")
    metrics = ("accuracy", "confidence", "NLL", "ECE", "Brier", "NLL (noisy labels)", "ECE (noisy labels)")

    def result(ece: float, auroc: dict[str, float]) -> dict[str, float]:
        return dict.fromkeys(metrics, 0.5) | {"ECE": ece} | {f"AUROC noise / {s}": auroc.get(s, 0.5) for s in digits.SCORE_NAMES}

    # the deterministic models are scored on noise by their max probability, the Bayesian one by its mutual information
    runs = [
        {
            "pretrained": result(0.03, {"max probability": 0.80 + 0.01 * seed}),
            "fine-tuned, deterministic": result(0.025, {"max probability": 0.78, "-mutual information": 0.99}),
            "bayesify full": result(0.02, {"-mutual information": 0.85 + 0.03 * seed}),
        }
        for seed in range(3)
    ]
    text = digits.tables(runs, ["noise"])
    paired = text.split("paired by seed")[1].split("AUROC of each")[0]

    def paired_row(method: str) -> list[str]:
        return next(line for line in paired.splitlines() if line.startswith(f"| {method} |")).split(" | ")

    row = paired_row("bayesify full")
    assert row[4] == "-0.010 ± 0.000"  # ECE: the same difference on every seed
    assert row[-1] == "+0.070 ± 0.012 |"  # AUROC: differences 0.05, 0.07, 0.09, standard error 0.02 / sqrt(3)
    assert paired_row("fine-tuned, deterministic")[-1] == "-0.030 ± 0.006 |"  # its max probability, not the 0.99
    assert "| pretrained |" not in paired
    per_score = text.split("AUROC of each")[1]
    assert "| fine-tuned, deterministic | -mutual information" not in per_score
