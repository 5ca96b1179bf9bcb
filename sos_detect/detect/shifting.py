"""Optimum shifting of a YOLO detector's heads: the capture set, the detection loss, DDP agreement."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sos_detect.detect.heads import detect_head_layers
from sos_detect.layers import (
    GramCapture,
    ShiftReport,
    as_v,
    eval_capture,
    first_moment_tensors,
    shift_layers,
    shift_model,
)
from sos_detect.shift import GramAccumulator, output_change


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Run a block without moving the global random generators (Python, NumPy, torch) that training draws its
    augmentation from: building and reading the capture set draws from them, and a rolled-back shift must leave the
    run bit-identical to one without SOS."""
    state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()  # noqa: NPY002
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])  # noqa: NPY002
        torch.random.set_rng_state(state[2])


class CaptureSet:
    """Training images letterboxed at imgsz without augmentation; a fresh seeded sample per shift.

    `dataset` is an Ultralytics YOLODataset built with augment=False, rect=False (LetterBox only).
    """

    def __init__(self, dataset: Any, batch_size: int = 16) -> None:
        if len(dataset) == 0:
            raise ValueError("the capture set has no images")
        self.dataset = dataset
        self.batch_size = max(1, int(batch_size))

    def sample(self, n_images: int, seed: int, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
        """Collated batches of `n_images` images drawn without replacement; this rank's share under DDP."""
        n = min(int(n_images), len(self.dataset))
        idx = np.random.default_rng(seed).choice(len(self.dataset), size=n, replace=False)[rank::world_size]
        with rng_kept():
            items = [self.dataset[int(i)] for i in sorted(idx)]
        return [self.dataset.collate_fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)]


def build_capture_set(args: Any, data: dict, stride: int, batch_size: int, split: str = "train") -> CaptureSet:
    """The capture set over data[split] at args.imgsz (val-mode transforms: LetterBox only)."""
    from ultralytics.data import build_yolo_dataset

    with rng_kept():
        dataset = build_yolo_dataset(args, data[split], batch_size, data, mode="val", rect=False, stride=stride)
    return CaptureSet(dataset, batch_size)


def images_forward(device: torch.device):
    """forward(model, batch) on the batch's uint8 images scaled to [0, 1] on `device`."""

    def forward(model: nn.Module, batch: dict[str, Any]) -> Any:
        return model(batch["img"].to(device).float() / 255)

    return forward


