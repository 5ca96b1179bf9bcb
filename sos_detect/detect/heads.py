"""Discovery of the 1×1 output convolutions of Ultralytics Detect heads (the layers SOS shifts)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

HEAD_KINDS = ("box", "cls")
_BRANCHES = {"box": ("cv2", "one2one_cv2"), "cls": ("cv3", "one2one_cv3")}


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


def parse_heads(which: str | Iterable[str]) -> tuple[str, ...]:
    """'box,cls' or ('box', 'cls') → a checked tuple."""
    kinds = tuple(k.strip() for k in (which.split(",") if isinstance(which, str) else which) if k.strip())
    bad = [k for k in kinds if k not in HEAD_KINDS]
    if bad or not kinds:
        raise ValueError(f"sos_heads must be a comma-separated subset of {HEAD_KINDS}, got {which!r}")
    return kinds


def detect_head_layers(model: nn.Module, which: str | Iterable[str] = HEAD_KINDS) -> dict[str, nn.Conv2d]:
    """Final 1×1 convs of the head: `cv2[i][-1]` (box/DFL) and `cv3[i][-1]` (cls) for every level i.

    YOLO26 end-to-end heads also have `one2one_cv2/cv3` copies used at inference: included. Names are
    `box.i`, `cls.i`, `one2one_box.i`, `one2one_cls.i`.
    """
    head = detect_head(model)
    layers: dict[str, nn.Conv2d] = {}
    kinds = parse_heads(which)
    for copy_index in (0, 1):  # the one-to-many head first, then YOLO26's one-to-one copy
        for kind in kinds:
            attr = _BRANCHES[kind][copy_index]
            branch = getattr(head, attr, None)
            if branch is None:  # no one2one copy, or removed by fusion
                continue
            prefix = kind if copy_index == 0 else f"one2one_{kind}"
            for i, seq in enumerate(branch):
                conv = seq[-1]
                if not (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1)):
                    raise TypeError(f"{attr}[{i}][-1] is {type(conv).__name__}, not a 1×1 Conv2d")
                layers[f"{prefix}.{i}"] = conv
    return layers
