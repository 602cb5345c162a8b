"""A zoo of architectures through one check each: timm families and transformers classifiers, built
small and with random weights (no download).

`check_conversion` asks the same of every model: it converts; the input model is left untouched; at
the posterior loc the result computes exactly what the input computes; `vinn.sample` and
`vinn.predict` work on its inputs (an image tensor, or a tokenizer's batch); one ELBO step moves
its parameters with a finite KL; and `vinn.to_deterministic` gives back a plain model with the same
outputs. Each case also states a floor for the share of the model's parameters made Bayesian (what
`benchmarks/bayesian_share.py` tabulates at full size): a conversion that starts leaving layers
out fails here. GPT-2 (the Conv1D path and tied weights) has its own test in
test_bayesify_transformers.py; torchvision's families are in test_bayesify_torchvision.py.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vinn

pytestmark = pytest.mark.slow  # importing timm and transformers, then 18 models: about 20 s on one core

CLASSES, BATCH, SAMPLES = 10, 2, 3


def logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def call(model: nn.Module, inputs: Tensor | dict[str, Tensor]) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def check_conversion(model: nn.Module, inputs: Tensor | dict[str, Tensor]) -> float:
    """Every check of the zoo on ``model`` (in eval mode) and a batch of its ``inputs``; returns the
    share of its parameters made Bayesian."""
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = logits(call(model, inputs))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.fx could not trace", category=UserWarning)  # the fallback, reported
        bnn = vinn.bayesify(model)

    report = bnn.conversion_report
    assert report.converted and report.total_parameters == sum(p.numel() for p in model.parameters())
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(logits(call(bnn, inputs)), expected, atol=1e-5, rtol=1e-4)

    samples = vinn.sample(bnn, inputs, samples=SAMPLES)
    assert logits(samples).shape == (SAMPLES, *expected.shape)
    assert not torch.equal(logits(samples)[0], logits(samples)[1]), "each sample draws its own weights"
    p = vinn.predict(bnn, inputs, samples=SAMPLES)
    assert p.shape == (SAMPLES, *expected.shape)
    torch.testing.assert_close(p.sum(-1), torch.ones(SAMPLES, BATCH))

    before = {name: t.detach().clone() for name, t in bnn.named_parameters()}
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=1e-2))
    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=100)
    bnn.train()
    loss = elbo(logits(call(bnn, inputs)), torch.arange(BATCH) % expected.shape[-1])
    assert torch.isfinite(loss) and torch.isfinite(bnn.kl)
    loss.backward()
    optimizer.step()
    bnn.eval()
    changed = {name for name, t in bnn.named_parameters() if not torch.equal(t, before[name])}
    scales = {name for name in before if name.endswith("log_sigma2")}
    assert scales and scales <= changed, "the KL moves every posterior scale"
    assert changed - scales, "the likelihood moves the weights"

    net = vinn.to_deterministic(bnn)
    assert not any(isinstance(m, vinn.BayesianLayer) for m in net.modules())
    with torch.no_grad(), vinn.deterministic():
        torch.testing.assert_close(logits(call(net, inputs)), logits(call(bnn, inputs)))

    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state), "the input model changed"
    assert not any(isinstance(m, vinn.BayesianLayer) for m in model.modules())
    return report.bayesian_parameters / report.total_parameters


# -- timm: one model per family, at 32x32 ---------------------------------------------------------

# name -> (create_model keywords that shrink it, floor of the Bayesian share)
TIMM: dict[str, tuple[dict[str, Any], float]] = {
    "resnet10t": ({}, 0.99),
    "convnext_atto": ({"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)}, 0.99),
    "test_efficientnet": ({}, 0.97),  # timm's own small EfficientNet
    "mobilenetv3_small_050": ({}, 0.98),  # its classifier is timm.layers.Linear
    "tf_mobilenetv3_small_minimal_100": ({}, 0.98),  # TensorFlow's SAME padding: timm.layers.Conv2dSame
    "regnetx_002": ({}, 0.99),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 0.99),
    "deit_tiny_distilled_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 0.99),  # two heads
    "swin_tiny_patch4_window7_224": (
        {"img_size": 32, "window_size": 2, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        0.99,
    ),
    "levit_128s": ({"img_size": 32}, 0.99),
    "convit_tiny": ({"img_size": 32, "patch_size": 8, "depth": 2, "local_up_to_layer": 1}, 0.99),  # untraceable: module tree
    "test_maxvit": ({"img_size": 32}, 0.99),  # timm's own small MaxViT
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm(name):
    timm = pytest.importorskip("timm")
    options, floor = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **options).eval()
    assert check_conversion(model, torch.randn(BATCH, 3, 32, 32)) >= floor


def test_timm_layers_are_registered_and_sample_with_the_right_moments():
    """timm's nn.Linear and nn.Conv2d subclasses that compute the same op, padding aside, become
    vinn layers (`vinn.timm_layers`); the local reparameterization of Conv2dSame is exact."""
    timm = pytest.importorskip("timm")
    from vinn.timm_layers import Conv2dSame, Linear

    assert vinn.layer_types()[timm.layers.Linear] is Linear and vinn.layer_types()[timm.layers.Conv2dSame] is Conv2dSame
    torch.manual_seed(0)
    layer = Conv2dSame.from_torch(timm.layers.Conv2dSame(2, 3, 3, stride=2), init_scale=0.2)
    assert type(layer.to_torch()) is timm.layers.Conv2dSame
    x = torch.randn(1, 2, 5, 5).expand(20_000, -1, -1, -1)
    with torch.no_grad():
        out = layer(x)
        mean = layer._op(x[:1], layer.weight, layer.bias)[0]
        var = layer._op(x[:1].square(), layer.weight_scale.square(), layer.bias_scale.square())[0]
    n = out.shape[0]
    assert ((out.mean(0) - mean).abs() < 4.5 * (var / n).sqrt()).all()
    assert ((out.var(0) - var).abs() < 4.5 * var * (2 / n) ** 0.5).all()


# -- transformers: tiny configs, each with a classification head ------------------------------------

SIZE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


TEXT = {"max_position_embeddings": 32, "num_labels": CLASSES}
DECODER = {**SIZE, "num_key_value_heads": 1, "num_labels": CLASSES, "pad_token_id": 0, "use_cache": False}  # no cache to return

# name -> (builder from the transformers module, floor of the Bayesian share)
TRANSFORMERS: dict[str, tuple[Callable[[Any], nn.Module], float]] = {
    "BERT": (lambda t: t.BertForSequenceClassification(t.BertConfig(**SIZE, **TEXT)), 0.98),
    "RoBERTa": (lambda t: t.RobertaForSequenceClassification(t.RobertaConfig(**SIZE, **TEXT)), 0.98),
    "DistilBERT": (
        lambda t: t.DistilBertForSequenceClassification(
            t.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, **TEXT)
        ),
        0.98,
    ),
    "Llama": (lambda t: t.LlamaForSequenceClassification(t.LlamaConfig(**DECODER)), 0.99),
    "Qwen2": (lambda t: t.Qwen2ForSequenceClassification(t.Qwen2Config(**DECODER)), 0.99),
    "ViT": (lambda t: t.ViTForImageClassification(t.ViTConfig(**SIZE, image_size=32, patch_size=8, num_labels=CLASSES)), 0.96),
}


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformers(name):
    transformers = pytest.importorskip("transformers")
    build, floor = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = build(transformers).eval()
    if name == "ViT":
        inputs: Tensor | dict[str, Tensor] = torch.randn(BATCH, 3, 32, 32)
    else:  # a tokenizer's batch; no pad token (0), so the decoders classify from the last token
        inputs = {"input_ids": torch.randint(1, 100, (BATCH, 8)), "attention_mask": torch.ones(BATCH, 8, dtype=torch.long)}
    assert check_conversion(model, inputs) >= floor
