"""Shared test set-up: offline Ultralytics, explicit CPU threads, small real fixtures."""

from sos_detect.runtime import configure

configure()

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def low_rank_rows(
    rows: int, m: int, rank: int, noise: float, generator: torch.Generator, dtype=torch.float64
) -> torch.Tensor:
    """rows×m features of the given rank plus isotropic noise (the regime of real YOLO head inputs)."""
    b = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    c = torch.randn(rank, m, generator=generator, dtype=torch.float64)
    a = b @ c + noise * torch.randn(rows, m, generator=generator, dtype=torch.float64)
    return a.to(dtype)
