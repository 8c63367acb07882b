"""scikit-learn's bundled handwritten digits (1797 images, 8 x 8, 10 classes) as tensors.

The data ship inside scikit-learn: nothing is downloaded. A fixed, stratified train/test split
(80/20 by default: 1437 / 360 images), pixels scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Digits", "digits"]


@dataclass(frozen=True)
class Digits:
    """Tensors and loaders; images are ``(n, 1, 8, 8)`` float32, labels ``(n,)`` int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    batch_size: int
    seed: int

    def train_loader(self, shuffle: bool = True, batch_size: int | None = None) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            TensorDataset(self.train_x, self.train_y),
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=gen,
        )

    def test_loader(self, batch_size: int | None = None) -> DataLoader:
        return DataLoader(TensorDataset(self.test_x, self.test_y), batch_size=batch_size or 512, shuffle=False)


def digits(seed: int = 0, test_fraction: float = 0.2, batch_size: int = 64) -> Digits:
    """Load the digits with a fixed stratified split (``seed`` fixes the split and shuffling)."""
    try:
        from sklearn.datasets import load_digits  # optional (the demo extra): only to load the data
        from sklearn.model_selection import train_test_split  # (same)
    except ImportError as e:  # pragma: no cover - exercised only without the demo extra
        raise ImportError("fastprune.data.digits needs scikit-learn: pip install 'fastprune[demo]'") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed, stratify=bunch.target)
    tr, te = torch.tensor(tr), torch.tensor(te)
    return Digits(x[tr], y[tr], x[te], y[te], batch_size, seed)
