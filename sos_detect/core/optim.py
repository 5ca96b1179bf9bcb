"""Flat-minimum optimisers wrapping a base optimiser: SAM/ASAM (Foret et al. 2021; Kwon et al. 2021) and
NSO (Li, Ju, Zhang 2024). Both take a closure that zeroes gradients, runs forward + backward, returns the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm running statistics are not updated inside (momentum 0): extra passes at perturbed weights."""
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum


class SAM(torch.optim.Optimizer):
    """w ← w − lr·∇L(w + ε), ε = ρ·g/‖g‖ (ASAM: ε = ρ·T²g/‖Tg‖ with T = |w|)."""

    def __init__(
        self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, adaptive: bool = False, **kwargs
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        """Move to w + ε (ε kept in the state)."""
        norm = torch.norm(
            torch.stack(
                [
                    ((p.abs() if g["adaptive"] else 1.0) * p.grad).norm()
                    for g in self.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
            )
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = (p.square() if group["adaptive"] else 1.0) * p.grad * scale
                p.add_(e)
                self.state[p]["e_w"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to w, then the base step with the gradient taken at w + ε."""
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    p.sub_(self.state[p].pop("e_w"))
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        loss = closure()
        self.first_step()
        with frozen_batchnorm_stats(model) if model is not None else contextlib.nullcontext():
            closure()
        self.second_step()
        return loss


class NSO(torch.optim.Optimizer):
    """Noise stability: the base step uses (1/2n)·Σ_i [∇L(w + U_i) + ∇L(w − U_i)], U_i ~ N(0, σ²I)."""

    def __init__(
        self,
        params,
        base_optimizer: type[torch.optim.Optimizer],
        sigma: float = 0.01,
        num_perturbations: int = 1,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        if sigma < 0 or num_perturbations < 1:
            raise ValueError(f"need sigma >= 0 and num_perturbations >= 1, got {sigma}, {num_perturbations}")
        super().__init__(params, dict(sigma=sigma, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.n = num_perturbations
        self.generator = generator or torch.Generator().manual_seed(0)

    def step(self, closure: Callable[[], torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        sigmas = [g["sigma"] for g in self.param_groups for p in g["params"] if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        first_loss = None
        for i in range(self.n):
            noise = [
                torch.randn(p.shape, generator=self.generator).to(p) * s for p, s in zip(params, sigmas, strict=True)
            ]
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, u in zip(params, noise, strict=True):
                        p.add_(sign * u)
                first = i == 0 and sign > 0
                with contextlib.nullcontext() if first or model is None else frozen_batchnorm_stats(model):
                    loss = closure()
                first_loss = loss if first else first_loss
                with torch.no_grad():
                    for p, u, t in zip(params, noise, total, strict=True):
                        p.sub_(sign * u)
                        if p.grad is not None:
                            t.add_(p.grad)
        with torch.no_grad():
            for p, t in zip(params, total, strict=True):
                p.grad = t / (2 * self.n)
        self.base_optimizer.step()
        return first_loss
