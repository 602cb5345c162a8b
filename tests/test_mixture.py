"""vinn.Mixture: a member drawn per example in a call and per sample in vinn.sample, its KL bound, training, bad input."""

import math

import pytest
import torch
from torch import nn

import vinn


class Shift(nn.Module):
    """A deterministic member: x + k, so an output says which member computed it."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x + self.k


def gaussian(mean: float, scale: float) -> vinn.Linear:
    """A one-weight layer whose output on an input of 1 is N(mean, scale²)."""
    layer = vinn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(mean)
        layer.weight_log_sigma2.fill_(math.log(scale**2))
    return layer


def test_each_row_is_computed_by_a_member_drawn_uniformly_for_it():
    torch.manual_seed(0)
    n, k = 6000, 3
    x = torch.randn(n, 2)
    out = vinn.Mixture([Shift(i) for i in range(k)])(x) - x
    member = out[:, 0]
    torch.testing.assert_close(out, member[:, None].expand(n, 2))  # the whole row, by one member
    counts = torch.stack([(member - i).abs().lt(1e-4).sum() for i in range(k)])
    assert counts.sum() == n  # every row by some member
    se = math.sqrt(n * (1 / k) * (1 - 1 / k))  # binomial
    assert ((counts - n / k).abs() < 4 * se).all(), counts
    assert vinn.Mixture([Shift(i) for i in range(k)])(x[:0]).shape == (0, 2)  # an empty batch, as a member would take it


def test_a_forward_pass_samples_the_mixture_predictive():
    """Mean and variance of the outputs are the mixture's: mean of the means, mean of the variances
    plus the variance of the means."""
    torch.manual_seed(1)
    means, scales = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([0.3, 0.6, 0.2])
    mixture = vinn.Mixture([gaussian(m, s) for m, s in zip(means.tolist(), scales.tolist())])
    n = 40000
    with torch.no_grad():
        y = mixture(torch.ones(n, 1))[:, 0]
    mean = means.mean()
    variance = (scales**2).mean() + ((means - mean) ** 2).mean()
    assert abs(y.mean() - mean) < 4 * math.sqrt(variance / n)
    fourth = ((y - y.mean()) ** 4).mean()
    assert abs(y.var() - variance) < 4 * math.sqrt((fourth - variance**2) / n)


def test_deterministic_mode_averages_the_members_at_their_loc():
    torch.manual_seed(2)
    members = [nn.Sequential(vinn.Linear(4, 8), nn.ReLU(), vinn.Linear(8, 3)) for _ in range(3)]
    x = torch.randn(5, 4)
    with vinn.deterministic():
        torch.testing.assert_close(vinn.Mixture(members)(x), torch.stack([m(x) for m in members]).mean(0))


def test_sample_draws_a_member_for_each_sample_uniformly_and_keeps_the_output_structure():
    torch.manual_seed(3)
    t, k = 3000, 3
    x = torch.zeros(4, 2)
    y = vinn.sample(vinn.Mixture([nn.Sequential(Shift(i)) for i in range(k)]), x, samples=t)
    assert y.shape == (t, 4, 2)
    member = y[:, 0, 0]
    torch.testing.assert_close(y, member[:, None, None].expand(t, 4, 2))  # a sample's examples share its member
    counts = torch.bincount(member.long(), minlength=k)
    assert counts.sum() == t
    assert ((counts - t / k).abs() < 4 * math.sqrt(t / k * (1 - 1 / k))).all(), counts
    assert member.diff().ne(0).sum() > t / 2  # in random order, not one member's samples after another's

    class Pair(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return {"a": x + self.k, "b": (x.sum(1) - self.k,)}

    out = vinn.sample(vinn.Mixture([Pair(0), Pair(1)]), x, samples=5, generator=0)
    torch.testing.assert_close(out["b"][0][:, 0], -out["a"][:, 0, 0])  # each sample's leaves from one member


def test_predict_samples_the_mixture_predictive():
    """Independent draws of the mixture: their mean is the mean of the members' predictive means,
    with the standard error of T independent draws."""
    torch.manual_seed(4)
    members = [nn.Sequential(vinn.Linear(4, 8, init_scale=0.3), nn.ReLU(), vinn.Linear(8, 3, init_scale=0.3)).eval() for _ in range(2)]
    x = torch.randn(6, 4)
    p = vinn.predict(vinn.Mixture(members), x, samples=4000, generator=0)
    assert p.shape == (4000, 6, 3)
    alone = [vinn.predict(m, x, samples=8000, generator=i + 1) for i, m in enumerate(members)]
    expected = torch.stack([a.mean(0) for a in alone]).mean(0)
    se = (p.var(0) / len(p) + sum(a.var(0) for a in alone) / 4 / 8000).sqrt()
    assert ((p.mean(0) - expected).abs() < 4.5 * se).all()
    assert ((alone[0].mean(0) - alone[1].mean(0)).abs() > 20 * se).any()  # one member's mean would fail
    torch.testing.assert_close(p[:64], vinn.predict(vinn.Mixture(members), x, samples=4000, generator=0)[:64])  # reproducible


def test_kl_is_the_mean_of_the_members_kl_wherever_the_mixture_sits():
    torch.manual_seed(5)
    members = [nn.Sequential(vinn.Linear(4, 8), nn.ReLU(), vinn.Linear(8, 3)) for _ in range(3)]
    mixture = vinn.Mixture(members)
    expected = torch.stack([vinn.kl(m) for m in members]).mean()
    torch.testing.assert_close(mixture.kl, expected)
    outer = nn.Sequential(vinn.Linear(3, 4), mixture)
    torch.testing.assert_close(vinn.kl(outer), vinn.kl(outer[0]) + expected)


def test_elbo_trains_every_member_and_the_state_dict_round_trips():
    torch.manual_seed(5)
    build = lambda: vinn.Mixture([nn.Sequential(vinn.Linear(4, 8), nn.ReLU(), vinn.Linear(8, 3)) for _ in range(2)])  # noqa: E731
    mixture = build()
    x, y = torch.randn(64, 4), torch.randint(3, (64,))
    loss = vinn.ELBO(mixture, nn.CrossEntropyLoss(), dataset_size=640)(mixture(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixture.parameters())
    copy = build()
    copy.load_state_dict(mixture.state_dict())
    with vinn.deterministic():
        torch.testing.assert_close(copy(x), mixture(x))


def test_bad_input_fails_early():
    with pytest.raises(TypeError, match="members must be an iterable of at least two torch.nn.Module"):
        vinn.Mixture(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="members must be an iterable of at least two"):
        vinn.Mixture([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"members\[1\]"):
        vinn.Mixture([nn.Linear(2, 2), "net"])
    mixture = vinn.Mixture(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
    with pytest.raises(ValueError, match="one batch size N"):
        mixture(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"scale must be a batched torch\.Tensor \(N, \.\.\.\), got 2\.0"):
        mixture(torch.randn(3, 2), scale=2.0)
    with pytest.raises(TypeError, match="batch-first tensors"):
        mixture()
    with pytest.raises(ValueError, match="vinn.Mixture has no single deterministic network"):
        vinn.to_deterministic(mixture)
