"""Detector checkpoints: what a stored network is (a YOLO model of a Detect task, a YOLO classifier, another
network), a Detect head that fits its class count, and the one loader of detector checkpoints every command uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sos_detect.core.checkpoints import (
    CLASSIFIER,
    DETECTOR,
    OTHER,
    Checkpoint,
    CheckpointError,
    check_finite,
    check_optimizer_state,
    read_checkpoint,
)
from sos_detect.detect.heads import detect_head, detect_head_layers, head_task


def network_kind(net: nn.Module) -> tuple[str, str]:
    """(kind, the kind in words) of a stored network: a YOLO model with a Detect head, a YOLO classifier, other."""
    try:
        task = head_task(detect_head(net))
        nc = int(getattr(net, "nc", 0) or len(getattr(net, "names", {}) or {}))
        what = "detector" if task == "detect" else f"{task} model"
        return DETECTOR, f"a YOLO {what} checkpoint ({type(net).__name__}, {nc} class{'es' * (nc != 1)})"
    except TypeError:
        pass
    if type(net).__name__ == "ClassificationModel":
        return (
            CLASSIFIER,
            "a YOLO classification checkpoint (ClassificationModel), not a detector (classifiers: sos-detect classify)",
        )
    return OTHER, f"a checkpoint of a {type(net).__name__} network, not a YOLO detector"


def check_head_shapes(ckpt: Checkpoint) -> None:
    """Every stored network's Detect head fits its class count: each cls output conv has nc outputs and each box
    conv 4·reg_max (a mismatch fails deep inside val/shift with a shape error)."""
    for where, net in ckpt.networks().items():
        head = detect_head(net)
        nc, reg_max = int(getattr(head, "nc", 0)), int(getattr(head, "reg_max", 16))
        try:
            layers = detect_head_layers(net)
        except TypeError as err:
            raise ckpt.error(f"{where} Detect head: {err}") from None
        names = getattr(net, "names", None)
        if names is not None and len(names) != nc:
            raise ckpt.error(f"{where} Detect head predicts {nc} classes but the network names {len(names)}")
        for key, conv in layers.items():
            want = nc if "cls" in key else 4 * reg_max
            if conv.out_channels != want:
                kind = f"nc = {nc} classes" if "cls" in key else f"4 × reg_max = {want} box outputs"
                raise ckpt.error(
                    f"{where} Detect head: {key} conv has {conv.out_channels} outputs, but the head has {kind}"
                )


def load_detector(path: str | Path, flag: str = "--weights", *, resume: bool = False) -> dict[str, Any]:
    """An Ultralytics detector checkpoint dict with finite weights and a head that fits its class count (with
    `resume`, a finite optimizer state too); anything else is refused in one line."""
    ckpt = read_checkpoint(path, flag, network_kind=network_kind)
    if ckpt.kind != DETECTOR:
        raise ckpt.error(f"{ckpt.what}; a YOLO detection checkpoint (Ultralytics' last.pt/best.pt) is needed")
    check_finite(ckpt)
    check_head_shapes(ckpt)
    if resume:
        check_optimizer_state(ckpt)
    return ckpt.content


def detector_classes(ckpt: dict[str, Any]) -> dict[int, str]:
    """Class names of a detector checkpoint, {index: name}."""
    net = ckpt.get("ema") or ckpt["model"]
    names = getattr(net, "names", None) or {}
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    nc = int(getattr(net, "nc", 0) or len(names))
    return {i: names.get(i, f"class_{i}") for i in range(nc)}


def check_class_count(ckpt: dict[str, Any], data: dict[str, Any], weights: str, data_name: str) -> None:
    """The data must have as many classes as the detector predicts (Ultralytics would fail deep inside)."""
    classes = detector_classes(ckpt)
    if int(data["nc"]) != len(classes):
        shown = ", ".join(list(classes.values())[:3]) + (", …" if len(classes) > 3 else "")
        raise CheckpointError(
            f"{data_name}: {data['nc']} classes, but {weights} predicts {len(classes)} ({shown}); "
            "pass the data the checkpoint was trained on"
        )
