"""Bayesian LoRA (BLoB, Wang et al. 2024): a peft LoRA fine-tune whose ``lora_A`` adapters are Bayesian.

    python examples/bayesian_lora.py [--steps 400] [--fast]

A small BERT, built from a config (no download), stands in for a pretrained transformer. peft
wraps its attention projections (``query``, ``value``) with LoRA adapters, ``y = W x + B A x``,
and freezes everything else but the classifier head. `vinn.bayesify`, with a `BayesConfig` that
keeps every layer deterministic except those whose name matches ``*.lora_A.*``, then gives each
``A`` a Normal posterior: the asymmetric choice of BLoB (Bayesian Low-Rank Adaptation by
Backpropagation), where ``B`` stays a point estimate, so that the update ``B A`` is random while the
number of Bayesian parameters is a few thousandths of the model's. The adapters train with
`vinn.ELBO`; the frozen base weights stay exactly as they were. Prediction is `vinn.predict` on a
tokenizer-like batch ``{"input_ids", "attention_mask"}``.

The task is synthetic sequence classification: each sequence holds neutral words and one or three
words of positive or negative polarity, padded to a common length; the label is the polarity of
the majority. The base model is first trained on it (standing in for pretraining), then adapted to
a domain where some words change polarity.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator, Sequence

import peft
import torch
import transformers
from torch import Tensor, nn
from torch.distributions import Normal

import vinn

VOCAB, LENGTH = 64, 12
PAD, CLS = 0, 1
PRETRAINING_STEPS = 200
# word ids of each polarity; the others are neutral. In the fine-tuning domain two words of each
# polarity mean the opposite ("unpredictable": praise for a film, blame for a car's steering).
PRETRAINING = {"positive": range(2, 10), "negative": range(10, 18)}
FINE_TUNING = {"positive": [*range(2, 8), 16, 17], "negative": [*range(10, 16), 8, 9]}


def make_data(n: int, domain: dict[str, Sequence[int]], generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` padded sequences as a tokenizer returns them, and their labels (1: positive)."""
    polar = set(domain["positive"]) | set(domain["negative"])
    neutral = torch.tensor([w for w in range(CLS + 1, VOCAB) if w not in polar])
    input_ids = torch.full((n, LENGTH), PAD)
    attention_mask = torch.zeros(n, LENGTH, dtype=torch.long)
    labels = torch.randint(0, 2, (n,), generator=generator)
    lengths = torch.randint(6, LENGTH + 1, (n,), generator=generator)
    for i, length in enumerate(lengths.tolist()):
        words = neutral[torch.randint(0, len(neutral), (length - 1,), generator=generator)]
        count = 1 + 2 * int(torch.randint(0, 2, (), generator=generator))  # 1 or 3 polar words ...
        for k, position in enumerate(torch.randperm(length - 1, generator=generator)[:count].tolist()):
            agrees = k <= count // 2  # ... the majority of which say the label
            pool = domain["positive"] if agrees == bool(labels[i]) else domain["negative"]
            words[position] = pool[int(torch.randint(0, len(pool), (), generator=generator))]
        input_ids[i, 0], input_ids[i, 1:length] = CLS, words
        attention_mask[i, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def batches(batch: dict[str, Tensor], labels: Tensor, steps: int, size: int, generator: torch.Generator) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    for _ in range(steps):
        index = torch.randint(0, len(labels), (size,), generator=generator)
        yield {key: value[index] for key, value in batch.items()}, labels[index]


def base_model() -> nn.Module:
    """The "pretrained" transformer: a 2-layer BERT of width 32, from its config."""
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2, pad_token_id=PAD,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def bayesian_lora(model: nn.Module, rank: int = 4) -> nn.Module:
    """peft LoRA on the attention's query and value projections, then only the ``lora_A`` adapters Bayesian."""
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=["query", "value"])
    adapted = peft.get_peft_model(model, lora)  # freezes the base model; the classifier head stays trainable
    config = (
        vinn.BayesConfig()
        .set_global(None)  # every layer deterministic (the frozen base, lora_B, the head) ...
        .set_name("*.lora_A.*", vinn.LayerSpec(prior=Normal(0.0, 0.2), init_scale=0.05, estimator="flipout"))
    )  # ... except the A of each adapter: prior N(0, 0.2²), initial posterior scale 0.05, as in BLoB
    with warnings.catch_warnings():
        # transformers models do not trace with torch.fx: bayesify walks the module tree, and says so
        warnings.filterwarnings("ignore", message="torch.fx could not trace", category=UserWarning)
        return vinn.bayesify(adapted, config)


