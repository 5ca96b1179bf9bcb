"""scikit-learn's real 8×8 digits (1797 images, ships in the wheel) and a small MLP trained on them."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised (x_train, y_train, x_test, y_test), a seeded stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
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
