"""bayesify on models with attention: nn.MultiheadAttention becomes vinn.MultiheadAttention, out_proj with it,
and torch's transformer blocks are converted inside and keep sampling where their fast path would not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vinn
from vinn.attention import OutProjection
from vinn.convert import transformer

torchvision = pytest.importorskip("torchvision")


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


class Encoder(nn.Module):
    """torch's transformer blocks inside a model torch.fx traces: they are leaves of the trace."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, 2)
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.encoder(x, src_key_padding_mask=padding), src_key_padding_mask=padding))


def attention_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)]


def test_vit_attention_becomes_bayesian_and_trains():
    torch.manual_seed(0)
    model = small_vit().eval()
    bnn = vinn.bayesify(model)
    report = bnn.conversion_report
    reasons = {layer.name: layer.reason for layer in report.layers}
    for name in attention_names(model):
        assert reasons[name] is None and reasons[f"{name}.out_proj"] is None
        assert type(bnn.get_submodule(name)) is vinn.MultiheadAttention
        assert type(bnn.get_submodule(f"{name}.out_proj")) is OutProjection
    assert not any(reason.startswith("read directly") for reason in filter(None, reasons.values()))
    assert {layer.kind for layer in report.kept} == {"LayerNorm"}  # opt-in
    layers = [m for m in bnn.modules() if isinstance(m, vinn.BayesianLayer)]
    assert report.bayesian_parameters == sum(p.numel() for m in layers for p in m.random_parameters().values())

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        with vinn.deterministic():
            torch.testing.assert_close(bnn(x), model(x), atol=1e-5, rtol=0)
        samples = vinn.sample(bnn, x, samples=3)
    assert (samples[0] - samples[1]).abs().max() > 0

    bnn.train()
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=1000)
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=1e-2))
    attention = bnn.get_submodule(attention_names(model)[0])
    before = attention.in_proj_weight_log_sigma2.detach().clone(), attention.out_proj.weight.detach().clone()
    loss = elbo(bnn(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(attention.in_proj_weight_log_sigma2, before[0]) and not torch.equal(attention.out_proj.weight, before[1])

    net = vinn.to_deterministic(bnn.eval())
    for name in attention_names(model):
        assert type(net.get_submodule(name)) is nn.MultiheadAttention
        assert type(net.get_submodule(f"{name}.out_proj")) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(net(x), bnn(x))


def test_a_deterministic_checkpoint_loads_and_the_config_can_keep_attention():
    torch.manual_seed(0)
    model = small_vit()
    bnn = vinn.bayesify(model)
    result = bnn.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_log_sigma2") or "_prior_" in k for k in result.missing_keys)

    config = vinn.BayesConfig().set_type(nn.MultiheadAttention, None)
    kept = vinn.bayesify(model, config).conversion_report
    reasons = {layer.name: layer.reason for layer in kept.layers}
    name = attention_names(model)[0]
    assert reasons[name] == "excluded by config (type MultiheadAttention)"
    assert reasons[f"{name}.out_proj"] == f"read directly by leaf module {name}"
    # last=k counts an attention layer, out_proj with it, as one layer
    last = vinn.bayesify(model, last=2).conversion_report
    assert [layer.name for layer in last.converted] == ["encoder.layers.encoder_layer_1.mlp.3", "heads.head"]
    last = vinn.bayesify(model, last=4).conversion_report
    assert [layer.name for layer in last.converted][:2] == [attention_names(model)[1], f"{attention_names(model)[1]}.out_proj"]


def test_frozen_out_proj_stays_frozen_both_ways():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True))
    model[1].out_proj.weight.requires_grad_(False)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            h = self.inner[0](x)
            return self.inner[1](h, h, h)[0]

    bnn = vinn.bayesify(Net())
    out_proj = bnn.get_submodule("inner.1.out_proj")
    assert not out_proj.weight.requires_grad and not out_proj.weight_log_sigma2.requires_grad
    assert out_proj.bias_log_sigma2.requires_grad
    net = vinn.to_deterministic(bnn)
    assert not net.get_submodule("inner.1.out_proj").weight.requires_grad


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's, for the input model's fast path
def test_transformer_blocks_are_converted_inside_and_keep_sampling():
    torch.manual_seed(0)
    model = Encoder().eval()
    bnn = vinn.bayesify(model)
    report = bnn.conversion_report
    assert report.traced
    assert {layer.name for layer in report.kept} == {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    for name in attention_names(model):
        assert type(bnn.get_submodule(name)) is vinn.MultiheadAttention
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        with vinn.deterministic():  # torch's fast path gives the padded positions no value: compare the others
            torch.testing.assert_close(bnn(x, padding)[~padding], model(x, padding)[~padding], atol=1e-5, rtol=0)
        # eval mode without gradients: torch's fused path would read the posterior loc and never sample
        samples = vinn.sample(bnn, (x, padding), samples=2)
        assert (samples[0] - samples[1])[:, 1:].abs().amin() > 0
        bypassed = copy.deepcopy(bnn)  # what the switch is for: without it, the blocks never sample
        transformer.restore(bypassed)
        for block, kwargs in ((bypassed.encoder, {"src_key_padding_mask": padding}), (bypassed.block, {})):
            assert torch.equal(block(x, **kwargs), block(x, **kwargs))

    net = vinn.to_deterministic(bnn)
    assert type(net.block.self_attn) is nn.MultiheadAttention and not net.block._forward_pre_hooks
    assert net.encoder.use_nested_tensor and not hasattr(net.encoder, "_vinn_use_nested_tensor")
    with torch.no_grad():
        torch.testing.assert_close(net(x, padding), model(x, padding))


def test_a_transformer_encoder_layer_itself_is_converted():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    with pytest.warns(UserWarning, match="could not trace"):
        bnn = vinn.bayesify(model)
    assert [layer.name for layer in bnn.conversion_report.converted] == ["self_attn", "self_attn.out_proj", "linear1", "linear2"]
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        with vinn.deterministic():
            torch.testing.assert_close(bnn(x), model(x), atol=1e-5, rtol=0)
        samples = vinn.sample(bnn, x, samples=2)
    assert (samples[0] - samples[1]).abs().amin() > 0
