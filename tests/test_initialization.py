"""vinn.init_column_covariance and BayesianLayer.reset_scale(column_covariance=...)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vinn


def matrix_normal_head(in_features: int = 4, out_features: int = 3, init_scale: float = 0.1) -> vinn.Linear:
    return vinn.Linear(in_features, out_features, posterior=vinn.MatrixNormal, init_scale=init_scale).double()


def correlated_inputs(n: int = 256, features: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs spanning mostly two of ``features`` directions: a second moment far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, features, generator=generator, dtype=torch.float64)
    return torch.randn(n, 2, generator=generator, dtype=torch.float64) @ basis + 0.01 * torch.randn(n, features, generator=generator, dtype=torch.float64)


def column_covariance(layer: vinn.Linear) -> torch.Tensor:
    factor = layer.weight_posterior.column_scale_tril
    return factor @ factor.mT


def test_reset_scale_sets_the_given_column_covariance_and_the_rows_from_init_scale():
    layer = matrix_normal_head()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    covariance = a @ a.T + torch.eye(4, dtype=torch.float64)
    layer.reset_scale(0.2, column_covariance=covariance)
    assert torch.allclose(column_covariance(layer), covariance)
    assert torch.allclose(layer.weight_posterior.row_scale, torch.full((3,), 0.2, dtype=torch.float64))
    layer.reset_scale()  # without it: the identity again
    assert torch.allclose(column_covariance(layer), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("covariance", "match"),
    [
        (torch.eye(3, dtype=torch.float64), r"\(4, 4\) tensor"),
        (-torch.eye(4, dtype=torch.float64), "symmetric positive definite"),
        (torch.eye(4, dtype=torch.float64) + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1), "symmetric positive definite"),
        (torch.full((4, 4), float("nan"), dtype=torch.float64), "symmetric positive definite"),
    ],
)
def test_reset_scale_refuses_a_bad_column_covariance_and_changes_nothing(covariance, match):
    layer = matrix_normal_head()
    before = {name: p.clone() for name, p in layer.named_parameters()}
    with pytest.raises(ValueError, match=match):
        layer.reset_scale(column_covariance=covariance)
    assert all(torch.equal(p, before[name]) for name, p in layer.named_parameters())


def test_reset_scale_refuses_a_column_covariance_that_is_no_tensor():
    with pytest.raises(TypeError, match=r"column_covariance must be a \(4, 4\) tensor"):
        matrix_normal_head().reset_scale(column_covariance=[[1.0]])


def test_reset_scale_refuses_a_column_covariance_for_an_elementwise_posterior():
    with pytest.raises(ValueError, match="posterior=vinn.MatrixNormal"):
        vinn.Linear(4, 3).reset_scale(column_covariance=torch.eye(4))


def test_column_covariance_is_the_damped_inverse_second_moment_with_the_isotropic_mean_variance():
    x = correlated_inputs()
    layer = matrix_normal_head()
    assert vinn.init_column_covariance(layer, x, damping=0.05) == [""]
    second_moment = x.T @ x / len(x)
    v = column_covariance(layer)
    # V (S + δI) is a multiple of the identity, δ = damping * tr(S) / d
    product = v @ (second_moment + 0.05 * second_moment.trace() / 4 * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(product, product[0, 0] * torch.eye(4, dtype=torch.float64), atol=1e-10)
    # on the data, the mean of xᵀVx is that of xᵀx: the mean pre-activation variance u·xᵀVx is the isotropic start's
    assert torch.allclose(((x @ v) * x).sum(1).mean(), x.square().sum(1).mean())
    # across the data's span the variance is larger than along it by (λ_max + δ) / (λ_min + δ)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    across, along = eigenvectors[:, 0], eigenvectors[:, -1]
    damping = 0.05 * eigenvalues.mean()
    ratio = (across @ v @ across) / (along @ v @ along)
    assert torch.allclose(ratio, (eigenvalues[-1] + damping) / (eigenvalues[0] + damping)) and ratio > 10


def test_predictive_variance_grows_off_the_data_and_sampling_follows_it():
    torch.manual_seed(0)
    x = correlated_inputs()
    layer = matrix_normal_head(init_scale=0.3)
    vinn.init_column_covariance(layer, x)
    layer.bias_log_sigma2.data.fill_(-40.0)  # the weight's variance alone
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / len(x))
    on_data, off_data = eigenvectors[:, -1] * 2, eigenvectors[:, 0] * 2  # the same norm
    samples = 4000
    draws = layer(torch.stack([on_data, off_data]).expand(samples, 2, 4).reshape(-1, 4)).reshape(samples, 2, 3)
    variance = draws.var(0)
    expected = torch.stack([v @ column_covariance(layer) @ v for v in (on_data, off_data)])[:, None] * 0.09
    # sample variance of S normals: relative standard error sqrt(2 / (S - 1))
    assert ((variance / expected - 1).abs() < 5 * (2 / (samples - 1)) ** 0.5).all()
    assert (variance[1] > 10 * variance[0]).all()


def test_a_model_runs_at_its_means_in_eval_mode_on_batches_and_keeps_its_modes():
    torch.manual_seed(0)
    model = nn.Sequential(
        vinn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), vinn.Linear(8, 3, posterior=vinn.MatrixNormal)
    ).double()
    model.train()
    x = torch.randn(64, 5, dtype=torch.float64)
    running_mean = model[1].running_mean.clone()
    loader = DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=16)
    assert vinn.init_column_covariance(model, loader) == ["3"]
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, running_mean)
    with torch.no_grad(), vinn.deterministic():
        features = model[:3].eval()(x)  # what the head sees: posterior means, batch norm's running statistics
    model.train()
    reference = matrix_normal_head(8, 3)
    vinn.init_column_covariance(reference, features)
    assert torch.allclose(column_covariance(model[3]), column_covariance(reference))
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip_keeps_the_column_covariance():
    layer = matrix_normal_head()
    vinn.init_column_covariance(layer, correlated_inputs())
    copy = matrix_normal_head()
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(column_covariance(copy), column_covariance(layer))


def test_bad_arguments_fail_early():
    x = correlated_inputs()
    with pytest.raises(ValueError, match="no layer with posterior=vinn.MatrixNormal"):
        vinn.init_column_covariance(vinn.Linear(4, 3), x)
    with pytest.raises(ValueError, match="damping"):
        vinn.init_column_covariance(matrix_normal_head(), x, damping=0.0)
    with pytest.raises(TypeError, match="damping"):
        vinn.init_column_covariance(matrix_normal_head(), x, damping="0.1")
    with pytest.raises(ValueError, match="saw no input"):
        vinn.init_column_covariance(matrix_normal_head(), [])
    with pytest.raises(TypeError, match="data must be"):
        vinn.init_column_covariance(matrix_normal_head(), [x.numpy()])
    with pytest.raises(TypeError, match="model"):
        vinn.init_column_covariance("model", x)
