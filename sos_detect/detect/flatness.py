"""Flatness of a detector: Hessian traces and top eigenvalues of its detection loss on training images.

The trace of a parameter set is the sum of its diagonal blocks' traces, so it is measured block by block:
the head's classification convs (cv3[i][-1]) exactly in closed form, its box convs (cv2[i][-1]) exactly from the
loss's curvature in output space, everything else by Hutch++ with its standard error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sos_detect.core.hessian import (
    HessianOperator,
    Progress,
    TraceEstimate,
    bce_curvature,
    gradients_enabled,
    hutchpp,
    linear_block_diagonal,
    top_eigenvalues,
)
from sos_detect.detect.detector_shift import detection_loss_tensor
from sos_detect.detect.heads import detect_head_layers, detection_model


@dataclass
class Flatness:
    loss: float
    traces: dict[str, TraceEstimate]  # cls (exact), box, head = cls + box, all (whole model, if measured)
    eigenvalues: list[float]


def detector_params(model: nn.Module, which: str) -> list[torch.Tensor]:
    """'head': the head output-conv weights; 'all': every parameter."""
    if which == "head":
        return [m.weight for m in detect_head_layers(model).values()]
    if which == "all":
        return list(model.parameters())
    raise ValueError(f"--params must be 'head' or 'all', got {which!r}")


def progress_bar(desc: str, delay: float = 3.0) -> Progress:
    """A progress callback that opens Ultralytics' TQDM once an estimate has run for `delay` seconds."""
    from ultralytics.utils import TQDM

    start, bar = time.perf_counter(), None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and done < total and time.perf_counter() - start >= delay:
            bar = TQDM(total=total, desc=desc, initial=done, unit="HVP")
        elif bar is not None and not bar.closed:
            bar.total = total
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

    return update


def _v8_criterion(det: nn.Module):
    """The model's (lazily built) criterion if it is Ultralytics' v8DetectionLoss, else None."""
    from ultralytics.utils.loss import v8DetectionLoss

    det.criterion = getattr(det, "criterion", None) or det.init_criterion()
    return det.criterion if type(det.criterion) is v8DetectionLoss else None


def cls_head_diagonal(
    model: nn.Module, batches: list[dict[str, Any]], device: torch.device
) -> list[torch.Tensor] | None:
    """Exact diagonal of the Hessian block of each classification head conv weight (cv3[i][-1], as nc × inputs)
    under the per-image loss of `detection_loss_tensor`, in closed form; None unless the criterion is v8DetectionLoss.

    Per batch of B images (N in all), v8DetectionLoss adds B/N · hyp.cls · Σ w_k BCE(z, t)/max(Σt, 1) over anchors
    and classes k (class weights w, 1 by default). The targets t come from the task-aligned assigner, which reads the
    scores detached and under no_grad, and the box/DFL losses use t only as weights: with the assignment held fixed,
    as autograd's Hessian holds it, the loss is a separable sum over the logits z, and
    ∂²L/∂z_k² = B·hyp.cls·w_k·σ(z_k)(1 − σ(z_k))/(N·max(Σt, 1)).
    """
    det = detection_model(model)
    criterion = _v8_criterion(det)
    if criterion is None:
        return None
    layers = detect_head_layers(det, "cls")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    scores: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for m in layers.values()]
    hooks.append(criterion.assigner.register_forward_hook(lambda m, i, o: scores.append(o[2])))
    try:
        with torch.no_grad():
            detection_loss_tensor(det, batches, device)
    finally:
        for h in hooks:
            h.remove()
    n_images = sum(len(b["img"]) for b in batches)
    weights = criterion.class_weights
    diagonals = [0.0] * len(layers)
    for j, target_scores in enumerate(scores):
        scale = float(criterion.hyp.cls) / n_images / float(target_scores.sum().clamp(min=1))
        for level, (feats, logits) in enumerate(seen[j * len(layers) : (j + 1) * len(layers)]):
            curv = bce_curvature(logits.movedim(1, -1), scale * feats.shape[0])  # × B: the criterion's batch factor
            if weights is not None:
                curv = curv * weights.reshape(-1).to(curv)
            diagonals[level] = diagonals[level] + linear_block_diagonal(feats.movedim(1, -1), curv)
    return diagonals


