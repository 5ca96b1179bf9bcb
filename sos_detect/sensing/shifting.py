"""Exact optimum shifting of the last factor W_L, keeping every training measurement.

With P = W_{L−1} ⋯ W_1, ⟨A_i, W_L P⟩ = tr(A_iᵀ W_L P) = ⟨A_i Pᵀ, W_L⟩: the measurements are linear in W_L with
rows R_i = vec(A_i Pᵀ) (n×d²). The shift is the project's guarded solver on G = RᵀR and V = vec(W_L) (d²×1):
min ‖W_L'‖_F s.t. ‖R(vec W_L' − vec W_L)‖ ≤ τ‖R vec W_L‖ (τ = 0: every measurement kept exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sos_detect.core.solver import ShiftInfo, solve_shift
from sos_detect.sensing.problem import SensingProblem, product


def last_factor_rows(problem: SensingProblem, factors: list[Tensor]) -> Tensor:
    """R (n×d²) with R_i = vec(A_i Pᵀ), so that R vec(W_L) = (⟨A_i, X⟩)_i."""
    p = product(factors[:-1]).detach()
    return (problem.a @ p.T).reshape(problem.a.shape[0], -1)


def shift_last_factor(problem: SensingProblem, factors: list[Tensor], tau: float = 0.0) -> ShiftInfo:
    """Replace W_L in place by the minimum-norm W_L' with ‖R(W_L' − W_L)‖ ≤ τ‖R W_L‖; returns the solver's info."""
    rows = last_factor_rows(problem, factors)
    w = factors[-1]
    new, info = solve_shift(rows.T @ rows, w.detach().reshape(-1, 1), tau=tau)
    with torch.no_grad():
        w.copy_(new.reshape(w.shape))
    return info
