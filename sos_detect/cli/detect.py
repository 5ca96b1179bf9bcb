"""Detection commands: train, val, shift, hessian, compare.

Every command checks its options, its device and its output paths first, then reads the checkpoint through the
one loader (sos_detect.core.checkpoints) and the data through `load_data`, and only then works or writes.
val, shift and hessian take image size, batch and data from the checkpoint's train args unless given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from sos_detect.cli.arguments import (
    CKPT_BATCH,
    CKPT_IMGSZ,
    EPOCHS,
    IMGSZ,
    SEED,
    add_device,
    add_options,
    check_args,
    command,
    name,
    resolve_device,
    torch_device,
    typed,
)
from sos_detect.cli.paths import (
    check_figure_file,
    check_output_file,
    check_writable_dir,
    run_folder_removed_on_failure,
)
from sos_detect.core.options import (
    SOS_OPTIONS,
    Option,
    OptionError,
    ShiftConfig,
    at_least,
    check_rows_below_width,
    sos_options,
    spell,
)

DATA_HELP = "data YAML, voc.yaml (the converted PASCAL VOC) or an Ultralytics dataset name such as coco8.yaml"
CKPT_DATA_HELP = f"{DATA_HELP} (default: the checkpoint's, else the embedded tree dataset)"
IMAGES = Option("images", int, 16, "training images in the loss batch", *at_least(1))
PROBES = Option("probes", int, 64, "Hessian-vector products at most per trace", *at_least(1))
TOP_K = Option("k", int, 3, "top eigenvalues to report", *at_least(1))
TRAIN_BATCH = Option(
    "batch",
    float,
    8,
    "batch size; -1 or a fraction in (0, 1): Ultralytics' AutoBatch for that share of GPU memory (on CPU it uses 16)",
    check=lambda v: v == -1 or 0 < v < 1 or (v >= 1 and float(v).is_integer()),
    rule="a whole number >= 1, -1, or a fraction in (0, 1)",
)
OPTIMIZERS = ("auto", "SGD", "MuSGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop")  # Ultralytics' names
OPTIMIZER = Option(
    "optimizer",
    str,
    "auto",
    "auto (Ultralytics: AdamW for short runs), SGD (the paper's setting, Nesterov), AdamW, …",
    check=lambda v: v.lower() in {o.lower() for o in OPTIMIZERS},
    rule=f"one of {', '.join(OPTIMIZERS)}",
)


def register(sub: argparse._SubParsersAction) -> None:
    _train_parser(sub)
    _val_parser(sub)
    _shift_parser(sub)
    _hessian_parser(sub)
    _compare_parser(sub)


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    cp = command(
        sub,
        "compare",
        cmd_compare,
        help="overlay per-epoch mAP50, mAP50-95, head norm and Hessian traces of runs, shift epochs marked",
    )
    cp.add_argument("runs", nargs="+", metavar="RUN", help="Ultralytics run folders (with results.csv)")
    cp.add_argument(
        "--labels",
        default=None,
        help="comma-separated legend labels (default: each folder with the training arguments of its args.yaml "
        "that differ between the runs, e.g. 'train-2: sos=False')",
    )
    cp.add_argument(
        "--out",
        default="runs/compare/compare.png",
        help="PNG to write (default runs/compare/compare.png); an existing file is kept and the next free name "
        "(compare-2.png, …) is written",
    )


def cmd_compare(a: argparse.Namespace) -> int:
    from ultralytics.utils.files import increment_path

    from sos_detect.detect.compare import compare_runs, run_labels
    from sos_detect.detect.plots import epochs_without_sos

    check_figure_file(a.out, typed(a, "out"))
    labels = a.labels.split(",") if a.labels else run_labels(a.runs)
    if len(labels) != len(a.runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(a.runs)} runs")
    check_output_file(a.out, typed(a, "out"))
    out = increment_path(a.out)
    data = compare_runs({label: [run] for label, run in zip(labels, a.runs, strict=True)}, out)
    for run in a.runs:
        if plain := epochs_without_sos(run):
            print(
                f"{run}: epochs {plain[0]}–{plain[-1]} trained without SOS (a plain Ultralytics resume; "
                "`sos-detect train --resume` keeps SOS)"
            )
    for column, curves in data.items():
        finals = ", ".join(f"{label} {c.values[-1]:.4g}" for label, c in curves.items())
        print(f"{column} (last epoch's validation, EMA weights): {finals}")
    print(f"written: {out}" + (f" ({a.out} exists and is kept)" if str(out) != str(a.out) else ""))
    return 0


def _train_parser(sub: argparse._SubParsersAction) -> None:
    t = command(
        sub,
        "train",
        cmd_train,
        help="train a YOLO detector with SOS (Ultralytics trainer subclass)",
        description="Train with periodic optimum shifting of the Detect head's 1×1 output convs. With no flags: "
        "YOLOv5n on the embedded tree dataset, on CPU in a few minutes. Ultralytics-style KEY=VALUE arguments "
        "work beside the flags: sos-detect train model=yolov5s.yaml data=voc.yaml epochs=100 sos_tau=1e-3.",
        aliases={"model": "cfg"},
        passthrough=True,
    )
    t.add_argument(
        "--cfg",
        default="yolov5n.yaml",
        help="model YAML or .pt (Ultralytics' model=; yolov5s.yaml is YOLOv5u; the task — detect, segment, pose, obb — "
        "comes from it), or a finished run's args.yaml to replay it (its sos_args.yaml beside it too; options you type "
        "override the file's)",
    )
    t.add_argument(
        "--data",
        default=None,
        help=f"{DATA_HELP} (default: the embedded tree dataset, then with nbs = batch so that every batch is an "
        "optimizer step)",
    )
    t.add_argument(
        "--weights",
        default=None,
        help="fine-tune this checkpoint: alone, its own architecture (as model=X.pt); with a model YAML --cfg, the "
        "tensors that fit (Ultralytics' pretrained=), refused when the box head or half the tensors do not",
    )
    t.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --cfg Y.yaml --weights X.pt: train even when few of X's tensors fit Y",
    )
    add_options(t, (EPOCHS, SEED, replace(IMGSZ, default=320), TRAIN_BATCH))
    t.add_argument("--project", default="runs/sos", help="output root")
    t.add_argument(
        "--name", default="train", help="run name; an existing run is never overwritten (train-2, train-3, …)"
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="LAST_PT",
        help="continue an interrupted run from its RUN/weights/last.pt, in RUN, with its own settings and SOS options "
        "(no path: the newest last.pt under --project; Ultralytics' resume=)",
    )
    add_options(t, (OPTIMIZER,))
    add_device(t)
    add_options(t, SOS_OPTIONS, "SOS")
    t.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other Ultralytics training argument, e.g. --opt lr0=0.01, or plainly lr0=0.01",
    )


def _reuse_parser(
    sub: argparse._SubParsersAction, cmd: str, run, help: str, description: str, batch: Option = CKPT_BATCH
) -> argparse.ArgumentParser:
    """A command that reads a trained checkpoint: --weights (model=), --data, image size, batch and device."""
    p = command(sub, cmd, run, help=help, description=description, aliases={"model": "weights"}, required=["weights"])
    p.add_argument("--weights", default=None, help="checkpoint .pt (required; Ultralytics' model=)")
    p.add_argument("--data", default=None, help=CKPT_DATA_HELP)
    add_options(p, (CKPT_IMGSZ, batch))
    add_device(p)
    return p


def _val_parser(sub: argparse._SubParsersAction) -> None:
    v = _reuse_parser(
        sub,
        "val",
        cmd_val,
        "evaluate a checkpoint: mAP50 and mAP50-95",
        "mAP50 and mAP50-95 (Ultralytics, 101-point) at the checkpoint's image size and at twice its batch, as its "
        "training validated (validation batches are padded per batch, which moves mAP in the 4th digit), so that "
        "best.pt gives the figure its run's final validation printed.",
        batch=replace(CKPT_BATCH, help="batch size (default: twice the checkpoint's, as its run validated; else 16)"),
    )
    v.add_argument("--voc07", action="store_true", help="also VOC2007 11-point AP per class, difficult ignored")
    v.add_argument("--coco", action="store_true", help="also write COCO-format JSON and evaluate with pycocotools")
    v.add_argument("--out", default="runs/sos/val", help="folder for the --coco JSON files")


def _shift_parser(sub: argparse._SubParsersAction) -> None:
    s = _reuse_parser(
        sub,
        "shift",
        cmd_shift,
        "post-hoc optimum shift of a trained detector's heads",
        "Shift the stored network(s) of a checkpoint, report mAP before and after, and write a new checkpoint "
        "(only if every check passes).",
    )
    s.set_defaults(cli_required=("weights", "out"))
    s.add_argument("--out", default=None, help="output checkpoint .pt (required; never the input)")
    add_options(s, (replace(SEED, help="capture-sample seed"),))
    images = "training images (sampled with --seed) whose eval-mode head inputs the shift is solved on"
    shift_options = (replace(o, help=images) if o.key == "sos_images" else o for o in sos_options("shift", "capture"))
    add_options(s, tuple(shift_options), "SOS")


def _hessian_parser(sub: argparse._SubParsersAction) -> None:
    h = _reuse_parser(
        sub,
        "hessian",
        cmd_hessian,
        "Hessian trace and top eigenvalues of a detector's loss (flatness)",
        "Hessian traces of the per-image detection loss on --images training images (BatchNorm in eval mode): the "
        "head's cls and box convs exactly, with --params all the whole model by Hutch++ (± standard error); "
        "Lanczos top-k eigenvalues of the --params block.",
    )
    h.add_argument("--params", choices=("head", "all"), default="head", help="head output-conv weights, or all")
    add_options(h, (IMAGES, TOP_K, PROBES, replace(SEED, help="image sample and probe seed")))
    h.add_argument("--before-after", action="store_true", help="apply a shift (--sos-*) and report both; saves Fig. 2")
    h.add_argument(
        "--out",
        default="runs/sos/hessian",
        help="folder for the --before-after figure fig2_top_eigenvalues.png (an existing one is kept: -2, -3, …)",
    )
    add_options(h, sos_options("shift"), "SOS (with --before-after)")


# -- train ---------------------------------------------------------------------------------------------------------


def cmd_train(a: argparse.Namespace) -> int:
    from ultralytics import YOLO

    from sos_detect.detect.data import load_data
    from sos_detect.detect.heads import missing_kind
    from sos_detect.detect.models import model_task
    from sos_detect.detect.trainer import sos_trainer

    if a.cfg.lower().endswith((".yaml", ".yml")):
        _replay(a)
    device = resolve_device(a)
    resume = a.resume if a.resume is not None else a.cli_overrides.pop("resume", None)
    if resume not in (None, False):
        return _resume(a, resume, device)
    exist_ok = bool(a.cli_overrides.get("exist_ok", False))
    check_writable_dir(a.project, typed(a, "project"))
    fine_tune = a.weights is not None and "cfg" not in a.cli_names  # --weights X.pt alone: X's own architecture
    source, flag = (a.weights, name(a, "weights")) if fine_tune else (a.cfg, name(a, "cfg"))
    task = model_task(source, flag)
    wanted = a.cli_overrides.pop("task", None)
    if wanted not in (None, task):
        raise OptionError(f"{name(a, 'task')}{wanted}: {spell(flag, source)} is a {task} model")
    if missing := missing_kind(a.sos_heads, task):
        raise OptionError(f"{typed(a, 'sos_heads')}: {missing}")
    if task != "detect" and a.data is None:
        raise OptionError(
            f"{spell(flag, source)}: a {task} model needs {task} labels and the default data (the embedded tree "
            f"boxes) has detect labels; pass --data (sos_detect.detect.embedded.build_task_data writes the trees as "
            f"{task} data)"
        )
    data_yaml, data = load_data(a.data, typed(a, "data") if a.data else None, task=task)
    model = YOLO(source, task=task)
    _check_train_model(a, model, task, data, fine_tune)  # --weights loaded and checked here, before anything is written
    overrides = _train_overrides(a, data_yaml, device, fine_tune)
    with run_folder_removed_on_failure(model, a.project, a.name, exist_ok):
        model.train(trainer=sos_trainer(task), **overrides)
    return _report(model.trainer)


def _replay(a: argparse.Namespace) -> None:
    """--cfg RUN/args.yaml (Ultralytics' cfg=): the run's model, its settings and its SOS options (sos_args.yaml
    beside it) become the values of every option not typed, so the command trains the same run again (in a new
    folder: exist_ok is off unless typed)."""
    from ultralytics.utils import DEFAULT_CFG_DICT

    from sos_detect.detect.models import is_args_yaml, read_yaml_dict
    from sos_detect.detect.trainer import SOS_ARGS

    file = typed(a, "cfg")
    settings = read_yaml_dict(a.cfg, file)
    if not is_args_yaml(settings):
        return
    if not isinstance(settings["model"], str) or not settings["model"].strip():
        raise OptionError(f"{file}: a run's args.yaml without its model (model: is empty)")
    sos = read_yaml_dict(Path(a.cfg).parent / SOS_ARGS, f"{Path(a.cfg).parent / SOS_ARGS}") or {}
    given = set(a.cli_names) | set(a.cli_overrides)
    a.cfg = settings["model"]
    skip = {"model", "mode", "task", "save_dir", "resume", "exist_ok", "cfg"}
    for key, value in {**settings, **sos}.items():
        if key in given or key in skip:
            continue
        if key == "pretrained" and isinstance(value, str):
            a.weights, a.cli_names["cfg"] = value, name(a, "cfg")  # the YAML model took these weights
        elif hasattr(a, key) and key not in ("weights", "opt"):
            setattr(a, key, value)
        elif key in DEFAULT_CFG_DICT:
            a.cli_overrides[key] = value
    try:
        check_args(a)  # the file's values pass the checks typed ones pass
    except OptionError as err:
        raise OptionError(f"{file}: {err}") from None


def _resume(a: argparse.Namespace, resume: Any, device: str) -> int:
    """Ultralytics' resume of RUN/weights/last.pt through SOSDetectionTrainer: the run's own settings, in RUN."""
    from ultralytics import YOLO
    from ultralytics.utils.files import get_latest_run

    from sos_detect.detect.checkpoints import load_detector
    from sos_detect.detect.heads import detect_head, head_task
    from sos_detect.detect.trainer import sos_trainer

    flag = name(a, "resume")
    if resume is True or str(resume).lower() == "true":
        last = get_latest_run(a.project) if Path(a.project).is_dir() else ""
        if not last:
            raise OptionError(f"{flag}: no last.pt under {name(a, 'project')} {a.project} to resume")
    else:
        last = str(resume)
    ckpt = load_detector(last, flag, resume=True)  # errors name it as `--resume LAST_PT`
    if ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None:
        raise OptionError(
            f"{spell(flag, last)}: a finished run (no optimizer state); fine-tune from it with --weights instead"
        )
    model = YOLO(last)
    trainer = sos_trainer(head_task(detect_head(ckpt.get("ema") or ckpt["model"])))
    model.train(trainer=trainer, resume=True, device=device, **a.cli_overrides)
    return _report(model.trainer)


def _report(trainer: Any) -> int:
    box = trainer.validator.metrics.box
    final = trainer.best if trainer.best.exists() else trainer.last
    print(f"\nFinal validation ({final}): mAP50 {box.map50:.4f}  mAP50-95 {box.map:.4f}")
    print_sos_log(Path(trainer.save_dir) / "sos_log.jsonl")
    return 0


def _train_overrides(a: argparse.Namespace, data_yaml: str, device: str, fine_tune: bool) -> dict[str, Any]:
    overrides = {
        "data": data_yaml,
        "epochs": a.epochs,
        "imgsz": a.imgsz,
        "batch": int(a.batch) if float(a.batch).is_integer() else a.batch,
        "device": device,
        "seed": a.seed,
        "project": str(Path(a.project).resolve()),
        "name": a.name,
        "optimizer": a.optimizer,
        "amp": device not in ("cpu", "mps"),
        "exist_ok": False,
        **{o.key: getattr(a, o.key) for o in SOS_OPTIONS},
        **a.cli_overrides,
    }
    if a.weights and not fine_tune:
        overrides["pretrained"] = a.weights
    if a.data is None:  # the embedded 37 images are less than one nominal batch: step the optimizer every batch
        overrides.setdefault("nbs", overrides["batch"] if overrides["batch"] >= 1 else 16)
    return overrides


def _check_train_model(a: argparse.Namespace, model: Any, task: str, data: dict[str, Any], fine_tune: bool) -> None:
    """On the network this run trains (the data's class count): --weights transfers into a YAML model, and
    --sos-rows is below the head widths."""
    from sos_detect.detect.models import check_transfer, task_model

    if a.sos_rows is None and (fine_tune or not a.weights):
        return
    net = task_model(model.model.yaml, task, data)
    if a.weights and not fine_tune:
        check_transfer(net, a.weights, name(a, "weights"), a.allow_partial)
    if a.sos_rows is not None:
        check_rows_below_width(a.sos_rows, _head_widths(net, a.sos_heads), typed(a, "sos_rows"))


def _head_widths(net: Any, heads: str) -> dict[str, int]:
    from sos_detect.detect.heads import detect_head_layers

    return {k: conv.in_channels for k, conv in detect_head_layers(net, heads).items()}


def print_sos_log(path: Path) -> None:
    from sos_detect.core.record import log_table

    print(f"SOS log ({path}):\n{log_table(path)}" if path.exists() else "SOS log: no shifts were made")


# -- reusing a checkpoint: val, shift, hessian ---------------------------------------------------------------------


def _open_checkpoint(a: argparse.Namespace) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(checkpoint, data YAML, data) with a.imgsz / a.batch filled from the checkpoint's train args; prints what
    it uses. The data must have the checkpoint's class count."""
    from sos_detect.detect.checkpoints import check_class_count, load_detector
    from sos_detect.detect.data import load_data
    from sos_detect.detect.heads import detect_head, head_task

    ckpt = load_detector(a.weights, name(a, "weights"))
    task = head_task(detect_head(ckpt.get("ema") or ckpt["model"]))
    stored = ckpt.get("train_args") or {}
    sources = {}
    for key, fallback in (("imgsz", 640), ("batch", 16)):
        if getattr(a, key) is None:
            value = stored.get(key)
            value = max(value) if isinstance(value, (list, tuple)) else value
            ok = isinstance(value, int) and value >= (32 if key == "imgsz" else 1)
            setattr(a, key, value if ok else fallback)
            sources[key] = "the checkpoint's" if ok else "default"
            if ok and key == "batch" and a.command == "val":  # rect batches pad per batch: the batch moves mAP
                a.batch, sources[key] = 2 * value, f"2 × the checkpoint's {value}, as its training validated"
    data_arg, data_typed, source = _data_choice(a, stored.get("data"))
    data_yaml, data = load_data(data_arg, data_typed, task=task)
    used = [f"imgsz {a.imgsz} ({sources.get('imgsz', 'given')})", f"batch {a.batch} ({sources.get('batch', 'given')})"]
    print(f"{a.command}: {', '.join(used)}, data {data_yaml} ({source})")
    check_class_count(ckpt, data, typed(a, "weights"), data_typed or f"data {data_yaml}")
    return ckpt, data_yaml, data


def _data_choice(a: argparse.Namespace, stored: str | None) -> tuple[str | None, str | None, str]:
    """(data argument, how to name it in errors, where it came from): --data, else the checkpoint's if it is here,
    else the embedded tree dataset."""
    from sos_detect.detect.data import DataError, resolve_data
    from sos_detect.detect.embedded import EMBEDDED_YAML

    if a.data is not None:
        return a.data, typed(a, "data"), "given"
    if stored and Path(stored).parts[-2:] == EMBEDDED_YAML.parts[-2:]:  # the tree data, in any checkout
        return None, None, "the checkpoint's: the embedded tree dataset"
    if stored:
        try:
            resolve_data(stored)
            return stored, f"the checkpoint's data {stored}", "the checkpoint's"
        except DataError:
            return None, None, f"default; the checkpoint's data {stored} is not here"
    return None, None, "default"


def _validate(weights: str | Path, data_yaml: str, a: argparse.Namespace, device: str) -> tuple[float, float]:
    """Ultralytics' mAP50 and mAP50-95; its run folder goes to a temporary folder, never into the working one."""
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="sos-val-") as tmp:
        metrics = YOLO(str(weights)).val(
            data=data_yaml, imgsz=a.imgsz, batch=a.batch, device=device, plots=False, verbose=False, project=tmp
        )
    return float(metrics.box.map50), float(metrics.box.map)


def cmd_val(a: argparse.Namespace) -> int:
    device = resolve_device(a)
    if a.coco:
        check_writable_dir(a.out, typed(a, "out"))
    _, data_yaml, data = _open_checkpoint(a)
    map50, map5095 = _validate(a.weights, data_yaml, a, device)
    print(f"{a.weights}: mAP50 {map50:.4f}  mAP50-95 {map5095:.4f}  (Ultralytics, 101-point)")
    if a.voc07 or a.coco:
        _extra_metrics(a, data, device)
    return 0


def _extra_metrics(a: argparse.Namespace, data: dict[str, Any], device: str) -> None:
    import numpy as np

    from sos_detect.detect.metrics import coco_eval, predict, val_truth, voc07_map

    files, truths, sidecar = val_truth(data)
    dets = predict(a.weights, files, imgsz=a.imgsz, batch=a.batch, device=device)
    if a.voc07:
        mean, aps = voc07_map(dets, truths, int(data["nc"]))
        source = f" (difficult objects from {sidecar})" if sidecar.is_file() else ""
        print(f"VOC07 11-point mAP50 {mean:.4f}{source}")
        for i, ap in enumerate(aps):
            print(f"  {data['names'][i]:<14} {'-' if np.isnan(ap) else f'{ap:.4f}'}")
    if a.coco:
        ap50, ap = coco_eval(dets, truths, data["names"], Path(a.out))
        print(f"pycocotools AP50 {ap50:.4f}  AP50-95 {ap:.4f}  (JSON in {a.out})")


def _check_rows(a: argparse.Namespace, ckpt: dict[str, Any]) -> None:
    check_rows_below_width(
        a.sos_rows, _head_widths(ckpt.get("ema") or ckpt["model"], a.sos_heads), typed(a, "sos_rows")
    )


def _check_image_count(a: argparse.Namespace, key: str, data: dict[str, Any]) -> None:
    """A post-hoc command samples option `key` training images: more than the split holds is refused when asked for
    (a default above it takes them all)."""
    from sos_detect.detect.data import image_files

    count = len(image_files(data["train"]))
    if key in a.cli_names and getattr(a, key) > count:
        raise OptionError(f"{typed(a, key)}: the training split has only {count} images ({data['train']})")


def cmd_shift(a: argparse.Namespace) -> int:
    from sos_detect.detect.posthoc import shift_checkpoint

    device = resolve_device(a)
    check_output_file(a.out, typed(a, "out"), {typed(a, "weights"): a.weights})
    ckpt, data_yaml, data = _open_checkpoint(a)
    _check_rows(a, ckpt)
    _check_image_count(a, "sos_images", data)
    before = _validate(a.weights, data_yaml, a, device)
    print(f"before: mAP50 {before[0]:.4f}  mAP50-95 {before[1]:.4f}")
    reports, written = shift_checkpoint(
        ckpt,
        data,
        a.out,
        ShiftConfig.of(a),
        imgsz=a.imgsz,
        batch=a.batch,
        device=torch_device(device),
        seed=a.seed,
    )
    for key, report in reports.items():
        print(f"[{key}]\n{report.format()}")
    if written is None:
        print("a shift was rolled back; no checkpoint written", file=sys.stderr)
        return 1
    after = _validate(written, data_yaml, a, device)
    print(f"after:  mAP50 {after[0]:.4f}  mAP50-95 {after[1]:.4f}  ({written})")
    return 0


def cmd_hessian(a: argparse.Namespace) -> int:
    import torch

    from sos_detect.detect.flatness import measure_flatness
    from sos_detect.detect.posthoc import capture_set_for, working_copy

    device = torch.device(torch_device(resolve_device(a)))
    if a.before_after:
        check_writable_dir(a.out, typed(a, "out"))
    ckpt, _, data = _open_checkpoint(a)
    _check_rows(a, ckpt)
    _check_image_count(a, "images", data)
    model = working_copy(ckpt.get("ema") or ckpt["model"], device, imgsz=a.imgsz, batch=a.batch)
    batches = capture_set_for(model, data).sample(a.images, a.seed)
    kw = dict(which=a.params, k=a.k, probes=a.probes, seed=a.seed)
    before = measure_flatness(model, batches, device, **kw)
    _print_flatness("before" if a.before_after else a.weights, before)
    if a.before_after:
        _shift_and_measure(a, model, batches, device, kw, before)
    return 0


def _shift_and_measure(a: argparse.Namespace, model: Any, batches: list, device: Any, kw: dict, before: Any) -> None:
    from ultralytics.utils.files import increment_path

    from sos_detect.detect.detector_shift import shift_detector
    from sos_detect.detect.flatness import measure_flatness
    from sos_detect.detect.plots import plot_shift_flatness

    report = shift_detector(model, batches, ShiftConfig.of(a), device=device, seed=a.seed)
    print(report.format())
    after = measure_flatness(model, batches, device, **kw)
    _print_flatness("after", after)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    mode = f"guarded shift, τ = {a.sos_tau:g}" if a.sos_mode == "guarded" else f"paper-mode shift, rows {a.sos_rows}"
    title = (
        f"Hessian of the {a.params} block around a {mode}\n{Path(a.weights).name}, {a.images} training images; "
        f"head norm ×{report.norm_ratio:.4f}"
    )
    fig = plot_shift_flatness(before, after, increment_path(Path(a.out) / "fig2_top_eigenvalues.png"), title)
    print(f"Figure 2: {fig}")


def _print_flatness(label: str, f: Any) -> None:
    eigs = ", ".join(f"{e:.6g}" for e in f.eigenvalues)
    traces = "  ".join(
        f"trace {k} {t.value:.6g}" + (" exact" if t.probes == 0 else f" ± {t.stderr:.2g} ({t.probes} HVPs)")
        for k, t in f.traces.items()
    )
    print(f"{label}: loss {f.loss:.6g}  {traces}  top eigenvalues [{eigs}]")
