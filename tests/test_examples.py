"""The examples of issue 5, each run in its fast mode: they run, and their numbers make sense."""

import subprocess
import sys
from pathlib import Path

import last_layer_vs_full
import pytest
import regression
import resnet18_finetune
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_resnet18_bayesified_and_fine_tuned_on_digits():
    metrics = resnet18_finetune.main(fast=True)
    assert metrics["accuracy"] > 0.3  # chance is 0.1
    assert metrics["confidence_correct"] > metrics["confidence_wrong"]


def test_last_layer_is_cheaper_than_full_conversion_and_as_accurate():
    results = last_layer_vs_full.main(fast=True)
    last, full = results["last layer"], results["full"]
    assert last["bayesian_parameters"] == 64 * 10 + 10  # only the final nn.Linear(64, 10)
    assert full["bayesian_parameters"] > 50 * last["bayesian_parameters"]
    for r in (last, full):
        assert r["accuracy"] > 0.8
        assert 0 <= r["ece"] < 0.2
    # the trunk runs once for all samples when only the last layer samples
    assert last["predict_seconds"] < full["predict_seconds"]


def test_regression_epistemic_uncertainty_is_larger_in_the_gap(tmp_path):
    plot = tmp_path / "regression.png"
    result = regression.main(fast=True, plot_path=str(plot))
    assert result["epistemic_gap"] > 1.5 * result["epistemic_train"]
    assert result["aleatoric_outer"] > result["aleatoric_inner"]  # the noise grows with |x|
    assert plot.stat().st_size > 0


@pytest.mark.slow  # importing transformers and peft takes seconds
def test_bayesian_lora_makes_only_lora_a_bayesian_and_adapts_to_the_new_domain():
    pytest.importorskip("peft")
    import bayesian_lora

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread, whatever else the machine runs
    try:
        metrics = bayesian_lora.main(fast=True)  # asserts that only lora_A layers converted and no frozen weight moved
    finally:
        torch.set_num_threads(threads)
    assert 0 < metrics["bayesian_share"] < 0.05  # 4 adapters of rank 4 on width 32: 512 parameters
    assert metrics["accuracy"] > metrics["pretrained_accuracy"] + 0.05  # the pretrained model gets the swapped words wrong
    assert metrics["nll"] < metrics["pretrained_nll"]


# gloo can abort a process in its C++ teardown ("terminate called without an active exception",
# pytorch/pytorch#179291), rarely and only on a loaded machine; a second run tells that apart from a
# failure of the script itself
TEARDOWN_ABORT = "terminate called without an active exception"


def test_ddp_torchrun_two_ranks_keep_identical_posteriors(free_port):
    for _attempt in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(EXAMPLES / "ddp_torchrun.py"), "--fast",
        ]
        run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or TEARDOWN_ABORT not in run.stderr:
            break
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[:6000]
    assert "posterior parameters identical on all ranks: True" in run.stdout
    accuracy = float(run.stdout.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.5