def output_space_diagonal(
    model: nn.Module, batches: list[dict[str, Any]], device: torch.device, kind: str = "box"
) -> list[torch.Tensor] | None:
    """Exact diagonal of the Hessian block of each `kind` head conv weight (outputs × inputs) from the loss's
    curvature in output space; None unless the criterion is v8DetectionLoss.

    Each anchor's loss depends only on that anchor's outputs z_r of the conv (box: CIoU of the decoded box and DFL,
    weighted by the detached target scores; cls: BCE), so ∂²L/∂z² is block-diagonal over anchors and its diagonal
    comes from one output-space HVP per channel j with the probe e_j at every anchor at once: 4·reg_max (box) or
    nc (cls) cheap HVPs through the loss alone, then H[(j,i),(j,i)] = Σ_r ∂²L/∂z_rj² · a_ri².
    """
    det = detection_model(model)
    if _v8_criterion(det) is None:
        return None
    feats: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        feats.append(inputs[0].detach())
        outs.append(output.detach().requires_grad_(True))  # the loss graph starts here
        return outs[-1]

    hooks = [m.register_forward_hook(capture) for m in detect_head_layers(det, kind).values()]
    try:
        with torch.enable_grad():
            loss = detection_loss_tensor(det, batches, device)
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, outs, create_graph=True, allow_unused=True, materialize_grads=True)
    curvature = [torch.zeros_like(z, dtype=torch.float64) for z in outs]  # ∂²L/∂z_rj², (B, C, H, W)
    channels = outs[0].shape[1] if any(g.requires_grad for g in grads) else 0  # 0: the loss is linear in z
    for j in range(channels):
        probe = [torch.zeros_like(z).index_fill_(1, torch.tensor([j], device=z.device), 1.0) for z in outs]
        hv = torch.autograd.grad(grads, outs, probe, retain_graph=True, allow_unused=True, materialize_grads=True)
        for c, h in zip(curvature, hv, strict=True):
            c[:, j] = h[:, j].detach()
    n_levels = len(outs) // len(batches)
    diagonals = [0.0] * n_levels
    for i, (f, c) in enumerate(zip(feats, curvature, strict=True)):
        diagonals[i % n_levels] = diagonals[i % n_levels] + linear_block_diagonal(f.movedim(1, -1), c.movedim(1, -1))
    return diagonals


def exact_trace(diagonals: list[torch.Tensor] | None) -> TraceEstimate | None:
    """The trace of blocks from their exact diagonals (stderr 0, no HVPs)."""
    return None if diagonals is None else TraceEstimate(float(sum(d.sum() for d in diagonals)), 0.0, 0)


def detector_traces(
    model: nn.Module,
    batches: list[dict[str, Any]],
    device: torch.device,
    *,
    whole: bool = True,
    max_probes: int = 64,
    rtol: float = 1e-2,
    rank: int = 16,
    seed: int = 0,
) -> dict[str, TraceEstimate]:
    """Traces of the Hessian blocks of the loss (eval mode): 'cls' and 'box' head convs, 'head' = both, and with
    `whole` 'all' = the head plus every other parameter. The head blocks are exact (`cls_head_diagonal`,
    `output_space_diagonal`) where the criterion allows, else Hutch++ like the rest, each ± its standard error."""
    loss_fn = lambda: detection_loss_tensor(model, batches, device)  # noqa: E731

    def estimate(params: list[torch.Tensor], what: str) -> TraceEstimate:
        with gradients_enabled(params):
            op = HessianOperator(loss_fn, params)
            return hutchpp(op, rank=rank, max_probes=max_probes, rtol=rtol, seed=seed, progress=progress_bar(what))

    head = {k: [m.weight for m in detect_head_layers(model, k).values()] for k in ("cls", "box")}
    exact = {
        "cls": exact_trace(cls_head_diagonal(model, batches, device)),
        "box": exact_trace(output_space_diagonal(model, batches, device, "box")),
    }
    traces = {k: est or estimate(head[k], f"Hessian trace, {k} head") for k, est in exact.items()}
    traces["head"] = traces["cls"] + traces["box"]
    if whole:
        known = [w for k, est in exact.items() if est is not None for w in head[k]]
        rest = [p for p in model.parameters() if not any(p is w for w in known)]
        traces["all"] = sum((est for est in exact.values() if est), estimate(rest, "Hessian trace, whole model"))
    return traces


def measure_flatness(
    model: nn.Module,
    batches: list[dict[str, Any]],
    device: torch.device,
    *,
    which: str = "head",
    k: int = 3,
    probes: int = 64,
    max_iter: int = 50,
    seed: int = 0,
) -> Flatness:
    """Loss, block traces (head blocks exact; with which='all' the whole model ± stderr) and the top-k
    eigenvalues of the `which` parameters' Hessian, on the per-image detection loss (eval mode)."""
    params = detector_params(model, which)
    loss_fn = lambda: detection_loss_tensor(model, batches, device)  # noqa: E731
    traces = detector_traces(model, batches, device, whole=which == "all", max_probes=probes, seed=seed)
    with gradients_enabled(params):
        op = HessianOperator(loss_fn, params)
        eigs = top_eigenvalues(op, k=k, max_iter=max_iter, tol=1e-3, seed=seed, progress=progress_bar("eigenvalues"))
    return Flatness(op.loss, traces, eigs)
