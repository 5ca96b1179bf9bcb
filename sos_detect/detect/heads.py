"""Discovery of the 1×1 output convolutions of Ultralytics Detect heads (the layers SOS shifts), and which
models have such a head.

Every task whose head subclasses Detect — detect, segment, pose, OBB, and the one-to-one (end-to-end) copies of
v10/YOLO26 — computes its box regression (`cv2[i][-1]`) and class scores (`cv3[i][-1]`) with 1×1 convs over the
positions of level i; segment, pose and OBB heads add one more 1×1 output conv per level (`cv4[i][-1]`: mask
coefficients, keypoints, angle; YOLO26's pose head keeps its keypoint convs in `cv4_kpts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from sos_detect.core.options import parse_heads

TASKS = ("detect", "segment", "pose", "obb")  # the Ultralytics tasks whose head is a Detect
TASK_KINDS = {"segment": "mask", "pose": "kpt", "obb": "angle"}  # each task's own extra output conv
# kind -> (one-to-many attribute, one-to-one attribute); a kind's first attribute found on the head is used
_BRANCHES = {
    "box": (("cv2", "one2one_cv2"),),
    "cls": (("cv3", "one2one_cv3"),),
    "mask": (("cv4", "one2one_cv4"),),
    "angle": (("cv4", "one2one_cv4"),),
    "kpt": (("cv4_kpts", "one2one_cv4_kpts"), ("cv4", "one2one_cv4")),  # YOLO26 Pose26 first, then Pose
}
_UNSUPPORTED = {  # Detect subclasses SOS does not train: what they need, in words
    "WorldDetect": "YOLO-World (its classes come from text embeddings)",
    "YOLOEDetect": "YOLOE (its classes come from text/visual prompts)",
}


def detection_model(model: nn.Module) -> nn.Module:
    """The DetectionModel inside an Ultralytics `YOLO` object, a DDP/compiled wrapper, or the model itself."""
    from ultralytics.utils.torch_utils import unwrap_model

    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Sequential) and isinstance(inner, nn.Module) and not isinstance(inner, nn.Sequential):
        model = inner  # YOLO(...) wraps the DetectionModel
    return unwrap_model(model)


def detect_head(model: nn.Module) -> nn.Module:
    """The model's Detect head (Detect, or a subclass such as Segment, Pose, OBB, v10Detect)."""
    from ultralytics.nn.modules.head import Detect

    det = detection_model(model)
    layers = getattr(det, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(head, Detect):
        raise TypeError(
            f"{type(det).__name__} has no Ultralytics Detect head (last layer: {type(head).__name__}); "
            "SOS for detection needs a YOLO detection model"
        )
    return head


def head_task(head: nn.Module) -> str:
    """The task of a Detect head: detect, segment, pose or obb."""
    from ultralytics.nn.modules.head import OBB, Pose, Segment

    for cls, task in ((Segment, "segment"), (Pose, "pose"), (OBB, "obb")):
        if isinstance(head, cls):
            return task
    return "detect"


def unsupported_reason(head_name: str, task: str | None) -> str | None:
    """Why a model whose last module is `head_name` (its YAML's class name) cannot be trained with SOS, or None.
    Supported: the Detect subclasses of the tasks in TASKS, except those in _UNSUPPORTED."""
    from ultralytics.nn.modules import head as heads

    cls = getattr(heads, head_name, None)
    is_head = isinstance(cls, type)
    for base, what in _UNSUPPORTED.items():
        if is_head and issubclass(cls, getattr(heads, base)):
            return f"{what} is not supported"
    if task == "classify":
        return "a classification model (for classifiers use `sos-detect classify`)"
    if not (is_head and issubclass(cls, heads.Detect)) or task not in TASKS:
        what = {"RTDETRDecoder": "RT-DETR (a transformer decoder head)"}.get(head_name, f"a {head_name} head")
        return f"{what}, not a YOLO Detect head"
    return None


def task_head_kinds(task: str) -> tuple[str, ...]:
    """The kinds of output conv a `task` head has: box, cls and the task's own (mask, kpt or angle)."""
    return ("box", "cls") + ((TASK_KINDS[task],) if task in TASK_KINDS else ())


def missing_kind(which: str | Iterable[str], task: str) -> str | None:
    """The first kind of `which` that a `task` head lacks, with what it has, in words; None if it has them all."""
    missing = [k for k in parse_heads(which) if k not in task_head_kinds(task)]
    return f"a {task} head has no {missing[0]} convs (it has {', '.join(task_head_kinds(task))})" if missing else None


def head_kinds(model: nn.Module) -> tuple[str, ...]:
    """The kinds of output conv this model's head has (`task_head_kinds` of its task)."""
    return task_head_kinds(head_task(detect_head(model)))


def _output_conv(entry: Any) -> Any:
    return entry[-1] if isinstance(entry, nn.Sequential) else entry


def detect_head_layers(
    model: nn.Module, which: str | Iterable[str] = ("box", "cls"), exclude: Iterable[str] = ()
) -> dict[str, nn.Conv2d]:
    """Final 1×1 convs of the head per kind and level: `box.i` (cv2[i][-1]), `cls.i` (cv3[i][-1]) and the task's
    own `mask.i` / `kpt.i` / `angle.i` (cv4[i][-1]); the one-to-one copies of end-to-end heads (v10, YOLO26) as
    `one2one_box.i`, …; names in `exclude` left out. A kind the model's head does not have is a ValueError naming
    the kinds it has."""
    head = detect_head(model)
    kinds = parse_heads(which)
    missing = missing_kind(kinds, head_task(head))
    if missing:
        raise ValueError(f"sos_heads={','.join(kinds)}: {missing}")
    layers: dict[str, nn.Conv2d] = {}
    for copy_index in (0, 1):  # the one-to-many head first, then the one-to-one copy
        for kind in kinds:
            attr = next((pair[copy_index] for pair in _BRANCHES[kind] if hasattr(head, pair[0])), None)
            branch = getattr(head, attr, None) if attr else None
            if branch is None:  # no one2one copy, or removed by fusion
                continue
            prefix = kind if copy_index == 0 else f"one2one_{kind}"
            for i, entry in enumerate(branch):
                conv = _output_conv(entry)
                if not (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)):
                    raise TypeError(f"{attr}[{i}] ends in {type(conv).__name__}, not a 1×1 Conv2d")
                layers[f"{prefix}.{i}"] = conv
    return {n: conv for n, conv in layers.items() if n not in set(exclude)}


def frozen_layers(layers: dict[str, nn.Conv2d]) -> list[str]:
    """The names of the layers whose weight is not trained (Ultralytics' freeze= sets requires_grad False)."""
    return [n for n, conv in layers.items() if not conv.weight.requires_grad]