def detection_loss_tensor(model: nn.Module, batches: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """The Ultralytics detection loss per image over `batches` as a differentiable tensor.

    The model is run in eval mode (BatchNorm statistics fixed, as for a Hessian); modes are restored. Images are
    scaled to [0, 1] in the model's dtype (float64 for exact checks).
    """
    modes = {m: m.training for m in model.modules()}
    dtype = next(model.parameters()).dtype
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in batches:
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            b["img"] = b["img"].to(dtype) / 255
            loss, _ = model.loss(b)
            total = total + loss.sum()
            count += b["img"].shape[0]
    finally:
        for m, training in modes.items():
            m.training = training
    return total / max(count, 1)


def detection_loss(batches: list[dict[str, Any]], device: torch.device):
    """loss_fn(model) -> float: `detection_loss_tensor` without a graph."""

    def loss_fn(model: nn.Module) -> float:
        with torch.no_grad():
            return float(detection_loss_tensor(model, batches, device))

    return loss_fn


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_grams(grams: Mapping[str, GramAccumulator]) -> None:
    """Sum every Gram and row count over all processes (G is a sum over rows)."""
    for acc in grams.values():
        gram = acc.gram.clone()
        rows = torch.tensor([float(acc.rows)], dtype=torch.float64, device=gram.device)
        dist.all_reduce(gram)
        dist.all_reduce(rows)
        acc.gram, acc.rows = gram, int(rows.item())


def broadcast_shifted(layers: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """Make every rank hold rank 0's shifted weights and first-moment buffers, bit for bit."""
    with torch.no_grad():
        for layer in layers.values():
            dist.broadcast(layer.weight.data, src=0)
            if optimizer is not None:
                for buf in first_moment_tensors(optimizer, layer.weight).values():
                    dist.broadcast(buf, src=0)


def shift_detector(
    model: nn.Module,
    batches: list[dict[str, Any]],
    *,
    device: torch.device,
    heads: str = "box,cls",
    exclude: Collection[str] = (),
    mode: str = "guarded",
    tau: float = 1e-4,
    rows: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_tol: float | None = None,
    max_change: float | None = None,
    measure_loss: bool = False,
    seed: int = 0,
) -> ShiftReport:
    """Shift the head convs of one detector (a training model or its EMA) on the capture batches (eval passes).

    The capture-set loss is measured before and after when `measure_loss` or `loss_tol` is set; layers named in
    `exclude` (frozen ones) are not shifted.
    Under torch.distributed the Grams are all-reduced before solving and rank 0's result is broadcast,
    so all ranks end with identical tensors.
    """
    layers = detect_head_layers(model, heads, exclude)
    ddp = _ddp()
    if ddp and rows:
        rows = math.ceil(rows / dist.get_world_size())  # each rank samples its share of the b rows
    if not ddp or dist.get_rank() == 0:  # Ultralytics' progress bar over the capture pass
        from ultralytics.utils import TQDM

        batches = TQDM(batches, desc="SOS capture", total=len(batches), leave=False)
    report = shift_model(
        model,
        layers,
        batches,
        mode=mode,
        tau=tau,
        rows=rows,
        forward=images_forward(device),
        optimizer=optimizer,
        loss_fn=detection_loss(batches, device) if measure_loss or loss_tol is not None else None,
        loss_tol=loss_tol,
        max_change=max_change,
        seed=seed,
        sync=all_reduce_grams if ddp else None,
    )
    if ddp:
        broadcast_shifted(layers, optimizer)
    return report


def shift_from_training(
    capture: GramCapture,
    targets: Mapping[str, tuple[nn.Module, torch.optim.Optimizer | None]],
    *,
    heads: str = "box,cls",
    exclude: Collection[str] = (),
    mode: str = "guarded",
    tau: float = 1e-4,
    max_change: float | None = None,
    loss_fn=None,
    loss_tol: float | None = None,
) -> dict[str, ShiftReport]:
    """Shift every target's head convs (a training model and its EMA) on the Grams its training passes captured.

    Each target gets its own minimum-norm V' under the same rows A (min ‖V'‖ s.t. ‖A(V'−V)‖ ≤ τ‖AV‖ for its own
    V); one eigendecomposition per layer serves all of them. Under torch.distributed the Grams are summed over
    ranks first and rank 0's tensors broadcast after, so all ranks end identical.
    """
    grams = capture.grams()
    if _ddp():
        all_reduce_grams(grams)
        if grams is not capture.full:
            all_reduce_grams(capture.full)
    spectra: dict = {}
    reports = {}
    for name, (model, optimizer) in targets.items():
        start = time.perf_counter()
        layers = detect_head_layers(model, heads, exclude)
        reports[name] = shift_layers(
            layers,
            grams,
            mode=mode,
            tau=tau,
            full=capture.full,
            spectra=spectra,
            optimizer=optimizer,
            loss_fn=loss_fn,
            model=model,
            loss_tol=loss_tol,
            max_change=max_change,
        )
        if _ddp():
            broadcast_shifted(layers, optimizer)
        reports[name].seconds = time.perf_counter() - start
    return reports


class HeldOutChange:
    """The output change of a shift on images it was not solved on: the Grams of the shifted head convs' next
    forward passes (e.g. a validation pass) over at most `images` images, against the weights before the shift."""

    def __init__(self, layers: Mapping[str, nn.Module], before: Mapping[str, torch.Tensor], images: int) -> None:
        self.layers, self.before = dict(layers), dict(before)
        self.capture = GramCapture(self.layers, skip_nonfinite=True, max_images=images)

    def start(self) -> None:
        self.capture.start()

    def finish(self) -> float:
        """max over layers of ‖A(V'−V)‖/‖AV‖ on the rows seen; NaN if no forward pass ran."""
        self.capture.stop()
        changes = [
            output_change(self.capture.full[n].gram, self.before[n], as_v(layer.weight.detach()))
            for n, layer in self.layers.items()
            if self.capture.full[n].rows
        ]
        return max(changes) if changes else math.nan


def layer_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batches: list[dict[str, Any]], device) -> dict:
    """name → Gram of the layer's inputs over one eval pass of `batches` (rows the shift was not solved on)."""
    return {n: acc.gram for n, acc in eval_capture(model, layers, batches, forward=images_forward(device)).full.items()}


def layer_changes(
    layers: Mapping[str, nn.Module], grams: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """name → ‖A(V'−V)‖/‖AV‖ on the rows of `grams`, V the weights `before`, V' the layer's weights now."""
    return {n: output_change(grams[n], before[n], as_v(layer.weight.detach())) for n, layer in layers.items()}
