"""Matrix sensing with a deep linear factorisation: the problem and its loss.

Ground truth X* = U Vᵀ (d×d, rank r, singular values 1), n Gaussian measurements y_i = ⟨A_i, X*⟩ with
A_i entries i.i.d. N(0, 1) and n < d², and the model X = W_L ⋯ W_1 (all factors d×d) fitted by
L(W) = (1/2n) Σ_i (⟨A_i, X⟩ − y_i)², so that E_A L = ½‖X − X*‖²_F. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float64


@dataclass(frozen=True)
class SensingConfig:
    """One problem size: d×d ground truth of rank r, n measurements, depth L, initial factor scale α."""

    d: int
    r: int
    n: int
    depth: int
    init: float = 0.1  # W_j = α·G_j/√d, G_j i.i.d. N(0, 1)

    def __post_init__(self) -> None:
        if not (1 <= self.r <= self.d and 1 <= self.n < self.d * self.d and self.depth >= 2 and self.init > 0):
            raise ValueError(f"need 1 ≤ r ≤ d, 1 ≤ n < d², depth ≥ 2 and init > 0, got {self}")

    @property
    def label(self) -> str:
        return f"d{self.d}_r{self.r}_n{self.n}_L{self.depth}_a{self.init:g}"


@dataclass
class SensingProblem:
    config: SensingConfig
    x_star: Tensor  # d×d
    a: Tensor  # n×d×d measurement matrices
    y: Tensor  # n

    @classmethod
    def generate(cls, config: SensingConfig, seed: int) -> SensingProblem:
        """X* and the measurements from one seed (the initial factors come from `initial_factors`)."""
        gen = torch.Generator().manual_seed(seed)
        d, r = config.d, config.r
        u = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=DTYPE))[0]
        v = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=DTYPE))[0]
        x_star = u @ v.T
        a = torch.randn(config.n, d, d, generator=gen, dtype=DTYPE)
        return cls(config, x_star, a, measure(a, x_star))

    def initial_factors(self, seed: int) -> list[Tensor]:
        """W_1, …, W_L with entries N(0, α²/d), from their own seeded stream."""
        gen = torch.Generator().manual_seed(10_000 + seed)
        c = self.config
        return [c.init * torch.randn(c.d, c.d, generator=gen, dtype=DTYPE) / c.d**0.5 for _ in range(c.depth)]

    def loss(self, factors: list[Tensor]) -> Tensor:
        """(1/2n) Σ_i (⟨A_i, W_L ⋯ W_1⟩ − y_i)²."""
        residual = measure(self.a, product(factors)) - self.y
        return 0.5 * (residual * residual).mean()

    def loss_and_grads(self, factors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """L and its gradients in closed form: ∇_{W_j} L = (W_L ⋯ W_{j+1})ᵀ G (W_{j−1} ⋯ W_1)ᵀ, G = (1/n) Σ_i r_i A_i.

        The same figures as autograd of `loss`, at a third of its cost per step.
        """
        ws = [w.detach() for w in factors]
        below = [ws[0]]  # below[j] = W_{j+1} ⋯ W_1 (0-based)
        for w in ws[1:-1]:
            below.append(w @ below[-1])
        a = self.a.reshape(self.a.shape[0], -1)
        x = ws[-1] @ below[-1]
        residual = a @ x.reshape(-1) - self.y
        left = (residual @ a).reshape(x.shape) / residual.shape[0]  # (W_L ⋯ W_{j+1})ᵀ G, from j = L down
        grads = []
        for j in range(len(ws) - 1, 0, -1):
            grads.append(left @ below[j - 1].T)
            left = ws[j].T @ left
        grads.append(left)
        return 0.5 * residual.dot(residual) / residual.shape[0], grads[::-1]

    def test_error(self, factors: list[Tensor]) -> float:
        """‖X − X*‖_F / ‖X*‖_F."""
        x = product(factors).detach()
        return float(torch.linalg.matrix_norm(x - self.x_star) / torch.linalg.matrix_norm(self.x_star))


def product(factors: list[Tensor]) -> Tensor:
    """X = W_L ⋯ W_1 for factors given as [W_1, …, W_L]."""
    x = factors[0]
    for w in factors[1:]:
        x = w @ x
    return x


def measure(a: Tensor, x: Tensor) -> Tensor:
    """⟨A_i, X⟩ for every i."""
    return a.reshape(a.shape[0], -1) @ x.reshape(-1)
