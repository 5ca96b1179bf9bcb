"""Full-batch trainers for the factorisation: GD, GD with weight-noise injection, NSO, SAM, GD with optimum shifting.

All take the same learning rate and step budget. NSO and SAM are the project's optimisers
(`sos_detect.core.optim`) around plain SGD; noise injection spends the same gradients per step as NSO
(2m one-sided draws against m ± pairs), so the two differ only in the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sos_detect.core.optim import NSO, SAM
from sos_detect.sensing.problem import SensingProblem
from sos_detect.sensing.shifting import shift_last_factor

KINDS = ("gd", "noise", "nso", "sam", "os")


@dataclass(frozen=True)
class Method:
    """A trainer and its one hyper-parameter: σ (noise, nso), ρ (sam) or τ (os); gd has none."""

    name: str
    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown trainer {self.kind!r}; choose from {KINDS}")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    lr: float = 0.3
    perturbations: int = 2  # NSO pairs m per step; noise injection draws 2m
    shift_every: int = 100  # k: optimum shifting after every k-th step (the last one too when k divides steps)


def train(
    problem: SensingProblem, init: list[Tensor], method: Method, settings: TrainSettings, seed: int = 0
) -> list[Tensor]:
    """Run `settings.steps` full-batch steps from `init` (not modified); returns the final factors [W_1, …, W_L].

    Raises FloatingPointError when the loss stops being finite.
    """
    params = [w.detach().clone().requires_grad_(True) for w in init]
    noise_gen = torch.Generator().manual_seed(20_000 + seed)

    def closure() -> Tensor:
        loss, grads = problem.loss_and_grads(params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return loss

    if method.kind == "nso":
        opt = NSO(
            params,
            torch.optim.SGD,
            sigma=method.value,
            num_perturbations=settings.perturbations,
            generator=noise_gen,
            lr=settings.lr,
        )
    elif method.kind == "sam":
        opt = SAM(params, torch.optim.SGD, rho=method.value, lr=settings.lr)
    else:
        opt = torch.optim.SGD(params, lr=settings.lr)

    for step in range(1, settings.steps + 1):
        if method.kind == "noise":
            loss = _noisy_gradient(params, closure, method.value, 2 * settings.perturbations, noise_gen)
            opt.step()
        else:
            loss = opt.step(closure)
        if step % settings.shift_every == 0 or step == settings.steps:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{method.name}: the training loss is {float(loss)} at step {step}")
            if method.kind == "os" and step % settings.shift_every == 0:
                shift_last_factor(problem, params, tau=method.value)
    return [p.detach() for p in params]


def _noisy_gradient(params: list[Tensor], closure, sigma: float, draws: int, gen: torch.Generator) -> Tensor:
    """Set p.grad = (1/k) Σ_j ∇L(W + U_j), U_j ~ N(0, σ²I) one-sided; returns the loss at the first draw."""
    total = [torch.zeros_like(p) for p in params]
    first = None
    for _ in range(draws):
        noise = [torch.randn(p.shape, generator=gen).to(p) * sigma for p in params]  # drawn as NSO draws them
        with torch.no_grad():
            for p, u in zip(params, noise, strict=True):
                p.add_(u)
        loss = closure()
        first = loss if first is None else first
        with torch.no_grad():
            for p, u, t in zip(params, noise, total, strict=True):
                p.sub_(u)
                t.add_(p.grad)
    for p, t in zip(params, total, strict=True):
        p.grad = t / draws
    return first
