"""Optimum shifting as pure tensor math: Gram accumulation and the guarded minimum-norm solver.

A linear map Z = AV (A: r×m inputs, V: m×n weight transposed) is replaced by V' solving

    minimise ‖V'‖_F  subject to  ‖A(V' − V)‖_F ≤ τ‖AV‖_F.

Everything depends on A only through G = AᵀA, so rows can be streamed, merged across batches or
processes, and never held in memory. τ = 0 is the paper's V* = Aᵀ(AAᵀ)⁻¹AV, computed safely as the
projection of V onto the numerical row space of A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_BISECTION_STEPS = 200


class GramAccumulator:
    """Streaming G = Σ_batches AᵀA in float64, plus the number of rows seen."""

    def __init__(self, m: int) -> None:
        if m <= 0:
            raise ValueError(f"GramAccumulator needs a positive width, got m={m}")
        self.m = m
        self._gram: Tensor | None = None
        self._rows = 0

    def update(self, rows: Tensor) -> None:
        """Add AᵀA for rows A of shape (r, m); float64 on the rows' device."""
        if rows.ndim != 2 or rows.shape[1] != self.m:
            raise ValueError(f"expected rows of shape (r, {self.m}), got {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"expected floating-point rows, got {rows.dtype}")
        a = rows.detach().to(torch.float64)
        if not torch.isfinite(a).all():
            raise ValueError("rows contain NaN or Inf; refusing to accumulate a non-finite Gram matrix")
        if self._gram is None:
            self._gram = torch.zeros(self.m, self.m, dtype=torch.float64, device=a.device)
        self._gram.addmm_(a.T, a.to(self._gram.device))
        self._rows += a.shape[0]

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """Add another accumulator's rows into this one (G is a sum); returns self."""
        if other.m != self.m:
            raise ValueError(f"cannot merge Gram matrices of widths {self.m} and {other.m}")
        if other._gram is not None:
            if self._gram is None:
                self._gram = other._gram.clone()
            else:
                self._gram += other._gram.to(self._gram.device)
        self._rows += other._rows
        return self

    @property
    def gram(self) -> Tensor:
        """G = AᵀA (m×m, float64); zeros before any update."""
        if self._gram is None:
            return torch.zeros(self.m, self.m, dtype=torch.float64)
        return self._gram

    @gram.setter
    def gram(self, value: Tensor) -> None:
        """Replace G, e.g. by its all-reduced sum across processes."""
        if value.shape != (self.m, self.m):
            raise ValueError(f"expected a {self.m}×{self.m} Gram matrix, got {tuple(value.shape)}")
        self._gram = value.to(torch.float64)

    @property
    def rows(self) -> int:
        return self._rows

    @rows.setter
    def rows(self, value: int) -> None:
        self._rows = int(value)


@dataclass
class ShiftInfo:
    """What a shift does, known before it is applied.

    The shift is the linear map V' = M V with M = U diag(f) Uᵀ, f_i = λ_i / (λ_i + μ) on the kept
    eigen-directions of G and 0 on the discarded ones.
    """

    norm_before: float
    norm_after: float
    out_change: float  # predicted ‖A(V'−V)‖ / ‖AV‖
    rank: int
    mu: float
    tau: float
    eigvecs: Tensor  # U, float64 (m×m)
    factors: Tensor  # f, float64 (m,)

    @property
    def matrix(self) -> Tensor:
        """M = U diag(f) Uᵀ (float64)."""
        return (self.eigvecs * self.factors) @ self.eigvecs.T

    def apply(self, x: Tensor) -> Tensor:
        """M x for any (m, k) tensor (e.g. an optimiser buffer in the V layout); keeps x's dtype."""
        if x.ndim != 2 or x.shape[0] != self.eigvecs.shape[0]:
            raise ValueError(f"expected a tensor of shape ({self.eigvecs.shape[0]}, k), got {tuple(x.shape)}")
        u = self.eigvecs.to(x.device)
        y = u @ (self.factors.to(x.device)[:, None] * (u.T @ x.to(torch.float64)))
        return y.to(x.dtype)


def default_rtol(m: int, dtype: torch.dtype) -> float:
    """Eigenvalues λ ≤ rtol·λ_max of G count as zero.

    Features in `dtype` carry relative noise eps, so singular values of A below m·eps·σ_max are noise
    (the `matrix_rank` rule), i.e. λ ≤ (m·eps)²·λ_max; float64 eigh of G itself resolves no better
    than m·eps64·λ_max.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(m * torch.finfo(torch.float64).eps, (m * eps) ** 2)


def _check_inputs(gram: Tensor, v: Tensor, tau: float) -> None:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    if v.ndim != 2 or v.shape[0] != gram.shape[0]:
        raise ValueError(
            f"V must have shape (m, n) = ({gram.shape[0]}, n) to match the {gram.shape[0]}×{gram.shape[0]} "
            f"Gram matrix, got {tuple(v.shape)}"
        )
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if not torch.isfinite(gram).all():
        raise ValueError("Gram matrix is not finite (NaN/Inf in the captured features); shift refused")
    if not torch.isfinite(v).all():
        raise ValueError("V is not finite; shift refused")


def _ridge_mu(lam: Tensor, s: Tensor, kept: Tensor, target: float) -> float:
    """Root μ of Σ_kept λ(μ/(λ+μ))² s + Σ_dropped λ s = target, by bisection in log μ (feasible side)."""
    lk, sk = lam[kept], s[kept]
    base = float((lam[~kept] * s[~kept]).sum())

    def change(mu: float) -> float:
        return base + float((lk * (mu / (lk + mu)) ** 2 * sk).sum())

    lo, hi = math.log(float(lk.min()) * 1e-12), math.log(float(lk.max()) * 1e12)
    if change(math.exp(lo)) > target:
        return 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if change(math.exp(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def solve_shift(gram: Tensor, V: Tensor, tau: float = 0.0, rtol: float | None = None) -> tuple[Tensor, ShiftInfo]:
    """Minimum-norm V' with ‖A(V'−V)‖ ≤ τ‖AV‖, from G = AᵀA.

    In the eigenbasis G = U diag(λ) Uᵀ, C = UᵀV: C'_i = λ_i/(λ_i+μ)·C_i, with μ ≥ 0 the root of
    Σ λ_i (μ/(λ_i+μ))² ‖C_i‖² = τ² ‖AV‖² (μ = 0 for τ = 0: projection onto the row space of A).
    Returns V' in V's dtype and device, and the `ShiftInfo` describing the map.
    """
    _check_inputs(gram, V, tau)
    m = gram.shape[0]
    g = gram.to(device=V.device, dtype=torch.float64)
    g = 0.5 * (g + g.T)
    lam, u = torch.linalg.eigh(g)
    lam = lam.clamp_min(0.0)
    lam_max = float(lam.max())
    if lam_max <= 0.0:
        raise ValueError("Gram matrix is zero (no input rows were captured); shift refused")
    rtol = default_rtol(m, V.dtype) if rtol is None else float(rtol)
    kept = lam > rtol * lam_max

    v64 = V.detach().to(torch.float64)
    c = u.T @ v64
    s = (c * c).sum(dim=1)
    energy = float((lam * s).sum())  # ‖AV‖²

    if tau >= 1.0:
        mu = math.inf
    elif tau == 0.0 or energy == 0.0:
        mu = 0.0
    else:
        mu = _ridge_mu(lam, s, kept, tau * tau * energy)

    factors = torch.zeros_like(lam)
    if math.isfinite(mu):
        factors[kept] = lam[kept] / (lam[kept] + mu)
    change = float((lam * (1.0 - factors) ** 2 * s).sum())
    v_new = (u * factors) @ c
    info = ShiftInfo(
        norm_before=math.sqrt(float(s.sum())),
        norm_after=math.sqrt(float((factors**2 * s).sum())),
        out_change=math.sqrt(change / energy) if energy > 0 else 0.0,
        rank=int(kept.sum()),
        mu=mu,
        tau=float(tau),
        eigvecs=u,
        factors=factors,
    )
    return v_new.to(V.dtype), info


def output_change(gram: Tensor, V: Tensor, V_new: Tensor) -> float:
    """Relative output change ‖A(V'−V)‖ / ‖AV‖ = sqrt(tr(DᵀGD) / tr(VᵀGV)), D = V' − V, in float64."""
    g = gram.to(device=V.device, dtype=torch.float64)
    v = V.detach().to(torch.float64)
    d = V_new.detach().to(torch.float64) - v
    energy = float((v * (g @ v)).sum())
    return math.sqrt(max(float((d * (g @ d)).sum()), 0.0) / energy) if energy > 0 else 0.0
