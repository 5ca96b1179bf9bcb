"""Flatness: Hessian traces and top eigenvalues.

Stochastic, from Hessian-vector products Hv (double backward through a gradient graph built once; measured
faster than forward-over-reverse, benchmarks/bench_hessian.py):
  - Hutchinson: tr(H) ≈ mean of vᵀHv over Rademacher v;
  - Hutch++ (Meyer, Musco, Musco, Woodruff 2021): Q = orth(HS) for a random sketch S, then
    tr(H) = tr(QᵀHQ) + tr((I − QQᵀ)H(I − QQᵀ)), the first exact, the second by Hutchinson;
  - Lanczos: the top eigenvalues.
Exact, in closed form: the block of a linear layer z_r = V a_r (+ b) whose loss is a sum over rows r of functions
of z_r alone (a classifier's last layer under cross-entropy, YOLO's classification convs under BCE):
H_VV = Σ_r (a_r a_rᵀ) ⊗ ∂²ℓ/∂z_r², so diag(H_VV) and tr(H_VV) = Σ_r ‖a_r‖² · tr(∂²ℓ/∂z_r²) follow from one
forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Progress = Callable[[int, int], None]  # progress(HVPs done, HVPs at most); done == at most when finished


@dataclass
class TraceEstimate:
    value: float
    stderr: float  # 0 for an exact value
    probes: int  # Hessian-vector products used (0: closed form)
    samples: list[float] = field(default_factory=list, repr=False)  # the quadratic forms averaged (Hutch++: residual)

    def __add__(self, other: TraceEstimate) -> TraceEstimate:
        """The trace of two diagonal blocks together (independent errors; the samples of both)."""
        return TraceEstimate(
            self.value + other.value,
            math.hypot(self.stderr, other.stderr),
            self.probes + other.probes,
            self.samples + other.samples,
        )


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
    """v ↦ Hv for the parameters of `loss_fn()` that receive a gradient (the others are skipped).

    `block` vectors share one batched backward (`is_grads_batched`); default 8 on CUDA and 1 on CPU, where
    batching was measured slower (benchmarks/bench_hessian.py).
    """

    def __init__(self, loss_fn: Callable[[], Tensor], params: Iterable[Tensor], block: int | None = None) -> None:
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
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        self.block = block or (8 if self.device.type == "cuda" else 1)
        self._batched = True

    def _split(self, flat: Tensor) -> list[Tensor]:
        """(…, dim) → per-parameter views of shape (…, *p.shape)."""
        out, i = [], 0
        for p in self.params:
            out.append(flat[..., i : i + p.numel()].reshape(*flat.shape[:-1], *p.shape))
            i += p.numel()
        return out

    def matmat(self, vs: Tensor) -> Tensor:
        """H V for V of shape (k, dim), in the parameters' dtype: batched backwards of `block` rows if possible."""
        vs = vs.to(device=self.device, dtype=self.dtype)
        if self._batched and vs.shape[0] > 1:
            try:
                return torch.cat([self._batched_hvp(chunk) for chunk in vs.split(self.block)])
            except RuntimeError:
                self._batched = False  # an op without a batching rule: fall back to a loop
        rows = []
        for v in vs:
            hv = torch.autograd.grad(self.grads, self.params, self._split(v), retain_graph=True)
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)

    def _batched_hvp(self, vs: Tensor) -> Tensor:
        if vs.shape[0] == 1:
            hv = torch.autograd.grad(self.grads, self.params, self._split(vs[0]), retain_graph=True)
            return torch.cat([h.reshape(1, -1) for h in hv], dim=1)
        hv = torch.autograd.grad(self.grads, self.params, self._split(vs), retain_graph=True, is_grads_batched=True)
        return torch.cat([h.reshape(vs.shape[0], -1) for h in hv], dim=1)


def rademacher(k: int, dim: int, gen: torch.Generator) -> Tensor:
    """k × dim random signs (float64, on the CPU generator `gen`)."""
    return (torch.randint(0, 2, (k, dim), generator=gen) * 2 - 1).double()