def pretrain(model: nn.Module, steps: int, generator: torch.Generator) -> None:
    """Stands in for pretraining: the whole model trained, deterministically, on the pretraining domain."""
    batch, labels = make_data(2048, PRETRAINING, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for x, y in batches(batch, labels, steps, 32, generator):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(**x).logits, y).backward()
        optimizer.step()


def evaluate(model: nn.Module, batch: dict[str, Tensor], labels: Tensor, samples: int) -> dict[str, float]:
    model.eval()
    p = vinn.predict(model, batch, samples=samples)  # (samples, N, 2): the softmax of each sampled pass
    mean = p.mean(0)
    return {
        "accuracy": (mean.argmax(1) == labels).float().mean().item(),
        "nll": nn.functional.nll_loss(mean.clamp_min(1e-12).log(), labels).item(),
        "ece": vinn.expected_calibration_error(p, labels),
    }


def main(steps: int = 400, samples: int = 16, fast: bool = False, seed: int = 0) -> dict[str, float]:
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if fast:
        steps, samples = 300, 8
    model = base_model()
    pretrain(model, PRETRAINING_STEPS, generator)
    train_batch, train_labels = make_data(4096, FINE_TUNING, generator)
    test_batch, test_labels = make_data(512, FINE_TUNING, generator)
    pretrained = evaluate(model, test_batch, test_labels, samples=1)  # no vinn layer: one deterministic pass

    bnn = bayesian_lora(model)
    report = bnn.conversion_report
    converted = [layer.name for layer in report.converted]
    assert converted and all(".lora_A." in name for name in converted), converted
    frozen = {name: p.detach().clone() for name, p in bnn.named_parameters() if not p.requires_grad}
    share = report.bayesian_parameters / report.total_parameters
    trainable = sum(p.numel() for p in bnn.parameters() if p.requires_grad)
    print(
        f"Bayesian: {len(converted)} lora_A adapters, {report.bayesian_parameters:,} of {report.total_parameters:,} "
        f"parameters ({share:.2%}); trainable, their scales included: {trainable:,}"
    )

    elbo = vinn.ELBO(bnn, nn.CrossEntropyLoss(), dataset_size=len(train_labels))
    optimizer = torch.optim.Adam(vinn.param_groups(bnn, lr=5e-3))  # the frozen parameters get no gradient: skipped
    bnn.train()
    for step, (x, y) in enumerate(batches(train_batch, train_labels, steps, 32, generator)):
        optimizer.zero_grad()
        loss = elbo(bnn(**x).logits, y)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  KL {bnn.kl.item():.1f}")

    assert all(torch.equal(p, frozen[name]) for name, p in bnn.named_parameters() if name in frozen), "a frozen weight moved"
    metrics = evaluate(bnn, test_batch, test_labels, samples)
    print(
        f"fine-tuning domain, test: pretrained accuracy {pretrained['accuracy']:.3f} NLL {pretrained['nll']:.3f} | "
        f"Bayesian LoRA accuracy {metrics['accuracy']:.3f} NLL {metrics['nll']:.3f} ECE {metrics['ece']:.3f} "
        f"| {time.perf_counter() - start:.1f} s"
    )
    return metrics | {"pretrained_accuracy": pretrained["accuracy"], "pretrained_nll": pretrained["nll"], "bayesian_share": share}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--fast", action="store_true", help="fewer steps and samples, for tests")
    args = parser.parse_args()
    main(args.steps, fast=args.fast)
