"""vinn.Module.kl and vinn.kl: every vinn layer once, recursively."""

import pytest
import torch
from torch import nn

import vinn


class Net(vinn.Module):
    def __init__(self):
        super().__init__()
        self.shared = vinn.Linear(4, 4)
        self.body = nn.Sequential(self.shared, nn.ReLU(), vinn.Linear(4, 3), nn.Linear(3, 3))
        self.again = self.shared


def test_module_kl_sums_each_layer_once():
    torch.manual_seed(0)
    net = Net()
    expected = net.shared.kl + net.body[2].kl
    torch.testing.assert_close(net.kl, expected)
    torch.testing.assert_close(vinn.kl(nn.Sequential(net)), expected)
    net.kl.backward()
    assert net.shared.weight_log_sigma2.grad is not None


def test_kl_of_a_layer_and_of_nothing():
    layer = vinn.Linear(2, 2)
    torch.testing.assert_close(vinn.kl(layer), layer.kl)
    empty = vinn.kl(nn.Linear(2, 2))
    assert empty.dim() == 0 and float(empty) == 0.0
    assert float(vinn.Module().kl) == 0.0


@pytest.mark.parametrize("not_a_module", ["net", None, 3, [vinn.Linear(2, 2)], vinn.Linear])
def test_kl_of_a_non_module_is_a_type_error(not_a_module):
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        vinn.kl(not_a_module)
