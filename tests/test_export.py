"""Export of the posterior-loc model: torch.export of the plain torch model `vinn.to_deterministic`
returns and of the vinn model itself inside `vinn.deterministic()`; ONNX of the former."""

import pytest
import torch
from torch import nn

import vinn


def _bnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return vinn.bayesify(net, init_scale=0.1).eval()


def _posterior_loc_output(bnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with vinn.deterministic():
        return bnn(x)


def test_torch_export_of_to_deterministic(device):
    bnn, x = _bnn().to(device), torch.randn(2, 1, 6, 6, device=device)
    program = torch.export.export(vinn.to_deterministic(bnn), (x,))
    torch.testing.assert_close(program.module()(x), _posterior_loc_output(bnn, x))


def test_torch_export_of_the_vinn_model_inside_deterministic(device):
    bnn, x = _bnn().to(device), torch.randn(2, 1, 6, 6, device=device)
    with vinn.deterministic():
        program = torch.export.export(bnn, (x,))
    exported = program.module()
    assert torch.equal(exported(x), exported(x)), "the exported graph does not sample"
    torch.testing.assert_close(exported(x), _posterior_loc_output(bnn, x))
    # a vinn layer alone, too: its loc is an ordinary weight of the exported program
    layer = vinn.Linear(4, 3).to(device)
    with vinn.deterministic():
        out = torch.export.export(layer, (torch.ones(2, 4, device=device),)).module()(torch.ones(2, 4, device=device))
    torch.testing.assert_close(out, torch.ones(2, 4, device=device) @ layer.weight.detach().T + layer.bias.detach())


def test_onnx_export_of_to_deterministic(tmp_path):
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs vinn[export]")
    pytest.importorskip("onnxruntime", reason="running the ONNX program needs vinn[export]")
    bnn, x = _bnn(), torch.randn(2, 1, 6, 6)
    program = torch.onnx.export(vinn.to_deterministic(bnn), (x,), dynamo=True)
    program.save(str(tmp_path / "bnn.onnx"))
    assert (tmp_path / "bnn.onnx").stat().st_size > 0
    torch.testing.assert_close(program(x)[0], _posterior_loc_output(bnn, x))
