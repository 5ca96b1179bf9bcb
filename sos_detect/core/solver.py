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

import numpy as np
import torch
from torch import Tensor

_BISECTION_STEPS = 64  # log-μ bisection over [λ_min·1e-12, λ_max·1e12]: μ to ~1e-16 relative


class GramAccumulator:
    """Streaming G = Σ_batches AᵀA in float64, plus the number of rows seen."""

    def __init__(self, m: int) -> None:
        if m <= 0:
            raise ValueError(f"GramAccumulator needs a positive width, got m={m}")
        self.m = m
        self._gram: Tensor | None = None
        self._rows = 0

    def update(self, rows: Tensor) -> None:
        """Add AᵀA for rows A of shape (r, m), or Σ_k A_kᵀA_k for b blocks of rows (b, r, m); float64 on the
        rows' device. Blocks that are transposed views of (m, r) features need no copy (one batched product)."""
        if rows.ndim not in (2, 3) or rows.shape[-1] != self.m:
            raise ValueError(f"expected rows of shape (r, {self.m}) or (b, r, {self.m}), got {tuple(rows.shape)}")
        if not rows.is_floating_point():
            raise ValueError(f"expected floating-point rows, got {rows.dtype}")
        a = rows.detach().to(torch.float64)  # keeps a transposed view's layout: aᵀ is then contiguous
        a = a if a.ndim == 3 else a.unsqueeze(0)  # one block
        part = (a.mT @ a).sum(0)
        if not torch.isfinite(part).all():  # a NaN/Inf row poisons its row and column of AᵀA
            raise ValueError("rows contain NaN or Inf; refusing to accumulate a non-finite Gram matrix")
        if self._gram is None:
            self._gram = part
        else:
            self._gram += part.to(self._gram.device)
        self._rows += a.shape[0] * a.shape[1]

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


def default_rtol(m: int, dtype: torch.dtype) -> float:
    """Eigenvalues λ ≤ rtol·λ_max of G count as zero.

    Features in `dtype` carry relative noise eps, so singular values of A below m·eps·σ_max are noise
    (the `matrix_rank` rule), i.e. λ ≤ (m·eps)²·λ_max; float64 eigh of G itself resolves no better
    than m·eps64·λ_max.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(m * torch.finfo(torch.float64).eps, (m * eps) ** 2)


@dataclass
class GramSpectrum:
    """G = U diag(λ) Uᵀ (float64, λ clipped at 0); λ ≤ rtol·λ_max is numerically zero.

    One eigendecomposition serves every weight shifted on the same rows (e.g. a model and its EMA).
    """

    eigvals: Tensor
    eigvecs: Tensor
    rtol: float

    @property
    def resolution(self) -> float:
        """δ = 8·m·eps64·λ_max: bound on the error of each computed λ_i (float64 accumulation and eigh)."""
        return 8 * self.eigvals.shape[0] * torch.finfo(torch.float64).eps * float(self.eigvals.max())

    @property
    def kept(self) -> Tensor:
        return self.eigvals > self.rtol * float(self.eigvals.max())

    @property
    def rank(self) -> int:
        return int(self.kept.sum())

    @property
    def floor(self) -> float:
        """sqrt(rtol): the smallest relative output change the features' precision resolves."""
        return math.sqrt(self.rtol)


