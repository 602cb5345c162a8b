"""The one policy for bad arguments, at every entry point: TypeError for the wrong kind, ValueError
for the wrong value, a message naming the argument, what was given and what is accepted; numpy
integers are integers, bools are not; a failure changes nothing the user passed."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import vinn
from vinn import validation


def model():
    return nn.Sequential(vinn.Linear(4, 3)).eval()


def probs():
    return np.full((4, 2), 0.5), np.zeros(4, dtype=np.int64)


# entry point -> a call taking the integer argument under test
INTEGER_ARGUMENTS = {
    "samples": lambda v: vinn.sample(model(), torch.randn(2, 4), samples=v),
    "chunk_size": lambda v: vinn.sample(model(), torch.randn(2, 4), samples=2, chunk_size=v),
    "n_bins": lambda v: vinn.expected_calibration_error(*probs(), n_bins=v),
    "dataset_size": lambda v: vinn.ELBO(model(), nn.CrossEntropyLoss(), dataset_size=v),
    "last": lambda v: vinn.bayesify(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), last=v),
}


@pytest.mark.parametrize("argument", INTEGER_ARGUMENTS)
@pytest.mark.parametrize("value", [np.int64(1), np.int32(2), np.uint8(1), 1])
def test_integers_of_any_integral_type_are_accepted(argument, value):
    INTEGER_ARGUMENTS[argument](value)


@pytest.mark.parametrize("argument", INTEGER_ARGUMENTS)
@pytest.mark.parametrize("value", [True, 1.0, "2", None, torch.tensor(2)])
def test_non_integers_are_a_type_error(argument, value):
    if value is None and argument in ("chunk_size", "last", "dataset_size"):
        return  # None is their default (dataset_size: beta= instead)
    with pytest.raises(TypeError, match=rf"^{argument} must be (None or )?a positive int.*, got "):
        INTEGER_ARGUMENTS[argument](value)


@pytest.mark.parametrize("argument", INTEGER_ARGUMENTS)
@pytest.mark.parametrize("value", [0, -3, np.int64(-1)])
def test_integers_below_the_minimum_are_a_value_error(argument, value):
    with pytest.raises(ValueError, match=rf"^{argument} must be (None or )?a positive int.*, got .*{int(value)}"):
        INTEGER_ARGUMENTS[argument](value)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: vinn.kl("net"), TypeError, r"module must be a torch.nn.Module, got 'net'"),
        (lambda: vinn.kl(nn.Linear), TypeError, r"module must be a torch.nn.Module, got the class .*Linear; pass an instance"),
        (lambda: vinn.sample(nn.Linear, torch.randn(2, 4)), TypeError, "model must be a torch.nn.Module.*pass an instance"),
        (lambda: vinn.predict(None, torch.randn(2, 4)), TypeError, "model must be a torch.nn.Module, got None"),
        (lambda: vinn.bayesify("net"), TypeError, "model must be a torch.nn.Module"),
        (lambda: vinn.to_deterministic(3), TypeError, "model must be a torch.nn.Module, got 3"),
        (lambda: vinn.ELBO([], nn.CrossEntropyLoss(), beta=1.0), TypeError, "model must be a torch.nn.Module"),
        (lambda: vinn.sample(model(), torch.randn(2, 4), generator="7"), TypeError, "generator must be a torch.Generator"),
        (lambda: vinn.sample(model(), torch.randn(2, 4), generator=-1), ValueError, "generator must be a non-negative int"),
        (lambda: vinn.sample(model(), torch.randn(2, 4), generator=True), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_wrong_objects(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_numpy_seed_is_a_seed():
    x = torch.randn(2, 4)
    net = model()
    torch.testing.assert_close(vinn.sample(net, x, 3, generator=np.int64(5)), vinn.sample(net, x, 3, generator=5))


@pytest.mark.parametrize(
    "value, error",
    [(1.5, None), (np.float32(0.5), None), (0, None), (math.inf, ValueError), (math.nan, ValueError), (-1.0, ValueError),
     ("1", TypeError), (True, TypeError), (None, TypeError)],
)  # fmt: skip
def test_real_numbers(value, error):
    if error is None:
        assert validation.real(value, "beta", low=0) == float(value)
        return
    with pytest.raises(error, match=r"^beta must be a finite real number in \[0, inf\), got "):
        validation.real(value, "beta", low=0)


def test_messages_describe_what_was_given_on_one_line():
    assert validation.describe(torch.zeros(2, 3)) == "Tensor of shape (2, 3) and dtype torch.float32"
    assert validation.describe(np.zeros(2, dtype=np.int8)) == "ndarray of shape (2,) and dtype int8"
    assert validation.describe(3) == "3" and validation.describe("a") == "'a'" and validation.describe(None) == "None"
    assert validation.describe([torch.zeros(3, 3)]).startswith("list [tensor([[0., 0., 0.], [0., 0., 0.],")
    assert len(validation.describe(list(range(1000)))) < 100


# -- a failure leaves the user's objects as they were ------------------------------------------------


def test_failed_conversion_changes_nothing():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for bad in ({"last": 0}, {"prior": torch.distributions.Normal(torch.zeros(5), 1.0)}, {"init_scale": "x"}):
        with pytest.raises((TypeError, ValueError)):
            vinn.bayesify(net, **bad)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear] and not net.training


def test_failed_elbo_changes_nothing():
    criterion = nn.CrossEntropyLoss(reduction="mean")
    for bad in ({"dataset_size": 0}, {"dataset_size": 10, "beta": 1.0}):
        with pytest.raises(ValueError):
            vinn.ELBO(model(), criterion, **bad)
    elbo = vinn.ELBO(model(), criterion, dataset_size=4)
    with pytest.raises(ValueError, match="len\\(loader\\)"):
        elbo(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    assert criterion.reduction == "mean"


def test_failed_prediction_leaves_the_model_mode():
    net = nn.Sequential(vinn.Linear(4, 3), nn.Flatten(0)).train()
    with pytest.raises(ValueError, match="batch-first"):
        vinn.sample(net, torch.randn(2, 4), samples=2)
    assert net.training
