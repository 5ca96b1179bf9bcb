"""What a training run starts from: a model YAML, a checkpoint to fine-tune, or a finished run's args.yaml to
replay; the task that follows from it, whether SOS supports it, and how much of `--weights` a YAML model takes.

Ultralytics' habits: `model=X.pt` fine-tunes X's own architecture; `model=Y.yaml pretrained=X.pt` builds Y and
copies the tensors of X whose names and shapes match ("Transferred k/n items"); `cfg=RUN/args.yaml` replays a run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sos_detect.core.options import OptionError, spell

MIN_TRANSFER = 0.5  # a YAML model must take at least this share of its tensors from --weights, and its whole box head
TRAIN_REMEDY = "fine-tune the checkpoint's own architecture with --weights alone (model=X.pt), or pass --allow-partial"


def read_yaml_dict(path: str | Path, typed: str) -> dict[str, Any] | None:
    """The mapping in a YAML file that exists here (read bounded, as an untrusted data YAML is), None for a name
    Ultralytics resolves (yolov5n.yaml)."""
    from sos_detect.detect.data import read_bounded_yaml

    p = Path(path)
    if not p.is_file():
        return None
    content = read_bounded_yaml(p, typed)
    if not isinstance(content, dict):
        raise OptionError(f"{typed}: not a model YAML (no backbone:/head:)")
    return content


def is_args_yaml(content: dict[str, Any] | None) -> bool:
    """An Ultralytics run's args.yaml (what `cfg=` takes): training settings with a model, no layers."""
    return content is not None and "model" in content and "mode" in content and "head" not in content


def model_task(source: str, flag: str) -> str:
    """The Ultralytics task of a model YAML or checkpoint (as `yolo` guesses it), refused in one line when its head
    is not a YOLO Detect SOS supports (RT-DETR, YOLO-World, YOLOE, classifiers, a data YAML given as a model)."""
    from sos_detect.detect.heads import detect_head, head_task, unsupported_reason

    typed = spell(flag, source)
    if source.lower().endswith(".pt"):
        from sos_detect.detect.checkpoints import load_detector

        ckpt = load_detector(source, flag)
        return head_task(detect_head(ckpt.get("ema") or ckpt["model"]))
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    content = read_yaml_dict(source, typed)
    if content is not None and "head" not in content:
        what = "a data YAML; pass it as --data" if {"names", "train"} & set(content) else "not a model YAML"
        raise OptionError(f"{typed}: {what} (a model YAML has backbone: and head:)")
    try:
        spec = yaml_model_load(source)
    except (FileNotFoundError, OSError):
        raise OptionError(
            f"{typed}: model YAML not found (a file, or an Ultralytics name such as yolov8n.yaml)"
        ) from None
    head = str(spec["head"][-1][-2]) if spec.get("head") else "?"
    task = guess_model_task(spec)
    reason = unsupported_reason(head, task)
    if reason:
        raise OptionError(f"{typed}: {reason}; SOS trains YOLO models with a Detect head (detect, segment, pose, obb)")
    return task


def task_model(yaml: dict[str, Any], task: str, data: dict[str, Any]):
    """A fresh network of `yaml` for `task` with the data's class count (and keypoint shape), as the task's trainer
    builds it."""
    from ultralytics.nn.tasks import DetectionModel, OBBModel, PoseModel, SegmentationModel
    from ultralytics.utils import LOGGER

    kind = {"detect": DetectionModel, "segment": SegmentationModel, "obb": OBBModel, "pose": PoseModel}[task]
    extra = {"data_kpt_shape": tuple(data["kpt_shape"])} if task == "pose" and data.get("kpt_shape") else {}
    level = LOGGER.level
    LOGGER.setLevel("WARNING")  # "Overriding model.yaml nc=80 with nc=1": the trainer says it again when it builds
    try:
        return kind(copy.deepcopy(yaml), nc=int(data["nc"]), verbose=False, **extra)
    finally:
        LOGGER.setLevel(level)


def check_transfer(
    net: Any, weights: str, flag: str, allow_partial: bool, remedy: str = TRAIN_REMEDY
) -> tuple[int, int]:
    """Load `weights` into `net` as Ultralytics' `pretrained=` does and count the tensors it took (equal to the
    checkpoint's after loading). Refused in one line, unless `allow_partial`, when fewer than MIN_TRANSFER of net's
    tensors or not all of its box-head tensors come from the checkpoint: that is another architecture."""
    import torch

    from sos_detect.detect.checkpoints import load_detector

    source = load_detector(weights, flag)
    typed = spell(flag, weights)
    src = (source.get("ema") or source["model"]).float().state_dict()
    net.load(source, verbose=False)
    dst = net.state_dict()
    took = {k for k, v in dst.items() if k in src and src[k].shape == v.shape and torch.equal(src[k].to(v.dtype), v)}
    head = f"model.{len(net.model) - 1}.cv2."
    box = [k for k in dst if k.startswith(head)]
    ok = len(took) >= MIN_TRANSFER * len(dst) and all(k in took for k in box)
    if not ok and not allow_partial:
        missing = sum(k not in took for k in box)
        raise OptionError(
            f"{typed}: only {len(took)}/{len(dst)} tensors transfer to this architecture"
            + (f" ({missing} of {len(box)} box-head tensors do not)" if missing else "")
            + f"; {remedy}"
        )
    return len(took), len(dst)