def spectrum(gram: Tensor, dtype: torch.dtype = torch.float32, rtol: float | None = None) -> GramSpectrum:
    """Eigendecomposition of a Gram matrix built from features of `dtype` (which sets the default rtol)."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError("Gram matrix is not finite (NaN/Inf in the captured features); shift refused")
    g = gram.to(torch.float64)
    lam, u = torch.linalg.eigh(0.5 * (g + g.T))
    lam = lam.clamp_min(0.0)
    if float(lam.max()) <= 0.0:
        raise ValueError("Gram matrix is zero (no input rows were captured); shift refused")
    m = gram.shape[0]
    return GramSpectrum(lam, u, default_rtol(m, dtype) if rtol is None else float(rtol))


@dataclass
class ShiftInfo:
    """What a shift does, known before it is applied.

    The shift is the linear map V' = M V with M = U diag(f) Uᵀ, f_i = λ_i / (λ_i + μ) (τ > 0), or
    f_i = 1 on the numerical row space and 0 elsewhere (τ = 0, the paper's projection).
    """

    norm_before: float
    norm_after: float
    out_change: float  # predicted ‖A(V'−V)‖ / ‖AV‖, float64, before V' is rounded to V's dtype
    budget: float  # bound on the stored V' output change: τ; for τ = 0 the projection's own change (≥ floor)
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


def _check_inputs(n_rows: int, v: Tensor, tau: float) -> None:
    if v.ndim != 2 or v.shape[0] != n_rows:
        raise ValueError(
            f"V must have shape (m, n) = ({n_rows}, n) to match the {n_rows}×{n_rows} Gram matrix, got {tuple(v.shape)}"
        )
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if not torch.isfinite(v).all():
        raise ValueError("V is not finite; shift refused")


def _ridge_mu(lam: np.ndarray, s: np.ndarray, target: float) -> float:
    """Largest μ with Σ λ_i s_i (μ/(λ_i+μ))² ≤ target (the left side grows with μ): bisection in log μ."""
    w = lam * s
    lo = math.log(float(lam.min()) * 1e-12)
    hi = math.log(float(lam.max()) * 1e12)

    def change(log_mu: float) -> float:
        mu = math.exp(log_mu)
        return float(np.dot(w, (mu / (lam + mu)) ** 2))

    if change(lo) > target:
        return 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if change(mid) <= target:
            lo = mid
        else:
            hi = mid
    return math.exp(lo)


def _ridge(lam: Tensor, s: Tensor, energy: float, tau: float) -> tuple[Tensor, float]:
    """Factors λ/(λ+μ) and μ with Σ λ_i (1 − f_i)² s_i ≤ τ²·energy: every direction shrinks, none is dropped."""
    if tau >= 1.0:
        return torch.zeros_like(lam), math.inf
    mu = _ridge_mu(lam.cpu().numpy(), s.cpu().numpy(), tau * tau * energy)
    return lam / (lam + mu), mu


def solve_shift(
    gram: Tensor | None,
    V: Tensor,
    tau: float = 0.0,
    rtol: float | None = None,
    *,
    spec: GramSpectrum | None = None,
) -> tuple[Tensor, ShiftInfo]:
    """Minimum-norm V' with ‖A(V'−V)‖ ≤ τ‖AV‖, from G = AᵀA (or its precomputed `spec`).

    In the eigenbasis G = U diag(λ) Uᵀ, C = UᵀV: C'_i = λ_i/(λ_i+μ)·C_i with μ the largest value for which
    Σ λ_i (μ/(λ_i+μ))² ‖C_i‖² ≤ τ²‖AV‖²; every direction shrinks, none is dropped, so the budget holds. It holds
    for the true rows and for V' as stored: each λ_i is taken at its upper bound λ_i + δ (`resolution`), ‖AV‖² at
    its lower bound, and V' rounded to V's dtype is measured and the target tightened until it fits.
    τ = 0 is the paper's V*: the projection onto the numerical row space (λ > rtol·λ_max), its change reported.
    Returns V' (V's dtype and device) and the `ShiftInfo` of the map.
    """
    spec = spec or spectrum(gram, V.dtype, rtol)
    _check_inputs(spec.eigvals.shape[0], V, tau)
    lam, u = spec.eigvals.to(V.device), spec.eigvecs.to(V.device)
    v64 = V.detach().to(torch.float64)
    c = u.T @ v64
    s = (c * c).sum(dim=1)
    if tau == 0.0:  # the projection: change measured with the computed λ
        lam_hi, energy = lam, float((lam * s).sum())
    else:
        lam_hi = lam + spec.resolution
        energy = float(((lam - spec.resolution).clamp_min(0) * s).sum())  # lower bound on ‖AV‖²

    def stored(factors: Tensor) -> tuple[Tensor, float]:
        """V' in V's dtype and sqrt(Σ λ_i ‖Uᵀ(V'−V)‖_i² / E), its relative output change."""
        v_new = ((u * factors) @ c).to(V.dtype)
        d = u.T @ (v_new.to(torch.float64) - v64)
        return v_new, math.sqrt(float((lam_hi * (d * d).sum(dim=1)).sum()) / energy)

    factors, mu, v_new, change = torch.ones_like(lam), 0.0, V.detach().clone(), 0.0
    if energy <= 0.0:
        pass  # V carries no output on these rows (or none that the Gram resolves): nothing to keep, nothing moved
    elif tau >= 1.0:  # V' = 0 changes the outputs by exactly ‖AV‖
        factors, mu, v_new, change = torch.zeros_like(lam), math.inf, torch.zeros_like(V), 1.0
    elif tau == 0.0:
        factors = spec.kept.to(torch.float64)
        v_new, change = stored(factors)
    else:
        target = tau if V.dtype == torch.float64 else tau * (1 - 1e-5)  # room for rounding V' to V's dtype
        factors, mu = _ridge(lam_hi, s, energy, target)
        v_new, change = stored(factors)
        step = 1e-9 * tau
        for _ in range(8):  # rounding to V's dtype overshot: tighten the target and solve again
            if change <= tau:
                break
            target, step = max(target - max(2 * (change - tau), step), 0.0), 10 * step
            factors, mu = _ridge(lam_hi, s, energy, target)
            v_new, change = stored(factors)
        if change > tau:  # nothing representable in V's dtype fits the budget: keep V
            factors, mu, v_new, change = torch.ones_like(lam), 0.0, V.detach().clone(), 0.0
    info = ShiftInfo(
        norm_before=math.sqrt(float(s.sum())),
        norm_after=float(v_new.to(torch.float64).norm()),
        out_change=change,
        budget=tau if tau > 0 else max(change, spec.floor),
        rank=spec.rank,
        mu=mu,
        tau=float(tau),
        eigvecs=u,
        factors=factors,
    )
    return v_new, info


def output_change(gram: Tensor, V: Tensor, V_new: Tensor) -> float:
    """Relative output change ‖A(V'−V)‖ / ‖AV‖ = sqrt(tr(DᵀGD) / tr(VᵀGV)), D = V' − V, in float64."""
    g = gram.to(device=V.device, dtype=torch.float64)
    v = V.detach().to(torch.float64)
    d = V_new.detach().to(torch.float64) - v
    energy = float((v * (g @ v)).sum())
    return math.sqrt(max(float((d * (g @ d)).sum()), 0.0) / energy) if energy > 0 else 0.0
