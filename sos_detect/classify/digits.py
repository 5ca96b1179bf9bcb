"""scikit-learn's real 8×8 digits (1797 images, ships in the wheel) and a small MLP trained on them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised (x_train, y_train, x_test, y_test), a seeded stratified split.

    Each pixel becomes (x − mean) / std over the training split; a pixel constant there (std 0: four corner and
    edge pixels) is only centred, as scikit-learn's StandardScaler does, so a test image with ink there stays finite.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


def digits_mlp(hidden: int = 64) -> nn.Sequential:
    """64 → hidden → hidden → 10 ReLU MLP on flat or 1×8×8 input; the last nn.Linear (index 5) is shifted."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def train_digits_mlp(x: Tensor, y: Tensor, *, epochs: int = 60, seed: int = 0, hidden: int = 64) -> nn.Sequential:
    """Full-batch-shuffled SGD (momentum 0.9, batch 64) from a seeded init."""
    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_digits_imagefolder(
    root: str | Path, *, size: int = 32, n_train: int = 1200, n_val: int | None = None, seed: int = 0
) -> Path:
    """The 1797 digits as an ImageFolder (train/<digit>/*.png, val/<digit>/*.png), 8×8 upscaled to size×size.

    Pixel values 0..16 become 0..255 grey levels (bilinear upscaling). The classes take turns in a seeded order: the
    first n_train images go to train/, the next n_val (default: all the rest) to val/, both balanced over the digits.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    x, y = load_digits(return_X_y=True)
    if not 0 < n_train < len(y):
        raise ValueError(f"n_train must be in 1..{len(y) - 1}, got {n_train}")
    for split in ("train", "val"):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True, exist_ok=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    rank = np.empty(len(y), np.int64)  # position of each image among its class in the permutation
    for digit in range(10):
        rank[perm[y[perm] == digit]] = np.arange((y == digit).sum())
    order = perm[np.lexsort((y[perm], rank[perm]))][: n_train + (n_val or len(y))]  # classes take turns
    for k, i in enumerate(order):
        folder = root / ("train" if k < n_train else "val") / str(y[i])
        pixels = np.round(x[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root