def hutchinson(
    op: HessianOperator,
    *,
    max_probes: int = 200,
    rtol: float = 1e-2,
    min_probes: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceEstimate:
    """tr(H) ≈ mean_v vᵀHv over Rademacher v, ± the standard error of that mean; stops when
    stderr < rtol·|mean| (after at least min_probes) or at max_probes."""
    gen = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    while len(samples) < max_probes:
        v = rademacher(min(op.block, max_probes - len(samples)), op.dim, gen)
        samples += (v * op.matmat(v).double()).sum(dim=1).tolist()
        if progress:
            progress(len(samples), max_probes)
        est = _mean_stderr(samples)
        if len(samples) >= max(min_probes, 2) and est.stderr < rtol * abs(est.value):
            break
    if progress:
        progress(len(samples), len(samples))
    return _mean_stderr(samples)


def hutchpp(
    op: HessianOperator,
    *,
    rank: int = 16,
    max_probes: int = 200,
    rtol: float = 1e-2,
    min_probes: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
) -> TraceEstimate:
    """Hutch++: tr(QᵀHQ) exactly for Q = orth(HS), S Rademacher dim × rank (2·rank HVPs), plus Hutchinson on
    (I − QQᵀ)H(I − QQᵀ) with projected Rademacher probes until the residual's standard error — the estimate's
    only error given Q — is below rtol·|estimate| (after min_probes) or max_probes HVPs in all are spent.
    A budget below 2·rank + min_probes lowers the rank to a third of it, as in the paper."""
    rank = max(1, min(rank, (max_probes - max(min_probes, 2)) // 2, max_probes // 3, op.dim))
    gen = torch.Generator().manual_seed(seed)
    hs = _products(op, rademacher(rank, op.dim, gen), progress, 0, max_probes)
    q = torch.linalg.qr(hs.T).Q.T  # rank × dim, orthonormal rows
    hq = _products(op, q, progress, rank, max_probes)
    exact = float((q * hq).sum())
    used = 2 * rank
    samples: list[float] = []
    while used < max_probes:
        g = rademacher(min(op.block, max_probes - used), op.dim, gen).to(q.device)
        c = g @ q.T  # H(I − QQᵀ)g = Hg − (HQ)(Qᵀg): products with the raw probes, reusable across operators
        samples += ((g - c @ q) * (op.matmat(g).double() - c @ hq)).sum(dim=1).tolist()
        used += g.shape[0]
        if progress:
            progress(used, max_probes)
        rest = _mean_stderr(samples)
        if len(samples) >= max(min_probes, 2) and rest.stderr < rtol * abs(exact + rest.value):
            break
    if progress:
        progress(used, used)
    rest = _mean_stderr(samples) if samples else TraceEstimate(0.0, math.inf, 0)
    return TraceEstimate(exact + rest.value, rest.stderr, used, samples)


def _products(op: HessianOperator, vs: Tensor, progress: Progress | None, done: int, total: int) -> Tensor:
    """H V in float64, `op.block` rows at a time, reporting progress."""
    out = []
    for chunk in vs.split(op.block):
        out.append(op.matmat(chunk).double())
        done += len(chunk)
        if progress:
            progress(done, total)
    return torch.cat(out)


def _mean_stderr(samples: list[float]) -> TraceEstimate:
    n = len(samples)
    mean = sum(samples) / n
    stderr = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n) if n > 1 else math.inf
    return TraceEstimate(mean, stderr, n, samples)


def top_eigenvalues(
    op: HessianOperator,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[float]:
    """The k largest (algebraic) Hessian eigenvalues, descending, by Lanczos with full reorthogonalisation.

    Ritz values of the Krylov tridiagonal T_j are checked every step; iteration stops when the top k
    change by less than tol (relative) or after max_iter Hessian-vector products.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    work = torch.float64
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(op.dim, generator=gen, dtype=work).to(op.device)
    q /= q.norm()
    basis, alphas, betas = [q], [], []
    previous: Tensor | None = None
    steps = min(max_iter, op.dim)
    for j in range(steps):
        w = op.matmat(basis[-1][None])[0].to(work)
        if progress:
            progress(j + 1, steps)
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        q_mat = torch.stack(basis)
        w -= q_mat.T @ (q_mat @ w)  # full reorthogonalisation, twice for stability
        w -= q_mat.T @ (q_mat @ w)
        beta = float(w.norm())
        top = _ritz(alphas, betas)[-k:].flip(0)
        done = (
            previous is not None
            and len(top) == len(previous) == k
            and bool(((top - previous).abs() <= tol * top.abs().clamp_min(1e-12)).all())
        )
        if beta < 1e-10 * max(1.0, abs(alpha)) or j + 1 == steps or done:
            break
        previous = top
        betas.append(beta)
        basis.append(w / beta)
    if progress:
        progress(len(alphas), len(alphas))
    return top.tolist()


def _ritz(alphas: list[float], betas: list[float]) -> Tensor:
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)


def linear_block_diagonal(features: Tensor, curvature: Tensor, *, bias: bool = False) -> Tensor:
    """Exact diagonal of the Hessian block H_VV of a linear layer z_r = V a_r (+ b), as (outputs, inputs [+ 1 for
    the bias]): H[(k,i),(k,i)] = Σ_r c_rk · a_ri², for rows a_r (features, rows × inputs) and the loss's output
    curvature c_rk = ∂²ℓ/∂z_rk² (curvature, rows × outputs), in float64.

    Holds when the loss is a sum over rows of functions of z_r alone (no cross-row curvature) and the layer's
    outputs feed nothing but the loss; its sum is tr(H_VV) = Σ_r ‖a_r‖² · tr(∂²ℓ/∂z_r²)."""
    a = features.detach().reshape(-1, features.shape[-1]).double()
    c = curvature.detach().reshape(-1, curvature.shape[-1]).double().to(a.device)
    if a.shape[0] != c.shape[0]:
        raise ValueError(f"{a.shape[0]} feature rows but {c.shape[0]} curvature rows")
    diag = c.T @ a.square()
    return torch.cat([diag, c.sum(dim=0)[:, None]], dim=1) if bias else diag


def softmax_cross_entropy_curvature(logits: Tensor, scale: float = 1.0) -> Tensor:
    """Diagonal of ∂²ℓ/∂z_r² per row r for ℓ = scale · Σ_r CE(z_r, y_r): scale · p(1 − p), p = softmax(z_r).

    The Hessian scale · (diag(p) − ppᵀ) does not depend on the label (nor on label smoothing); use scale = 1/rows
    for the mean reduction."""
    p = logits.detach().double().softmax(dim=-1)
    return scale * p * (1 - p)


def bce_curvature(logits: Tensor, scale: float = 1.0) -> Tensor:
    """Elementwise ∂²ℓ/∂z² of ℓ = scale · BCE-with-logits(z, t): scale · σ(z)(1 − σ(z)), whatever the target t."""
    s = logits.detach().double().sigmoid()
    return scale * s * (1 - s)
