"""Exact diagnostics of a factorisation: loss, test error, the full Hessian's trace and top eigenvalue, norms."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import hessian

from sos_detect.sensing.problem import SensingProblem, product


@dataclass
class Diagnostics:
    train_loss: float
    test_error: float  # ‖X − X*‖_F / ‖X*‖_F
    trace: float  # tr(∇²L) over all L·d² parameters
    lambda_max: float
    nuclear: float  # ‖X‖_*, the Schatten-1 norm of the end-to-end matrix
    last_norm: float  # ‖W_L‖_F

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def full_hessian(problem: SensingProblem, factors: list[Tensor]) -> Tensor:
    """∇²L with respect to vec(W_1), …, vec(W_L) stacked (L·d² × L·d²), by forward-over-reverse autodiff."""
    shape = factors[0].shape

    def loss(flat: Tensor) -> Tensor:
        return problem.loss(list(flat.reshape(len(factors), *shape)))

    flat = torch.stack([w.detach() for w in factors]).reshape(-1)
    return hessian(loss)(flat)


def diagnose(problem: SensingProblem, factors: list[Tensor]) -> Diagnostics:
    """Every figure exactly: the Hessian is formed in full and eigendecomposed."""
    factors = [w.detach() for w in factors]
    h = full_hessian(problem, factors)
    return Diagnostics(
        train_loss=float(problem.loss(factors)),
        test_error=problem.test_error(factors),
        trace=float(torch.trace(h)),
        lambda_max=float(torch.linalg.eigvalsh(h)[-1]),
        nuclear=float(torch.linalg.matrix_norm(product(factors), ord="nuc")),
        last_norm=float(torch.linalg.matrix_norm(factors[-1])),
    )
