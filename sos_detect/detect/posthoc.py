"""Post-hoc optimum shifting of a saved Ultralytics detector checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sos_detect.core.options import ShiftConfig
from sos_detect.core.record import ShiftReport
from sos_detect.core.runs import save_atomic
from sos_detect.detect.checkpoints import load_detector
from sos_detect.detect.detector_shift import build_capture_set, shift_detector


def working_copy(stored: torch.nn.Module, device: torch.device, **overrides: Any) -> torch.nn.Module:
    """A float32 copy of a stored detector on `device` whose `args` (loss hyper-parameters, imgsz, …) are
    Ultralytics' defaults updated by the stored args and `overrides`, with the task of its head (its capture set then
    carries the task's labels: masks, keypoints, angles)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    from sos_detect.detect.heads import detect_head, head_task

    model = copy.deepcopy(stored).float().to(device)
    saved = getattr(model, "args", {}) or {}
    saved = saved if isinstance(saved, dict) else vars(saved)
    merged = {k: v for k, v in saved.items() if k in DEFAULT_CFG_DICT}
    model.args = get_cfg(
        DEFAULT_CFG_DICT, {**merged, **overrides, "task": head_task(detect_head(model)), "mode": "train"}
    )
    model.criterion = None
    return model


def capture_set_for(model: torch.nn.Module, data: dict[str, Any]):
    """The capture set over data['train'] at the model's args.imgsz."""
    return build_capture_set(model.args, data, max(int(model.stride.max()), 32), model.args.batch)


def shift_checkpoint(
    weights: str | Path | dict[str, Any],
    data: dict[str, Any],
    out: str | Path,
    config: ShiftConfig | None = None,
    *,
    imgsz: int = 640,
    batch: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[dict[str, ShiftReport], Path | None]:
    """Shift the stored network(s) of `weights` (a path, or the checkpoint dict `load_detector` returned) on
    config.images letterboxed training images each and write `out` atomically (only if every shift applied);
    `config` defaults to the option table's.

    Returns the reports per stored network ('ema' and/or 'model') and the written path (None when a
    shift was rolled back, in which case nothing is written).
    """
    ckpt = weights if isinstance(weights, dict) else load_detector(weights)
    config = config or ShiftConfig()
    device = torch.device(device)
    out = Path(out)
    new = dict(ckpt)
    reports: dict[str, ShiftReport] = {}
    capture = None
    for key in ("ema", "model"):
        stored = ckpt.get(key)
        if not isinstance(stored, torch.nn.Module):
            continue
        model = working_copy(stored, device, imgsz=imgsz, batch=batch)
        capture = capture or capture_set_for(model, data)
        reports[key] = shift_detector(model, capture.sample(config.images, seed), config, device=device, seed=seed)
        model.args = dict(vars(model.args))
        model.criterion = None
        new[key] = model.cpu().half()
    if not all(r.applied for r in reports.values()):
        return reports, None
    new["optimizer"] = None  # first moments belong to pre-shift weights; a shifted checkpoint is final
    new["sos_shift"] = {k: r.to_dict() for k, r in reports.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(new, out)
    return reports, out
