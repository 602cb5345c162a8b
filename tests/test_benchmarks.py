"""The benchmark script runs, and its floor model is what it claims to be."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vinn_benchmarks_run", ROOT / "benchmarks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


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
def test_benchmark_command_prints_every_row():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-compile"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.endswith("× |")]
    assert len(rows) == 15, result.stdout
    assert any(row.startswith("| floor: train step") for row in rows)
    assert sum(row.startswith("| floor: ") for row in rows) == 3


@pytest.mark.slow
def test_bayesian_share_table_is_written_into_its_readme_block(tmp_path):
    spec = importlib.util.spec_from_file_location("vinn_benchmarks_share", ROOT / "benchmarks" / "bayesian_share.py")
    share = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(share)
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
    for method in ("pretrained", "bayesify full", "bayesify last layer", "MC dropout", "deep ensemble"):
        assert f"| {method} |" in text, text
