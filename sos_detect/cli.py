"""The `sos-detect` command line: train, val, shift, data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sos_detect.runtime import configure

SOS_HELP = {
    "sos_mode": "guarded: min ‖V'‖ with output change ≤ τ on the capture set; paper: τ = 0 on --sos-rows "
    "sampled rows (the paper's SOS)",
    "sos_tau": "guarded mode's relative output-change budget τ (default 1e-4)",
    "sos_rows": "paper mode: rows b sampled per head conv (b < its input width)",
    "sos_images": "training images captured per shift, letterboxed, no augmentation (default 64)",
    "sos_every": "shift every N epochs (default 1)",
    "sos_start": "0-based first epoch after which a shift may happen (default: the warm-up epochs)",
    "sos_heads": "head convs to shift: box, cls or box,cls (default)",
    "sos_loss_tol": "roll a shift back if the capture-set loss rises by more than this fraction (default off)",
}


def _add_sos_options(p: argparse.ArgumentParser, *, schedule: bool) -> None:
    g = p.add_argument_group("SOS")
    if schedule:
        g.add_argument(
            "--sos",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="shift the head convs during training (--no-sos: the baseline)",
        )
    g.add_argument("--sos-mode", default="guarded", help=SOS_HELP["sos_mode"])
    g.add_argument("--sos-tau", type=float, default=1e-4, help=SOS_HELP["sos_tau"])
    g.add_argument("--sos-rows", type=int, default=None, help=SOS_HELP["sos_rows"])
    g.add_argument("--sos-images", type=int, default=64, help=SOS_HELP["sos_images"])
    g.add_argument("--sos-heads", default="box,cls", help=SOS_HELP["sos_heads"])
    g.add_argument("--sos-loss-tol", type=float, default=None, help=SOS_HELP["sos_loss_tol"])
    if schedule:
        g.add_argument("--sos-every", type=int, default=1, help=SOS_HELP["sos_every"])
        g.add_argument("--sos-start", type=int, default=None, help=SOS_HELP["sos_start"])
        g.add_argument(
            "--sos-final",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="shift once more after the final epoch, before the last validation (default on)",
        )


def _add_eval_options(p: argparse.ArgumentParser, imgsz: int = 320) -> None:
    p.add_argument("--imgsz", type=int, default=imgsz, help=f"image size (default {imgsz})")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--device", default=None, help="cpu, 0, 0,1 ... (default: CUDA if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sos-detect", description="Stochastic Optimum Shifting for YOLO detectors.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a YOLO detector with SOS (Ultralytics trainer subclass)",
        description="Train with periodic optimum shifting of the Detect head's 1×1 output convs. "
        "With no flags: YOLOv5n on the embedded tree dataset, on CPU in a few minutes.",
    )
    t.add_argument(
        "--cfg",
        default="yolov5n.yaml",
        help="model YAML or .pt (Ultralytics' model=); yolov5s.yaml is the anchor-free YOLOv5u",
    )
    t.add_argument(
        "--data",
        default=None,
        help="data YAML (default: the embedded tree dataset, then with nbs = batch so that every batch "
        "is an optimizer step)",
    )
    t.add_argument("--weights", default=None, help="start from this detector's weights (fine-tuning)")
    t.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--project", default="runs/sos", help="output root (default runs/sos)")
    t.add_argument("--name", default="train", help="run name (default train)")
    t.add_argument(
        "--optimizer",
        default="auto",
        help="auto (Ultralytics: AdamW for short runs), SGD (the paper's setting), AdamW ... (default auto)",
    )
    _add_eval_options(t)
    t.set_defaults(batch=8)
    _add_sos_options(t, schedule=True)
    t.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other Ultralytics training argument, e.g. --opt lr0=0.01 --opt cos_lr=True",
    )

    v = sub.add_parser("val", help="evaluate a checkpoint: mAP50 and mAP50-95")
    v.add_argument("--weights", required=True, help="checkpoint .pt")
    v.add_argument("--data", default=None, help="data YAML (default: the embedded tree dataset)")
    v.add_argument(
        "--voc07",
        action="store_true",
        help="also VOC2007 11-point AP per class and its mean, difficult objects ignored",
    )
    v.add_argument(
        "--coco",
        action="store_true",
        help="also write COCO-format ground truth + predictions JSON and evaluate with pycocotools",
    )
    v.add_argument("--out", default="runs/sos/val", help="folder for the --coco JSON files (default runs/sos/val)")
    _add_eval_options(v)

    s = sub.add_parser(
        "shift",
        help="post-hoc optimum shift of a trained detector's heads",
        description="Shift the stored network(s) of a checkpoint, report mAP before and after, "
        "and write a new checkpoint (only if every check passes).",
    )
    s.add_argument("--weights", required=True, help="input checkpoint .pt")
    s.add_argument("--data", default=None, help="data YAML: capture images come from its train split")
    s.add_argument("--out", required=True, help="output checkpoint .pt")
    s.add_argument("--seed", type=int, default=0, help="capture-sample seed (default 0)")
    _add_eval_options(s)
    _add_sos_options(s, schedule=False)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="dataset", required=True)
    df = dsub.add_parser("deepforest", help="rebuild the embedded tree dataset from the deepforest 2.1.0 wheel")
    df.add_argument("--src", required=True, help="deepforest-2.1.0-py3-none-any.whl or its unpacked data folder")
    df.add_argument("--out", default="data/deepforest", help="output folder (default data/deepforest)")
    vo = dsub.add_parser(
        "voc",
        help="convert an extracted VOCdevkit to the Ultralytics layout (offline)",
        description="train = VOC2007 trainval + VOC2012 trainval, val = VOC2007 test; difficult "
        "objects are kept out of the labels and recorded in difficult_{split}.json.",
    )
    vo.add_argument("--root", required=True, help="the VOCdevkit folder holding VOC2007/ and/or VOC2012/")
    vo.add_argument("--out", default="datasets/voc", help="output folder (default datasets/voc)")
    vo.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    fd = dsub.add_parser(
        "fashion-det",
        help="build the fashion-det benchmark: Fashion-MNIST items on real photographs, exact boxes, bit for bit",
        description="Composes detection images from Fashion-MNIST items (10 classes) pasted on crops of real "
        "photographs that ship with the repository and scikit-learn; the same options give the same bytes.",
    )
    fd.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    fd.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    fd.add_argument("--imgsz", default="192,256", help="image sides drawn from MIN,MAX px (default 192,256)")
    fd.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    fd.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    fd.add_argument("--out", default="datasets/fashion-det", help="output folder (default datasets/fashion-det)")
    h = sub.add_parser(
        "hessian",
        help="Hessian trace and top eigenvalues of a detector's loss (flatness)",
        description="Hutchinson trace (± standard error) and Lanczos top-k eigenvalues of the "
        "per-image detection loss on --images training images, BatchNorm in eval mode.",
    )
    h.add_argument("--weights", required=True, help="checkpoint .pt")
    h.add_argument("--data", default=None, help="data YAML: the loss batch comes from its train split")
    h.add_argument(
        "--params",
        choices=("head", "all"),
        default="head",
        help="head: the head output-conv weights (default); all: every parameter",
    )
    h.add_argument("--images", type=int, default=16, help="training images in the loss batch (default 16)")
    h.add_argument("--k", type=int, default=3, help="top eigenvalues to report (default 3)")
    h.add_argument("--probes", type=int, default=64, help="Hutchinson probes at most (default 64)")
    h.add_argument(
        "--before-after",
        action="store_true",
        help="apply a shift (--sos-* options) and report both; saves Figure 2 as a PNG in --out",
    )
    h.add_argument("--out", default="runs/sos/hessian", help="folder for the figure (default runs/sos/hessian)")
    h.add_argument("--seed", type=int, default=0, help="image sample and probe seed (default 0)")
    _add_eval_options(h)
    _add_sos_options(h, schedule=False)

    c = sub.add_parser("classify", help="classification companion: SGD/SAM/NSO with and without SOS")
    csub = c.add_subparsers(dest="action", required=True)
    ct = csub.add_parser("train", help="train a classifier (Algorithm 1 with --sos)")
    cs = csub.add_parser("shift", help="post-hoc shift of a trained classifier: top-1/top-5 before and after")
    for p in (ct, cs):
        p.add_argument(
            "--model",
            default="resnet18",
            help="resnet18, resnet50, vgg16_bn, densenet201 (CIFAR "
            "stems), resnet50_imagenet, shufflenet_v2_x1_0, resnext50_32x4d, smallcnn, mlp",
        )
        p.add_argument("--data", default="cifar100", help="cifar10, cifar100, imagefolder, fashion-mnist, digits")
        p.add_argument(
            "--root",
            default=None,
            help="dataset root (CIFAR python layout; ImageFolder with train/ "
            "and val/; Fashion-MNIST IDX folder, default /usr/share/datasets/fashion-mnist)",
        )
        p.add_argument("--weights", default=None, help="local weights file (state dict); never downloaded")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        p.add_argument("--sos-mode", default="paper", help="paper: τ = 0 on --sos-batch samples; guarded: budget τ")
        p.add_argument("--sos-batch", type=int, default=300, help="b, samples per paper-mode shift (default 300)")
        p.add_argument("--sos-tau", type=float, default=1e-4, help="guarded mode's output-change budget")
        p.add_argument("--sos-samples", type=int, default=2048, help="guarded mode: samples captured per shift")
        p.add_argument("--train-subset", type=int, default=None, help="use this many training samples")
        p.add_argument("--test-subset", type=int, default=None, help="use this many test samples")
    ct.add_argument("--optimizer", default="sgd", help="sgd (Nesterov 0.9), sam, nso")
    ct.add_argument("--sos", action=argparse.BooleanOptionalAction, default=False, help="shift during training")
    ct.add_argument("--sos-every", type=int, default=1, help="shift every N epochs (default 1)")
    ct.add_argument("--epochs", type=int, default=200)
    ct.add_argument("--batch", type=int, default=128)
    ct.add_argument("--lr", type=float, default=0.1)
    ct.add_argument("--weight-decay", type=float, default=5e-4)
    ct.add_argument("--schedule", default="step", help="step (÷10 at 50 %% and 75 %%) or cosine")
    ct.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ct.add_argument("--adaptive", action="store_true", help="ASAM")
    ct.add_argument("--sigma", type=float, default=0.01, help="NSO noise standard deviation")
    ct.add_argument("--nso-perturbations", type=int, default=1, help="NSO: perturbation pairs ±U per step")
    ct.add_argument("--mixup", type=float, default=0.0, help="Mixup Beta(α, α); 0 = off")
    ct.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ct.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue an interrupted run in --out from its last.pt (default on; its settings must match)",
    )
    ct.add_argument("--out", default="runs/classify/train", help="output folder")

    r = sub.add_parser("reproduce", help="reproduce the paper's tables")
    rsub = r.add_subparsers(dest="table", required=True)
    t5 = rsub.add_parser(
        "table5",
        help="YOLO on VOC with and without SOS (Table 5), paired by seed, resumable",
        description="Trains a baseline and an SOS arm per model and seed and writes table5.md, "
        "table5.csv and table5.png. Finished arms are never retrained.",
    )
    t5.add_argument(
        "--preset",
        choices=("paper", "mini"),
        default="mini",
        help="paper: VOC on a GPU (SGD, Nesterov 0.9); mini: embedded data on CPU (default)",
    )
    t5.add_argument("--models", default=None, help="comma-separated, e.g. yolov5s,yolov5x (default: the preset's)")
    t5.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    t5.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    t5.add_argument("--data", default=None, help="override the preset's data YAML")
    t5.add_argument(
        "--weights-dir",
        default=None,
        help="folder with starting checkpoints named MODEL.pt or MODELu.pt (e.g. COCO-pretrained yolov5su.pt)",
    )
    t5.add_argument("--device", default=None, help="override the preset's device")
    t5.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    t5.add_argument("--arms", default=None, help="comma-separated subset of base,guarded-1e-4,paper-b32 (default all)")
    t5.add_argument("--out", default="runs/table5", help="output folder (default runs/table5)")
    ab = rsub.add_parser(
        "ab",
        help="A/B harness: named arms of training options x seeds on any data YAML, paired by seed, resumable",
        description="Trains every arm for every seed (the first arm is the baseline) and writes ab.md / ab.csv "
        "(mean ± std per arm; paired differences with a 95%% t-interval and an exact sign test), the per-epoch "
        "curves and the effect plot. Finished runs are reused only with the same settings; interrupted ones resume.",
    )
    ab.add_argument("--preset", default=None, help="synth-scratch or synth-finetune (the fashion-det study)")
    ab.add_argument("--data", default=None, help="data YAML (overrides the preset's)")
    ab.add_argument("--models", default=None, help="comma-separated models, e.g. yolov5n,yolov8n (default yolov5n)")
    ab.add_argument("--weights", default=None, help="fine-tune every arm from this checkpoint")
    ab.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an arm, e.g. base:sos=False or guarded-1e-3:sos_tau=1e-3 (repeat; added after the preset's)",
    )
    ab.add_argument("--arms", default=None, help="comma-separated subset of the preset's arms, baseline first")
    ab.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's, else 0,1,2,3,4)")
    ab.add_argument("--epochs", type=int, default=None, help="override the epochs")
    ab.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="common training option")
    ab.add_argument("--out", default=None, help="output folder (default runs/ab/PRESET or runs/ab/custom)")
    rc = rsub.add_parser(
        "classify",
        help="SGD/SAM/NSO with and without SOS over seeds (Table 3 style)",
        description="Trains every scheme × seed (finished runs are read back, interrupted ones resumed) and "
        "writes classify.md and classify.csv with mean ± std and paired differences.",
    )
    rc.add_argument(
        "--preset",
        choices=("paper", "mini"),
        default="mini",
        help="paper: CIFAR-100 ResNet-18 on a GPU (--root needed); mini: Fashion-MNIST on CPU",
    )
    rc.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    rc.add_argument("--schemes", default=None, help="comma-separated subset of sgd,sgd+sos,sam,sam+sos,nso,nso+sos")
    rc.add_argument("--model", default=None, help="override the preset's model (e.g. vgg16_bn, densenet201)")
    rc.add_argument("--data", default=None, help="override the preset's dataset (cifar10, cifar100, ..., digits)")
    rc.add_argument("--root", default=None, help="dataset root")
    rc.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    rc.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    rc.add_argument("--train-subset", type=int, default=None, help="use this many training samples")
    rc.add_argument("--test-subset", type=int, default=None, help="use this many test samples")
    rc.add_argument("--device", default=None, help="override the preset's device")
    rc.add_argument(
        "--paper-figures",
        default=None,
        help="CSV with columns scheme,top1 (published test top-1 in %%) to set beside the measured table",
    )
    rc.add_argument("--out", default="runs/classify_table", help="output folder")

    cp = sub.add_parser(
        "compare",
        help="overlay per-epoch mAP50, mAP50-95, head norm and Hessian traces of runs, shift epochs marked",
    )
    cp.add_argument("runs", nargs="+", metavar="RUN", help="Ultralytics run folders (with results.csv)")
    cp.add_argument("--labels", default=None, help="comma-separated legend labels (default: the folder names)")
    cp.add_argument("--out", default="compare.png", help="PNG to write (default compare.png)")
    return parser


def _parse_opts(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _sos_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "sos",
        "sos_mode",
        "sos_tau",
        "sos_rows",
        "sos_images",
        "sos_every",
        "sos_start",
        "sos_final",
        "sos_heads",
        "sos_loss_tol",
    )
    return {k: getattr(a, k) for k in keys if hasattr(a, k)}


def _device(value: str | None) -> str:
    import torch

    return value if value is not None else ("0" if torch.cuda.is_available() else "cpu")


def torch_device(value: str | None) -> str:
    device = _device(value)
    return "cpu" if device == "cpu" else f"cuda:{device.split(',')[0]}"


def _print_sos_log(path: Path) -> None:
    if not path.exists():
        print("SOS log: no shifts were made")
        return
    print(f"SOS log ({path}):")
    print(f"{'epoch':>5} {'target':>6} {'norm ratio':>10} {'max Δout':>9} {'seconds':>8}  status")
    for line in path.read_text().splitlines():
        e = json.loads(line)
        before = sum(r["norm_before"] ** 2 for r in e["layers"]) ** 0.5
        after = sum(r["norm_after"] ** 2 for r in e["layers"]) ** 0.5
        worst = max(r["out_change"] for r in e["layers"])
        status = "applied" if e["applied"] else f"rolled back: {e['reason']}"
        print(f"{e['epoch']:>5} {e['target']:>6} {after / before:>10.4f} {worst:>9.2e} {e['seconds']:>8.2f}  {status}")


def cmd_train(a: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from ultralytics import YOLO

    from sos_detect.detect.data import load_data
    from sos_detect.detect.trainer import SOS_DEFAULTS, SOSDetectionTrainer, check_sos_args

    sos = _sos_overrides(a)
    check_sos_args(SimpleNamespace(**{**SOS_DEFAULTS, **sos}))
    data_yaml, _ = load_data(a.data)
    if a.weights and not Path(a.weights).is_file():
        raise FileNotFoundError(f"{a.weights}: --weights checkpoint not found")
    if a.cfg.endswith(".pt") and not Path(a.cfg).is_file():
        raise FileNotFoundError(f"{a.cfg}: --cfg checkpoint not found")
    device = _device(a.device)
    overrides = {
        "data": data_yaml,
        "epochs": a.epochs,
        "imgsz": a.imgsz,
        "batch": a.batch,
        "device": device,
        "seed": a.seed,
        "project": str(Path(a.project).resolve()),
        "name": a.name,
        "optimizer": a.optimizer,
        "amp": device != "cpu",
        "exist_ok": False,
        **sos,
        **_parse_opts(a.opt),
    }
    if a.weights:
        overrides["pretrained"] = a.weights
    if a.data is None:  # the embedded 37 images are less than one nominal batch: step the optimizer every batch
        overrides.setdefault("nbs", a.batch)
    model = YOLO(a.cfg)
    model.train(trainer=SOSDetectionTrainer, **overrides)
    trainer = model.trainer
    box = trainer.validator.metrics.box
    print(
        f"\nFinal validation ({trainer.best if trainer.best.exists() else trainer.last}): "
        f"mAP50 {box.map50:.4f}  mAP50-95 {box.map:.4f}"
    )
    _print_sos_log(Path(trainer.save_dir) / "sos_log.jsonl")
    return 0


def _validate(weights: str | Path, data_yaml: str, a: argparse.Namespace) -> tuple[float, float]:
    from ultralytics import YOLO

    metrics = YOLO(str(weights)).val(
        data=data_yaml, imgsz=a.imgsz, batch=a.batch, device=_device(a.device), plots=False, verbose=False
    )
    return float(metrics.box.map50), float(metrics.box.map)


def cmd_val(a: argparse.Namespace) -> int:
    from sos_detect.detect.checkpoint import load_detector_checkpoint
    from sos_detect.detect.data import load_data

    load_detector_checkpoint(a.weights)
    data_yaml, data = load_data(a.data)
    map50, map5095 = _validate(a.weights, data_yaml, a)
    print(f"{a.weights}: mAP50 {map50:.4f}  mAP50-95 {map5095:.4f}  (Ultralytics, 101-point)")
    if a.voc07 or a.coco:
        _extra_metrics(a, data)
    return 0


def _extra_metrics(a: argparse.Namespace, data: dict[str, Any]) -> None:
    from sos_detect.detect.data import image_files
    from sos_detect.detect.evaluate import coco_eval, load_ground_truth, predict, voc07_map
    from sos_detect.detect.voc import difficult_file_for

    files = image_files(data["val"])
    sidecar = difficult_file_for(files)
    truths = load_ground_truth(files, sidecar)
    dets = predict(a.weights, files, imgsz=a.imgsz, batch=a.batch, device=_device(a.device))
    if a.voc07:
        mean, aps = voc07_map(dets, truths, int(data["nc"]))
        print(
            f"VOC07 11-point mAP50 {mean:.4f}" + (f" (difficult objects from {sidecar})" if sidecar.is_file() else "")
        )
        for i, ap in enumerate(aps):
            print(f"  {data['names'][i]:<14} {'-' if np.isnan(ap) else f'{ap:.4f}'}")
    if a.coco:
        ap50, ap = coco_eval(dets, truths, data["names"], Path(a.out))
        print(f"pycocotools AP50 {ap50:.4f}  AP50-95 {ap:.4f}  (JSON in {a.out})")


def cmd_shift(a: argparse.Namespace) -> int:
    from sos_detect.detect.checkpoint import load_detector_checkpoint, shift_checkpoint
    from sos_detect.detect.data import load_data
    from sos_detect.layers import check_shift_options

    check_shift_options(a.sos_mode, a.sos_tau, a.sos_rows, a.sos_loss_tol, prefix="--sos-")
    load_detector_checkpoint(a.weights)
    data_yaml, data = load_data(a.data)
    before = _validate(a.weights, data_yaml, a)
    reports, written = shift_checkpoint(
        a.weights,
        data,
        a.out,
        mode=a.sos_mode,
        tau=a.sos_tau,
        rows=a.sos_rows,
        images=a.sos_images,
        heads=a.sos_heads,
        loss_tol=a.sos_loss_tol,
        imgsz=a.imgsz,
        batch=a.batch,
        device=torch_device(a.device),
        seed=a.seed,
    )
    for key, report in reports.items():
        print(f"[{key}]\n{report.format()}")
    print(f"before: mAP50 {before[0]:.4f}  mAP50-95 {before[1]:.4f}")
    if written is None:
        print("a shift was rolled back; no checkpoint written", file=sys.stderr)
        return 1
    after = _validate(written, data_yaml, a)
    print(f"after:  mAP50 {after[0]:.4f}  mAP50-95 {after[1]:.4f}  ({written})")
    return 0


def cmd_hessian(a: argparse.Namespace) -> int:
    from sos_detect.detect.checkpoint import capture_set_for, load_detector_checkpoint, working_copy
    from sos_detect.detect.data import load_data
    from sos_detect.detect.flatness import measure_flatness
    from sos_detect.detect.plots import plot_eigenvalues
    from sos_detect.detect.shifting import shift_detector
    from sos_detect.layers import check_shift_options

    check_shift_options(a.sos_mode, a.sos_tau, a.sos_rows, a.sos_loss_tol, prefix="--sos-")
    ckpt = load_detector_checkpoint(a.weights)
    _, data = load_data(a.data)
    device = torch_device(a.device)
    model = working_copy(ckpt.get("ema") or ckpt["model"], device, imgsz=a.imgsz, batch=a.batch)
    batches = capture_set_for(model, data).sample(a.images, a.seed)
    kw = dict(which=a.params, k=a.k, probes=a.probes, seed=a.seed)
    before = measure_flatness(model, batches, device, **kw)
    _print_flatness("before" if a.before_after else a.weights, before)
    if a.before_after:
        report = shift_detector(
            model,
            batches,
            device=device,
            heads=a.sos_heads,
            mode=a.sos_mode,
            tau=a.sos_tau,
            rows=a.sos_rows,
            loss_tol=a.sos_loss_tol,
            seed=a.seed,
        )
        print(report.format())
        after = measure_flatness(model, batches, device, **kw)
        _print_flatness("after", after)
        Path(a.out).mkdir(parents=True, exist_ok=True)
        fig = plot_eigenvalues(before.eigenvalues, after.eigenvalues, Path(a.out) / "fig2_top_eigenvalues.png")
        print(f"Figure 2: {fig}")
    return 0


def _print_flatness(label: str, f) -> None:
    eigs = ", ".join(f"{e:.6g}" for e in f.eigenvalues)
    print(
        f"{label}: loss {f.loss:.6g}  trace {f.trace.value:.6g} ± {f.trace.stderr:.2g} ({f.trace.probes} probes)  "
        f"top eigenvalues [{eigs}]"
    )


def cmd_classify(a: argparse.Namespace) -> int:
    import torch

    from sos_detect.classify.data import load_classification_data
    from sos_detect.classify.models import build_model
    from sos_detect.classify.train import TrainConfig, shift_classifier, train

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common = dict(
        model=a.model,
        data=a.data,
        root=a.root,
        weights=a.weights,
        seed=a.seed,
        device=device,
        sos_mode=a.sos_mode,
        sos_batch=a.sos_batch,
        sos_tau=a.sos_tau,
        sos_samples=a.sos_samples,
        train_subset=a.train_subset,
        test_subset=a.test_subset,
    )
    if a.action == "train":
        cfg = TrainConfig(
            **common,
            optimizer=a.optimizer,
            sos=a.sos,
            sos_every=a.sos_every,
            epochs=a.epochs,
            batch_size=a.batch,
            lr=a.lr,
            weight_decay=a.weight_decay,
            schedule=a.schedule,
            rho=a.rho,
            adaptive=a.adaptive,
            sigma=a.sigma,
            nso_perturbations=a.nso_perturbations,
            mixup=a.mixup,
            amp=a.amp,
            resume=a.resume,
            out=a.out,
        )
        final = train(cfg)["final"]
        print(
            f"epoch {final['epoch']}: test top-1 {final['test_top1']:.4f}  top-5 {final['test_top5']:.4f}  "
            f"last-layer norm {final['last_norm']:.4f}  (log: {Path(a.out) / 'log.csv'})"
        )
        return 0
    if a.weights is None:
        raise ValueError("classify shift needs --weights")
    cfg = TrainConfig(**common)
    cfg.check()
    data = load_classification_data(a.data, a.root, train_subset=a.train_subset, test_subset=a.test_subset)
    model = build_model(a.model, data.num_classes, data.in_ch, a.weights)
    res = shift_classifier(model, data, cfg)
    print(res["report"].format())
    for key in ("before", "after"):
        print(f"{key}: top-1 {res[key]['top1']:.4f}  top-5 {res[key]['top5']:.4f}  loss {res[key]['loss']:.4f}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from sos_detect.detect.embedded import build_embedded
    from sos_detect.detect.voc import convert_voc

    if a.dataset == "fashion-det":
        from sos_detect.detect.synthetic import YAML_NAME, build_fashion_det, dataset_digest, spec_from_args

        counts = build_fashion_det(a.out, spec_from_args(a.train, a.val, a.imgsz, a.seed), a.root)
        print(", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"data YAML: {Path(a.out).resolve() / YAML_NAME}\nsha256 {dataset_digest(a.out)}")
        return 0
    if a.dataset == "voc":
        summary = convert_voc(a.root, a.out, a.workers)
        print(summary.format())
        print(f"data YAML: {Path(a.out).resolve() / 'voc.yaml'}")
        return 0
    counts = build_embedded(a.src, a.out)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from sos_detect.reproduce.table5 import PRESETS, reproduce_table5

    if a.table == "classify":
        from sos_detect.reproduce.classify import SCHEMES, reproduce_classify

        given = {
            "model": a.model,
            "data": a.data,
            "root": a.root,
            "epochs": a.epochs,
            "batch_size": a.batch,
            "train_subset": a.train_subset,
            "test_subset": a.test_subset,
            "device": a.device,
        }
        overrides = {k: v for k, v in given.items() if v is not None}
        schemes = tuple(a.schemes.split(",")) if a.schemes else SCHEMES
        bad = [s for s in schemes if s not in SCHEMES]
        if bad:
            raise ValueError(f"--schemes: unknown {bad}; choose from {SCHEMES}")
        md, csv_path = reproduce_classify(
            a.preset,
            Path(a.out),
            seeds=[int(s) for s in a.seeds.split(",")],
            schemes=schemes,
            overrides=overrides,
            paper_figures=a.paper_figures,
        )
        print(md.read_text())
        print(f"written: {md}, {csv_path}")
        return 0

    if a.table == "ab":
        from sos_detect.reproduce.ab import ab_config, parse_options, run_ab

        cfg = ab_config(
            a.preset,
            data=a.data,
            models=a.models.split(",") if a.models else None,
            weights=a.weights,
            arm_specs=a.arm,
            arms=a.arms.split(",") if a.arms else None,
            seeds=[int(s) for s in a.seeds.split(",")] if a.seeds else None,
            options={**parse_options(a.opt), **({"epochs": a.epochs} if a.epochs else {})},
        )
        paths = run_ab(cfg, Path(a.out or f"runs/ab/{a.preset or 'custom'}"))
        print(paths[0].read_text())
        print("written: " + ", ".join(map(str, paths)))
        return 0

    preset = PRESETS[a.preset]
    models = a.models.split(",") if a.models else list(preset.models)
    overrides: dict[str, Any] = {
        k: v for k, v in (("epochs", a.epochs), ("device", a.device), ("batch", a.batch)) if v is not None
    }
    if a.data:
        from sos_detect.detect.data import load_data

        overrides["data"] = load_data(a.data)[0]
    if a.weights_dir:
        found = {}
        for m in models:
            cands = [Path(a.weights_dir) / f"{m}{suffix}.pt" for suffix in ("", "u")]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(f"{cands[0]}: no starting checkpoint for {m} in --weights-dir")
            found[m] = str(hit)
        overrides["weights"] = found
    seeds = [int(s) for s in a.seeds.split(",")]
    arms = a.arms.split(",") if a.arms else None
    paths = reproduce_table5(a.preset, Path(a.out), models=models, seeds=seeds, arms=arms, overrides=overrides)
    print(Path(paths[0]).read_text())
    print("written: " + ", ".join(map(str, paths)))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from sos_detect.detect.compare import compare_runs, run_labels

    labels = a.labels.split(",") if a.labels else run_labels(a.runs)
    if len(labels) != len(a.runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(a.runs)} runs")
    data = compare_runs({label: [run] for label, run in zip(labels, a.runs, strict=True)}, a.out)
    for column, curves in data.items():
        finals = ", ".join(f"{label} {c.values[-1]:.4g}" for label, c in curves.items())
        print(f"{column} (last epoch): {finals}")
    print(f"written: {a.out}")
    return 0


COMMANDS = {
    "compare": cmd_compare,
    "classify": cmd_classify,
    "hessian": cmd_hessian,
    "train": cmd_train,
    "val": cmd_val,
    "shift": cmd_shift,
    "data": cmd_data,
    "reproduce": cmd_reproduce,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure()
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, TypeError, SyntaxError) as err:
        message = str(err).splitlines()[0] if str(err) else repr(err)
        print(f"sos-detect {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
