"""The A/B study's configuration: what a study is (ABConfig), the named presets and their arms, the command line's
arm and option syntax, and the checks every study passes before anything trains or is written.

An arm is a name and the training options that make it differ (`base: sos=False`, `guarded-1e-3: sos_tau=1e-3`,
`paper-b32: sos_mode=paper, sos_rows=32`); the first arm is the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class Pretrain:
    """A shared start trained once from scratch (seed 0, SOS off) on training images [first, first + count)."""

    images: tuple[int, int]
    options: dict[str, Any]


@dataclass
class ABConfig:
    data: str
    train: dict[str, Any]  # options common to every arm
    arms: dict[str, dict[str, Any]]  # name → options; the first arm is the baseline
    models: tuple[str, ...] = ("yolov5n",)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    weights: dict[str, str] = field(default_factory=dict)  # model → starting checkpoint (fine-tuning)
    pretrain: Pretrain | None = None  # build the shared start here (used when no weights are given)
    train_images: tuple[int, int] | None = None  # the arms train on these training images (first, count)
    val_images: int | None = None  # validate on the first N validation images (all when None)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # model → arm → published mAP50 (%)
    description: str = ""


FASHION_DET = "datasets/fashion-det/fashion-det.yaml"  # `sos-detect data fashion-det` writes it here
STUDY_ARMS = {
    "base": {"sos": False},
    "guarded-1e-4": {"sos_tau": 1e-4},
    "guarded-1e-3": {"sos_tau": 1e-3},
    "guarded-1e-2": {"sos_tau": 1e-2},
    # the paper's SOS: τ = 0 on b sampled rows per head conv; YOLOv5n's six head convs are all m = 64 wide at
    # nc = 10, so b = 32 is b/m = 1/2 for every layer (the ratio of the classification mini preset; 300/512 in
    # the paper's CIFAR-100 setting). As the paper does it: no sos_max_change rollback, and Algorithm 1's order (shift
    # at the start of an epoch, then train it; the studies committed before this option ran with order "end").
    "paper-b32": {"sos_mode": "paper", "sos_rows": 32, "sos_max_change": None, "sos_order": "start"},
}
ABLATION_ARMS = {  # paper-mode factors: order × EMA policy × b
    f"paper-{order}-{ema}-b{b}": {
        "sos_mode": "paper",
        "sos_rows": b,
        "sos_max_change": None,
        "sos_order": order,
        "sos_ema": ema,
        "sos_heldout_images": 32,
    }
    for order in ("end", "start")
    for ema in ("grams", "follow")
    for b in (32, 48, 60)
}
STUDY_TRAIN = dict(
    imgsz=160,
    batch=16,
    nbs=16,  # an optimizer step every batch: a few hundred images make few nominal-64 batches
    optimizer="SGD",
    lr0=0.01,
    momentum=0.937,
    weight_decay=5e-4,
    close_mosaic=2,
    device="cpu",
    amp=False,
    workers=0,
    plots=False,
    deterministic=True,
)
GPU_TRAIN = {**STUDY_TRAIN, "imgsz": 256, "batch": 32, "nbs": 32, "device": 0, "amp": True, "workers": 4}
FINETUNE = dict(  # Table 5's regime on fashion-det: one pretrained start, then fine-tuning on other images
    data=FASHION_DET,
    train={**STUDY_TRAIN, "epochs": 8, "lr0": 0.002, "warmup_epochs": 0},
    pretrain=Pretrain(images=(0, 2400), options={"epochs": 10, "lr0": 0.01, "warmup_epochs": 1}),
    train_images=(2400, 400),
    val_images=400,
)
NO_AUGMENTATION = dict(
    mosaic=0.0, close_mosaic=0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, scale=0.0, translate=0.0
)
OVERFIT_ARMS = {
    "base": {"sos": False},
    "guarded-1e-2": {"sos_tau": 1e-2},
    "paper-start-b60": {
        "sos_mode": "paper",
        "sos_rows": 60,
        "sos_max_change": None,
        "sos_order": "start",
        "sos_ema": "follow",
    },
}
PRESETS = {
    "synth-scratch": ABConfig(
        data=FASHION_DET,
        train={**STUDY_TRAIN, "epochs": 8, "warmup_epochs": 1},
        arms=STUDY_ARMS,
        train_images=(0, 700),
        val_images=400,
        description="fashion-det, YOLOv5n from scratch on training images 0–699, 160 px, 8 epochs (SGD, an "
        "optimizer step per batch of 16), validated on the first 400 validation images after every epoch.",
    ),
    "synth-finetune": ABConfig(
        **FINETUNE,
        arms=STUDY_ARMS,
        description="fashion-det, Table 5's regime: one YOLOv5n pretrained from scratch on training images 0–2399 "
        "(10 epochs, seed 0, no SOS), then every arm fine-tunes it on images 2400–2799 (400 images, 8 epochs, "
        "160 px), validated on the first 400 validation images after every epoch.",
    ),
    "synth-finetune-ablation": ABConfig(
        **FINETUNE,
        arms={"base": {"sos": False}, **ABLATION_ARMS},
        description="fashion-det, synth-finetune's regime (the same pretrained start, data and schedule): the paper's "
        "SOS (τ = 0 on b sampled rows, no rollback) in every combination of Algorithm 1's order (end: shift after an "
        "epoch, before its validation; start: shift, then train the epoch), the EMA's policy (grams: shifted with the "
        "model's Grams; follow: not shifted, it follows the model) and b ∈ {32, 48, 60} of the 64-wide head convs. "
        "Every shift logs each layer's output change on the captured rows it was not solved on and on 32 validation "
        "images.",
    ),
    "synth-overfit": ABConfig(
        data=FASHION_DET,
        train={**FINETUNE["train"], "epochs": 20, "lr0": 0.01, **NO_AUGMENTATION},
        arms=OVERFIT_ARMS,
        seeds=tuple(range(8)),
        pretrain=FINETUNE["pretrain"],
        train_images=(2400, 100),
        val_images=400,
        description="fashion-det in the overfitting regime: synth-finetune's pretrained start fine-tuned on 100 "
        "training images (2400–2499) without augmentation for 20 epochs at lr0 0.01; in the calibration run "
        "(benchmarks/results/overfit_calibration) the baseline's training loss fell 3.77 → 1.26 over 83 epochs while "
        "its validation loss rose 4.32 → 4.96 and its mAP50 fell from 32.3 % after epoch 1 to 24.6 %. Arms: the "
        "baseline, guarded SOS at τ = 1e-2, and the best paper-mode arm of the ablation (Algorithm 1's order, b = 60).",
    ),
    "synth-scratch-gpu": ABConfig(
        data=FASHION_DET,
        train={**GPU_TRAIN, "epochs": 10, "warmup_epochs": 1},
        arms=STUDY_ARMS,
        train_images=(0, 3000),
        val_images=1000,
        description="fashion-det on a GPU, the from-scratch regime at a larger scale: YOLOv5n on all 3,000 "
        "training images, 256 px, 10 epochs, batch 32 (SGD, an optimizer step per batch, mixed precision), "
        "validated on all 1,000 validation images after every epoch.",
    ),
}


def ab_config(
    preset: str | None,
    *,
    data: str | None = None,
    models: Sequence[str] | None = None,
    weights: str | None = None,
    arm_specs: Sequence[str] = (),
    arms: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
) -> ABConfig:
    """The configuration `reproduce ab` runs: a preset (or a bare one needing --data and --arm) with the
    command line's choices; `weights` starts every model's arms from one checkpoint."""
    if preset is None:
        if not data:
            raise ValueError("--data is required without --preset")
        cfg = ABConfig(data=data, train={}, arms={})
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"--preset: unknown {preset!r}; choose from {sorted(PRESETS)}")
    extra = parse_arms(arm_specs, list(arms or cfg.arms))  # an arm --arms leaves out may be given anew
    cfg = with_overrides(cfg, data=data, models=models, seeds=seeds, arms=arms, extra_arms=extra, options=options)
    if weights:
        cfg = replace(cfg, weights={m: weights for m in cfg.models}, pretrain=None)
    if cfg.data == FASHION_DET and not Path(FASHION_DET).is_file():
        raise FileNotFoundError(f"{FASHION_DET}: not found; build it with `sos-detect data fashion-det` or pass --data")
    return cfg


def with_overrides(
    cfg: ABConfig,
    *,
    data: str | None = None,
    models: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] | None = None,
    extra_arms: Mapping[str, dict[str, Any]] | None = None,
    options: Mapping[str, Any] | None = None,
    weights: Mapping[str, str] | None = None,
) -> ABConfig:
    """A copy of `cfg` with command-line choices applied: a subset of its arms (in the given order), added arms,
    common options (e.g. epochs), data, models, seeds, starting checkpoints."""
    chosen = dict(cfg.arms)
    if arms:
        unknown = [a for a in arms if a not in cfg.arms]
        if unknown:
            raise ValueError(f"--arms: unknown {unknown}; this preset has {list(cfg.arms)}")
        chosen = {a: cfg.arms[a] for a in arms}
    chosen.update(extra_arms or {})
    if not chosen:
        raise ValueError("no arms: give --arm NAME:KEY=VALUE,… (the first is the baseline)")
    return replace(
        cfg,
        data=data or cfg.data,
        models=tuple(models or cfg.models),
        seeds=tuple(cfg.seeds if seeds is None else seeds),
        arms=chosen,
        train={**cfg.train, **(options or {})},
        weights={**cfg.weights, **(weights or {})},
    )


def parse_options(pairs: Sequence[str], flag: str = "--opt") -> dict[str, Any]:
    """['key=value', …] → {key: value}, each value read as `yolo` reads key=value arguments (Ultralytics'
    smart_value: numbers, True/False, None, lists; anything else a string)."""
    from ultralytics.cfg import smart_value

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = smart_value(value)
    return out


def parse_arm(text: str) -> tuple[str, dict[str, Any]]:
    """'NAME:key=value,key=value' (or 'NAME' alone: the trainer's defaults) → (name, options). A name is a
    folder-name part (letters, digits, '.', '_', '+', '-'); a key given twice is refused."""
    import re

    name, _, spec = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"--arm expects NAME:KEY=VALUE[,KEY=VALUE…], got {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", name):
        raise ValueError(f"--arm {text}: the arm name {name!r} may hold only letters, digits, '.', '_', '+', '-'")
    pairs = [p for p in spec.split(",") if p.strip()]
    keys = [p.partition("=")[0].strip() for p in pairs]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise ValueError(f"--arm {text}: {twice} given twice")
    return name, parse_options(pairs, flag="--arm")


def parse_arms(specs: Sequence[str], taken: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """--arm texts → {name: options}; a name given twice, or one of the preset's arms (`taken`), is refused
    (the later arm would silently replace the earlier one)."""
    arms: dict[str, dict[str, Any]] = {}
    for text in specs:
        name, options = parse_arm(text)
        if name in arms or name in taken:
            where = "given twice" if name in arms else "already an arm of the preset"
            raise ValueError(f"--arm {text}: arm {name!r} is {where}; give each arm its own name")
        arms[name] = options
    return arms


def model_cfg(model: str) -> str:
    """What Ultralytics builds a model name from: a YAML or checkpoint as given, else NAME.yaml."""
    return model if model.endswith((".yaml", ".yml", ".pt")) else f"{model}.yaml"


def check_subset(
    data_yaml: str, data: dict[str, Any], first: int, count: int, val: int | None
) -> tuple[list[Path], list[Path]]:
    """(training, validation) images of the data, refused in one line unless training images [first, first + count)
    and the first `val` validation images (all when None) exist."""
    from sos_detect.detect.data import image_files

    files, val_files = image_files(data["train"]), image_files(data["val"])
    if first < 0 or count < 1 or first + count > len(files):
        raise ValueError(f"{data_yaml}: {len(files)} training images; images {first}..{first + count - 1} requested")
    if val is not None and not 1 <= val <= len(val_files):
        raise ValueError(f"{data_yaml}: {len(val_files)} validation images; {val} requested")
    return files, val_files


def check_study(cfg: ABConfig) -> None:
    """Before anything trains or is written: the data (every image and label, the image ranges a preset takes), every
    arm's options, and that each model takes its starting checkpoint (--weights) as `sos-detect train --cfg Y
    --weights X` requires."""
    from ultralytics.nn.tasks import yaml_model_load

    from sos_detect.detect.checkpoints import load_detector
    from sos_detect.detect.data import load_data
    from sos_detect.detect.models import check_transfer, model_task, task_model

    data_yaml, data = load_data(cfg.data)
    check_arms(cfg)
    if cfg.pretrain is not None and set(cfg.models) - set(cfg.weights):
        check_subset(data_yaml, data, *cfg.pretrain.images, cfg.val_images)
    if cfg.train_images is not None or cfg.val_images is not None:
        check_subset(data_yaml, data, *(cfg.train_images or (0, 1)), cfg.val_images)
    for model, start in cfg.weights.items():
        source = model_cfg(model)
        task = model_task(source, "--models")
        if source.endswith(".pt"):
            ckpt = load_detector(source, "--models")
            spec = (ckpt.get("ema") or ckpt["model"]).yaml
        else:
            spec = yaml_model_load(source)
        remedy = "pass --models with the checkpoint's own architecture (or its .pt)"
        check_transfer(task_model(spec, task, data), start, "--weights", allow_partial=False, remedy=remedy)


def check_arms(cfg: ABConfig) -> None:
    """Every arm's options: each key a training option of Ultralytics or SOS, its value of the right type, the
    SOS options valid (errors name the arm, or --opt for a common option)."""
    import difflib
    from types import SimpleNamespace

    from ultralytics.cfg import check_cfg
    from ultralytics.utils import DEFAULT_CFG_DICT

    from sos_detect.detect.trainer import SOS_DEFAULTS, check_sos_args

    known = [*DEFAULT_CFG_DICT, *SOS_DEFAULTS]
    for arm, options in cfg.arms.items():
        merged = {**cfg.train, **options}
        for key, value in merged.items():
            where = f"arm {arm!r}" if key in options else "--opt"
            if key not in known or key in ("task", "mode", "model", "data", "seed"):
                close = difflib.get_close_matches(key, known, n=3)
                hint = f" (similar: {', '.join(close)})" if close else ""
                raise ValueError(f"{where}: {key}={value}: not a training option an arm can set{hint}")
            if key not in SOS_DEFAULTS:
                try:
                    check_cfg({key: value})
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{where}: {str(err).splitlines()[0]}") from None
        sos = {**SOS_DEFAULTS, **{k: v for k, v in merged.items() if k in SOS_DEFAULTS}}
        try:
            check_sos_args(SimpleNamespace(**sos))
        except ValueError as err:
            raise ValueError(f"arm {arm!r}: {err}") from None
