"""Monte Carlo samples of the predictive distribution: `vinn.sample` and `vinn.predict`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import BayesianLayer

# Largest number of input elements in one folded forward pass when no chunk_size is given: about
# 16 MB of float32 input, which keeps the activations of ImageNet-sized convnets well under a GB
# while small inputs are batched whole.
_AUTO_CHUNK_ELEMENTS = 1 << 22

Output = Tensor | Sequence[Tensor]


def _split(y: Output, samples: int) -> Output:
    if isinstance(y, Tensor):
        return y.reshape(samples, y.shape[0] // samples, *y.shape[1:])
    return type(y)(_split(v, samples) for v in y)


def _cat(chunks: list[Output]) -> Output:
    if isinstance(chunks[0], Tensor):
        return torch.cat(chunks)
    return type(chunks[0])(_cat([c[i] for c in chunks]) for i in range(len(chunks[0])))


def _per_example_noise(model: nn.Module) -> bool:
    return all(m.per_example_noise for m in model.modules() if isinstance(m, BayesianLayer))


@torch.no_grad()
def sample(model: nn.Module, x: Tensor, samples: int = 16, *, chunk_size: int | None = None) -> Output:
    """Outputs of ``samples`` sampled forward passes: shape (T, N, ...), T = ``samples``.

    ``x`` is a batch (N, ...), moved to the model's device. Each of the T outputs of every example
    is an independent draw of the predictive distribution. When every vinn layer draws fresh noise
    per example (Normal posterior, local reparameterization), the T passes are folded into the
    batch and run as ``ceil(T / chunk_size)`` forward passes of ``chunk_size * N`` rows; otherwise
    each pass draws its own weights, T passes in all. ``chunk_size`` (samples per pass) bounds the
    working set; by default it is chosen so that one pass sees at most about 4M input elements.
    A model returning a tuple of tensors gets a tuple of (T, N, ...) tensors back.

    Runs without gradients and does not change ``model.training``: call ``model.eval()`` first,
    as for any prediction (dropout and batch-norm behave as in the mode the model is in).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise TypeError(f"x must be a batched torch.Tensor (N, ...), got {type(x).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (samples per forward pass) or None, got {chunk_size!r}")
    parameter = next(model.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.device)
    if not _per_example_noise(model):
        return _cat([_split(model(x), 1) for _ in range(samples)])
    per_pass = chunk_size or max(1, _AUTO_CHUNK_ELEMENTS // max(1, x.numel()))
    chunks = []
    for start in range(0, samples, per_pass):
        t = min(per_pass, samples - start)
        folded = x.expand(t, *x.shape).reshape(t * x.shape[0], *x.shape[1:])
        chunks.append(_split(model(folded), t))
    return _cat(chunks)


def predict(model: nn.Module, x: Tensor, samples: int = 16, *, chunk_size: int | None = None) -> Tensor:
    """Class probabilities of ``samples`` sampled forward passes: (T, N, C), softmax over classes.

    The model's outputs are logits with classes in dimension 1 (N, C, ...), as for
    ``nn.CrossEntropyLoss``. Feed the result to `vinn.uncertainty` or `vinn.confidence_score`.
    See `sample` for batching, chunking and devices.
    """
    logits = sample(model, x, samples, chunk_size=chunk_size)
    if not isinstance(logits, Tensor):
        raise TypeError("predict needs a model that returns one tensor of logits; use vinn.sample for tuples")
    return logits.softmax(dim=2)
