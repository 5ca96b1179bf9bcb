"""Flatness of a detector: Hessian trace and top eigenvalues of its detection loss on training images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sos_detect.detect.heads import detect_head_layers
from sos_detect.detect.shifting import detection_loss_tensor
from sos_detect.hessian import TraceEstimate, gradients_enabled, hessian_trace, top_eigenvalues


@dataclass
class Flatness:
    loss: float
    trace: TraceEstimate
    eigenvalues: list[float]


def detector_params(model: nn.Module, which: str) -> list[torch.Tensor]:
    """'head': the head output-conv weights; 'all': every parameter."""
    if which == "head":
        return [m.weight for m in detect_head_layers(model).values()]
    if which == "all":
        return list(model.parameters())
    raise ValueError(f"--params must be 'head' or 'all', got {which!r}")


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
    """Loss, Hutchinson trace (± stderr) and top-k eigenvalues of the per-image detection loss (eval mode)."""
    params = detector_params(model, which)
    loss_fn = lambda: detection_loss_tensor(model, batches, device)  # noqa: E731
    with gradients_enabled(params):
        trace = hessian_trace(loss_fn, params, max_probes=probes, rtol=1e-2, seed=seed)
        eigs = top_eigenvalues(loss_fn, params, k=k, max_iter=max_iter, tol=1e-3, seed=seed)
        with torch.no_grad():
            loss = float(loss_fn())
    return Flatness(loss, trace, eigs)
