"""How much of a model `vinn.bayesify(model)` makes Bayesian by default, per architecture family.

For models built from code or small configs (no download: torchvision with ``weights=None``, timm
with ``pretrained=False`` and transformers from ``AutoConfig``-style configs when they are
installed), converts each with
the defaults and counts its parameters: all of them, those of normalization layers (opt-in, so
left out of the share), and those that became Bayesian. Prints a Markdown table, and with
``--readme README.md`` writes it into that file's ``bayesian-share`` block::

    .venv/bin/python benchmarks/bayesian_share.py [--quick] [--readme README.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import vinn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from readme_blocks import rewrite_block  # noqa: E402

README_BLOCK = "bayesian-share"


def torchvision_models(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    import torchvision

    names = ["resnet18", "mobilenet_v3_small"] if quick else [
        "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "densenet121", "vit_b_16", "swin_t",
    ]  # fmt: skip
    return {f"torchvision {name}": (lambda name=name: torchvision.models.get_model(name, weights=None)) for name in names}


def timm_models(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    try:
        import timm
    except ImportError:
        return {}
    names = ["convnext_atto", "vit_tiny_patch16_224"] if quick else [
        "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "vit_small_patch16_224",
        "deit_small_distilled_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "convit_tiny", "maxvit_tiny_tf_224",
    ]  # fmt: skip
    return {f"timm {name}": (lambda name=name: timm.create_model(name, pretrained=False)) for name in names}


def transformers_models(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    try:
        import transformers
    except ImportError:
        return {}
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 1000}
    # each with the head people fine-tune it with: a classifier for encoders, a language-model head
    # (tied to the input embedding where the family ties them) for decoders
    classifier, causal = transformers.AutoModelForSequenceClassification, transformers.AutoModelForCausalLM
    models = {
        "BERT": (classifier, lambda: transformers.BertConfig(**size)),
        "GPT-2": (causal, lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0)),
        "Llama": (causal, lambda: transformers.LlamaConfig(**size, num_key_value_heads=2)),
    }
    if not quick:
        models |= {
            "RoBERTa": (classifier, lambda: transformers.RobertaConfig(**size)),
            "DistilBERT": (classifier, lambda: transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000)),
            "Qwen2": (causal, lambda: transformers.Qwen2Config(**size, num_key_value_heads=2)),
            "ViT": (transformers.AutoModelForImageClassification, lambda: transformers.ViTConfig(**size, image_size=32, patch_size=8)),
            "Gemma": (causal, lambda: transformers.GemmaConfig(**size, num_key_value_heads=2, head_dim=16)),
            "BART": (classifier, lambda: transformers.BartConfig(
                d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000,
            )),
        }
    return {
        f"transformers {name} ({auto.__name__.removeprefix('AutoModelFor')})": (lambda auto=auto, make=make: auto.from_config(make()))
        for name, (auto, make) in models.items()
    }


def count(model: nn.Module) -> dict[str, int]:
    """Parameters of ``model``: all, those of normalization layers, and those ``bayesify`` makes Bayesian."""
    norms = sum(
        p.numel() for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untraceable models: the fallback's warning is expected here
        report = vinn.bayesify(model).conversion_report
    return {"total": report.total_parameters, "norms": norms, "bayesian": report.bayesian_parameters, "traced": report.traced}


def table(rows: dict[str, dict[str, int]]) -> str:
    lines = [
        "| model | parameters | Bayesian | share (norms excluded) | traced by torch.fx |",
        "|---|---:|---:|---:|---|",
    ]
    for name, c in rows.items():
        share = c["bayesian"] / (c["total"] - c["norms"])
        lines.append(f"| {name} | {c['total']:,} | {c['bayesian']:,} | {share:.1%} | {'yes' if c['traced'] else 'no'} |")
    return "\n".join(lines)


def main(quick: bool, readme: str | None) -> str:
    torch.manual_seed(0)
    models = torchvision_models(quick) | timm_models(quick) | transformers_models(quick)
    rows = {name: count(build()) for name, build in models.items()}
    result = table(rows) + f"\n\n`benchmarks/bayesian_share.py`, {datetime.date.today()}, torch {torch.__version__}."
    print(result)
    if readme is not None:
        rewrite_block(Path(readme), README_BLOCK, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models of each library: checks that it runs")
    parser.add_argument("--readme", help="Markdown file whose bayesian-share block gets the table")
    arguments = parser.parse_args()
    main(arguments.quick, arguments.readme)
