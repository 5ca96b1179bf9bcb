"""A YOLO detector's heads as shift targets: the capture set of letterboxed images, the forward pass on them, the
detection loss, a detector's shift on its own eval pass, and output changes on images a shift was not solved on."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sos_detect.core.apply import distributed, shift_model
from sos_detect.core.capture import GramCapture, as_v, eval_capture, eval_mode
from sos_detect.core.options import ShiftConfig
from sos_detect.core.record import ShiftReport
from sos_detect.core.solver import output_change
from sos_detect.detect.heads import detect_head_layers


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
    dtype = next(model.parameters()).dtype
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            b["img"] = b["img"].to(dtype) / 255
            loss, _ = model.loss(b)
            total = total + loss.sum()
            count += b["img"].shape[0]
    return total / max(count, 1)


def detection_loss(batches: list[dict[str, Any]], device: torch.device):
    """loss_fn(model) -> float: `detection_loss_tensor` without a graph."""

    def loss_fn(model: nn.Module) -> float:
        with torch.no_grad():
            return float(detection_loss_tensor(model, batches, device))

    return loss_fn


def shift_detector(
    model: nn.Module,
    batches: list[dict[str, Any]],
    config: ShiftConfig,
    *,
    device: torch.device,
    exclude: Collection[str] = (),
    optimizer: torch.optim.Optimizer | None = None,
    measure_loss: bool = False,
    seed: int = 0,
) -> ShiftReport:
    """Shift the head convs config.heads of one detector (a training model or its EMA) on its eval pass over the
    capture batches (`shift_model`; under torch.distributed every rank ends with rank 0's tensors).

    The capture-set loss is measured before and after when `measure_loss` or config.loss_tol is set; layers named in
    `exclude` (frozen ones) are not shifted.
    """
    layers = detect_head_layers(model, config.heads, exclude)
    if not distributed() or dist.get_rank() == 0:  # Ultralytics' progress bar over the capture pass
        from ultralytics.utils import TQDM

        batches = TQDM(batches, desc="SOS capture", total=len(batches), leave=False)
    measure = measure_loss or config.loss_tol is not None
    return shift_model(
        model,
        layers,
        batches,
        config,
        forward=images_forward(device),
        optimizer=optimizer,
        loss_fn=detection_loss(batches, device) if measure else None,
        seed=seed,
    )


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
        seen = {n: acc.gram for n, acc in self.capture.full.items() if acc.rows}
        changes = layer_changes({n: self.layers[n] for n in seen}, seen, self.before)
        return max(changes.values()) if changes else math.nan


def layer_inputs(model: nn.Module, layers: Mapping[str, nn.Module], batches: list[dict[str, Any]], device) -> dict:
    """name → Gram of the layer's inputs over one eval pass of `batches` (rows the shift was not solved on)."""
    return {n: acc.gram for n, acc in eval_capture(model, layers, batches, forward=images_forward(device)).full.items()}


def layer_changes(
    layers: Mapping[str, nn.Module], grams: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """name → ‖A(V'−V)‖/‖AV‖ on the rows of `grams`, V the weights `before`, V' the layer's weights now."""
    return {n: output_change(grams[n], before[n], as_v(layer.weight.detach())) for n, layer in layers.items()}
