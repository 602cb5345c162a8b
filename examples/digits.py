"""scikit-learn's bundled 8x8 digits as tensors: the data every example and the demo use (no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_digits_tensors(size: int = 28, test_fraction: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): images (N, 1, size, size) scaled to [0, 1], labels (N,) int64.

    The 8x8 images are resized bilinearly, so networks written for 28x28 MNIST run unchanged.
    The split is a fixed random permutation.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
