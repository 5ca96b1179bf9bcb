"""Flatness: Hessian trace (Hutchinson) and top eigenvalues (Lanczos) from Hessian-vector products.

The gradient graph g = ∇L is built once; each Hv = ∇(gᵀv) is one backward pass through it. Several probes
can share one batched backward (`is_grads_batched`) where the model's ops allow it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TraceEstimate:
    value: float
    stderr: float
    probes: int


@contextlib.contextmanager
def gradients_enabled(params: Iterable[Tensor]):
    """Temporarily set requires_grad on `params` (e.g. a frozen EMA copy); restores the flags."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class HessianOperator:
    """v ↦ Hv for the parameters of `loss_fn()` that receive a gradient (the others are skipped)."""

    def __init__(self, loss_fn: Callable[[], Tensor], params: Iterable[Tensor]) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("no parameters with requires_grad=True")
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        kept = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None and g.requires_grad]
        if not kept:
            raise ValueError("the loss has no second-order dependence on the given parameters")
        self.params = [p for p, _ in kept]
        self.grads = [g for _, g in kept]
        self.loss = float(loss.detach())
        self.dim = sum(p.numel() for p in self.params)
        self._batched = True

    def _split(self, flat: Tensor) -> list[Tensor]:
        """(…, dim) → per-parameter views of shape (…, *p.shape)."""
        out, i = [], 0
        for p in self.params:
            out.append(flat[..., i : i + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            i += p.numel()
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """H V for V of shape (k, dim): one batched backward if possible, else k backwards."""
        if self._batched and vs.shape[0] > 1:
            try:
                hv = torch.autograd.grad(
                    self.grads, self.params, self._split(vs), retain_graph=True, is_grads_batched=True
                )
                return torch.cat([h.reshape(vs.shape[0], -1) for h in hv], dim=1)
            except RuntimeError:
                self._batched = False  # an op without a batching rule: fall back to a loop
        rows = []
        for v in vs:
            hv = torch.autograd.grad(self.grads, self.params, self._split(v), retain_graph=True)
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)


def _device_dtype(op: HessianOperator) -> tuple[torch.device, torch.dtype]:
    return op.params[0].device, op.params[0].dtype


def hessian_trace(
    loss_fn: Callable[[], Tensor],
    params: Iterable[Tensor],
    *,
    max_probes: int = 200,
    rtol: float = 1e-2,
    probes_per_pass: int | None = None,
    min_probes: int = 16,
    seed: int = 0,
) -> TraceEstimate:
    """Hutchinson: tr(H) ≈ mean_v vᵀHv over Rademacher v; stops when stderr < rtol·|mean| (after at least
    min_probes) or at max_probes.

    probes_per_pass probes share one batched backward; default 8 on CUDA and 1 on CPU, where batching was
    measured slower (benchmarks/bench_hessian.py).
    """
    op = HessianOperator(loss_fn, params)
    device, dtype = _device_dtype(op)
    if probes_per_pass is None:
        probes_per_pass = 8 if device.type == "cuda" else 1
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[float] = []
    while len(samples) < max_probes:
        k = min(probes_per_pass, max_probes - len(samples))
        v = (torch.randint(0, 2, (k, op.dim), generator=gen) * 2 - 1).to(device=device, dtype=dtype)
        samples += (v * op.matmat(v)).sum(dim=1).tolist()
        estimate = _mean_stderr(samples)
        if len(samples) >= max(min_probes, 2) and estimate.stderr < rtol * abs(estimate.value):
            break
    return _mean_stderr(samples)


def _mean_stderr(samples: list[float]) -> TraceEstimate:
    n = len(samples)
    mean = sum(samples) / n
    stderr = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n) if n > 1 else math.inf
    return TraceEstimate(mean, stderr, n)


def top_eigenvalues(
    loss_fn: Callable[[], Tensor],
    params: Iterable[Tensor],
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """The k largest (algebraic) Hessian eigenvalues, descending, by Lanczos with full reorthogonalisation.

    Ritz values of the Krylov tridiagonal T_j are checked every few steps; iteration stops when the top k
    change by less than tol (relative) or after max_iter Hessian-vector products.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    op = HessianOperator(loss_fn, params)
    device, dtype = _device_dtype(op)
    work = torch.float64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(op.dim, generator=gen, dtype=work).to(device)
    q /= q.norm()
    basis, alphas, betas = [q], [], []
    previous: Tensor | None = None
    steps = min(max_iter, op.dim)
    for j in range(steps):
        w = op.matmat(basis[-1][None].to(dtype))[0].to(work)
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        q_mat = torch.stack(basis)
        w -= q_mat.T @ (q_mat @ w)  # full reorthogonalisation, twice for stability
        w -= q_mat.T @ (q_mat @ w)
        beta = float(w.norm())
        ritz = _ritz(alphas, betas)
        top = ritz[-k:].flip(0)
        done = (
            previous is not None
            and len(top) == len(previous)
            and bool(((top - previous).abs() <= tol * top.abs().clamp_min(1e-12)).all())
        )
        if beta < 1e-10 * max(1.0, abs(alpha)) or j + 1 == steps or (done and len(top) == k):
            return top.tolist()
        previous = top
        betas.append(beta)
        basis.append(w / beta)
    return _ritz(alphas, betas)[-k:].flip(0).tolist()


def _ritz(alphas: list[float], betas: list[float]) -> Tensor:
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)
