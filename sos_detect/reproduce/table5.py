"""Table 5 of the paper (YOLO on VOC with and without SOS) as presets of the A/B harness (reproduce/ab.py).

Arms: the baseline (no SOS), guarded SOS (τ = 1e-4) and the paper's SOS (τ = 0 on b = 32 sampled rows per head
conv: b < every head width of YOLOv5n/s/x, 64–320; b/m = 0.5 on YOLOv5n's 64-wide convs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sos_detect.detect.embedded import EMBEDDED_YAML, REPO_ROOT
from sos_detect.reproduce.ab import run_ab
from sos_detect.reproduce.ab_presets import STUDY_ARMS, ABConfig, with_overrides
from sos_detect.reproduce.paper import table5_map50

# Paper, Table 5: VOC mAP50 (%), baseline → with SOS (the printed table swaps the row labels), from the shipped CSV.
PAPER = table5_map50()
ARMS = {arm: STUDY_ARMS[arm] for arm in ("base", "guarded-1e-4", "paper-b32")}  # the study's arms of these names


def published() -> dict[str, dict[str, float]]:
    """model → arm → published mAP50: the paper's baseline beside `base`, its SOS beside the paper-mode arm."""
    return {model: {"base": base, "paper-b32": sos} for model, (base, sos) in PAPER.items()}


PRESETS = {
    # VOC on a GPU: SGD with Nesterov momentum 0.9 (Ultralytics' SGD is Nesterov), COCO-pretrained starts
    # given with --weights-dir (yolov5su.pt, yolov5xu.pt), all Ultralytics defaults otherwise.
    "paper": ABConfig(
        models=("yolov5s", "yolov5x"),
        data=str(REPO_ROOT / "configs" / "voc.yaml"),
        train=dict(
            epochs=100,
            imgsz=640,
            batch=64,
            optimizer="SGD",
            lr0=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            plots=False,
            sos_images=256,
            sos_every=1,
        ),
        arms=ARMS,
        seeds=(0, 1, 2),
        reference=published(),
        description="Table 5: VOC07 test after fine-tuning COCO-pretrained YOLOv5s/x on VOC07+12 trainval.",
    ),
    # The embedded tree data on CPU: fine-tune the shipped YOLOv5n detector for a few epochs at 320 px.
    "mini": ABConfig(
        models=("yolov5n",),
        data=str(EMBEDDED_YAML),
        train=dict(
            epochs=10,
            imgsz=320,
            batch=8,
            nbs=8,  # every batch an optimizer step (37 images are less than one nominal batch of 64)
            optimizer="SGD",
            lr0=0.005,
            momentum=0.9,
            weight_decay=5e-4,
            warmup_epochs=0,
            device="cpu",
            amp=False,
            workers=0,
            plots=False,
            sos_images=64,
            sos_start=0,
            sos_every=1,
        ),
        arms=ARMS,
        seeds=(0, 1, 2),
        weights={"yolov5n": str(REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt")},
        description="Table 5, mini: the shipped tree detector fine-tuned on the 37 embedded tiles, 9 val tiles.",
    ),
}


def reproduce_table5(
    preset_name: str,
    out: Path,
    *,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    arms: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
) -> list[Path]:
    """Run (or reuse, or resume) every arm, `jobs` side by side; write table5.md, table5.csv and the plots under `out`.

    `overrides`: common training options, plus `data` (a data YAML) and `weights` (model → checkpoint)."""
    overrides = dict(overrides or {})
    cfg = with_overrides(
        PRESETS[preset_name],
        data=overrides.pop("data", None),
        weights=overrides.pop("weights", None),
        models=models,
        seeds=seeds,
        arms=arms,
        options=overrides,
    )
    return run_ab(cfg, out, name="table5", jobs=jobs)
