"""vinn.ELBO: the KL weight for beta= and for dataset_size= with each reduction."""

import numpy as np
import pytest
import torch
from torch import nn

import vinn


@pytest.fixture
def setup(device):
    torch.manual_seed(0)
    model = vinn.Linear(4, 3, device=device)
    x, y = torch.randn(8, 4, device=device), torch.randint(0, 3, (8,), device=device)
    with vinn.deterministic():
        outputs = model(x)
    return model, outputs, y


def test_beta(setup):
    model, outputs, y = setup
    loss = vinn.ELBO(model, nn.CrossEntropyLoss(reduction="sum"), beta=0.1)(outputs, y)
    expected = nn.functional.cross_entropy(outputs, y, reduction="sum") + 0.1 * model.kl
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.weight_log_sigma2.grad is not None


def test_dataset_size_sum_and_mean_are_the_same_elbo(setup):
    model, outputs, y = setup
    n, b = 1000, outputs.shape[0]
    nll_sum = nn.functional.cross_entropy(outputs, y, reduction="sum")
    by_sum = vinn.ELBO(model, nn.CrossEntropyLoss(reduction="sum"), dataset_size=n)(outputs, y)
    by_mean = vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=n)(outputs, y)
    torch.testing.assert_close(by_sum, nll_sum + b / n * model.kl)  # beta = 1/M with M = N/B minibatches
    torch.testing.assert_close(by_mean, nll_sum / b + model.kl / n)
    # both are the negative ELBO estimate (N/B) Σ nll + KL, up to a constant factor
    full = n / b * nll_sum + model.kl
    torch.testing.assert_close(by_sum * n / b, full)
    torch.testing.assert_close(by_mean * n, full)


def test_dataset_size_mean_over_regression_elements():
    torch.manual_seed(0)
    model = vinn.Linear(4, 5)
    x, y = torch.randn(8, 4), torch.randn(8, 5)
    outputs = model(x)
    loss = vinn.ELBO(model, nn.MSELoss(), dataset_size=100)(outputs, y)
    # mean over 8*5 elements: the per-example sum is 5 times the elementwise mean
    expected = ((outputs - y) ** 2).sum() / 40 + 8 / (100 * 40) * model.kl
    torch.testing.assert_close(loss, expected)


def test_class_weights_and_ignored_targets_count_as_in_the_sum(setup):
    model, outputs, y = setup
    y = y.clone()
    y[0] = -100
    weight = torch.tensor([1.0, 2.0, 0.5])
    criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=-100)
    loss = vinn.ELBO(model, criterion, dataset_size=50)(outputs, y)
    nll_sum = nn.functional.cross_entropy(outputs, y, weight=weight, reduction="sum")
    torch.testing.assert_close(loss, nll_sum / 8 + model.kl / 50)
    assert criterion.reduction == "mean", "the user's criterion is left as it was"


def test_extra_criterion_arguments():
    model = vinn.Linear(2, 3)
    mean, target, var = model(torch.randn(4, 2)), torch.randn(4, 3), torch.ones(4, 3)
    loss = vinn.ELBO(model, nn.GaussianNLLLoss(reduction="sum"), dataset_size=40)(mean, target, var)
    torch.testing.assert_close(loss, nn.GaussianNLLLoss(reduction="sum")(mean, target, var) + 0.1 * model.kl)


def test_bad_arguments():
    model = vinn.Linear(2, 2)
    with pytest.raises(ValueError, match="exactly one of beta"):
        vinn.ELBO(model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="exactly one of beta"):
        vinn.ELBO(model, nn.CrossEntropyLoss(), beta=1.0, dataset_size=10)
    with pytest.raises(ValueError, match="reduction='none'"):
        vinn.ELBO(model, nn.CrossEntropyLoss(reduction="none"), beta=1.0)
    with pytest.raises(ValueError, match="dataset_size must be a positive int"):
        vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=0)
    with pytest.raises(TypeError, match="reduction in"):
        vinn.ELBO(model, nn.functional.cross_entropy, dataset_size=10)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vinn.ELBO("net", nn.CrossEntropyLoss(), beta=1.0)
    with pytest.raises(ValueError, match="beta must be a non-negative"):
        vinn.ELBO(model, nn.CrossEntropyLoss(), beta=-1.0)
    elbo = vinn.ELBO(model, lambda out, y: (out - y) ** 2, beta=1.0)
    with pytest.raises(ValueError, match="0-dim loss"):
        elbo(torch.zeros(3, 2), torch.ones(3, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"beta": float("inf")}, ValueError, r"beta must be a non-negative finite real number .*got inf"),
        ({"beta": float("nan")}, ValueError, r"beta must be a non-negative finite real number .*got nan"),
        ({"beta": "0.1"}, TypeError, r"beta must be a non-negative finite real number .*got '0.1'"),
        ({"beta": True}, TypeError, r"beta must be"),
        ({"beta": None, "dataset_size": 10.0}, TypeError, r"dataset_size must be a positive int .*len\(loader.dataset\)"),
        ({"beta": None, "dataset_size": "100"}, TypeError, r"dataset_size must be a positive int"),
        ({"beta": None, "dataset_size": -5}, ValueError, r"dataset_size must be a positive int"),
    ],
)
def test_bad_weights(kwargs, error, match):
    kwargs = {"beta": 1.0, **kwargs}
    if kwargs["beta"] is None:
        del kwargs["beta"]
    with pytest.raises(error, match=match):
        vinn.ELBO(vinn.Linear(2, 2), nn.CrossEntropyLoss(), **kwargs)


def test_numpy_numbers_are_numbers():
    model = vinn.Linear(2, 2)
    assert vinn.ELBO(model, nn.CrossEntropyLoss(), beta=np.float32(0.5)).beta == 0.5
    assert vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=np.int64(10)).dataset_size == 10


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss, nn.MSELoss])
def test_criterion_class_instead_of_instance(criterion):
    with pytest.raises(TypeError, match=rf"criterion must be .*instance, got the class .*{criterion.__name__}; pass an instance"):
        vinn.ELBO(vinn.Linear(2, 2), criterion, dataset_size=10)


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), vinn.Module()])
def test_model_without_vinn_layers(model):
    with pytest.raises(ValueError, match="must contain a vinn layer.*KL is 0.*vinn.bayesify"):
        vinn.ELBO(model, nn.CrossEntropyLoss(), dataset_size=10)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_dataset_size_smaller_than_the_batch_is_the_len_loader_slip(reduction):
    model = vinn.Linear(2, 3)
    elbo = vinn.ELBO(model, nn.CrossEntropyLoss(reduction=reduction), dataset_size=4)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"dataset_size=4 for a batch of 8.*len\(loader.dataset\).*len\(loader\)"):
        elbo(model(torch.randn(8, 2)), y)
    elbo(model(torch.randn(4, 2)), y[:4])  # a batch of the whole dataset is fine


def test_outputs_must_be_a_batch_with_dataset_size():
    elbo = vinn.ELBO(vinn.Linear(2, 3), nn.MSELoss(), dataset_size=10)
    with pytest.raises(TypeError, match="outputs must be a batch-first torch.Tensor"):
        elbo(torch.tensor(1.0), torch.tensor(1.0))


def test_criterion_must_return_a_tensor():
    elbo = vinn.ELBO(vinn.Linear(2, 2), lambda out, y: 0.5, beta=1.0)
    with pytest.raises(TypeError, match="criterion's result must be a 0-dim tensor"):
        elbo(torch.zeros(3, 2), torch.ones(3, 2))
