"""Reproduction commands: reproduce table5 and ab (detection A/B), classify (classification tables), sensing."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from sos_detect.cli.arguments import BATCH, EPOCHS, IMGSZ, add_options, command
from sos_detect.core.options import MAX_IMGSZ, between
from sos_detect.reproduce.ab_presets import PRESETS

OVERRIDES = {
    row.key: replace(row, default=None, optional=True, help=f"override the preset's {row.help}")
    for row in (EPOCHS, BATCH, IMGSZ)
}
_SIDE, _SIDE_RULE = between(1, MAX_IMGSZ)  # classification images may be smaller than a detector's 32 px
CLASSIFY_IMGSZ = replace(
    OVERRIDES["imgsz"], help="override the image size (default: the data's, see classify)", check=_SIDE, rule=_SIDE_RULE
)


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("reproduce", help="reproduce the paper's tables")
    rsub = r.add_subparsers(dest="table", required=True, metavar="TABLE")
    _table5_parser(rsub)
    _ab_parser(rsub)
    _classify_parser(rsub)
    _sensing_parser(rsub)


def _table5_parser(rsub: argparse._SubParsersAction) -> None:
    t5 = command(
        rsub,
        "table5",
        cmd_table5,
        help="YOLO on VOC with and without SOS (Table 5), paired by seed, resumable",
        description="Trains a baseline and SOS arms per model and seed (the A/B harness) and writes table5.md, "
        "table5.csv, table5_effect.png (each arm's paired difference to the baseline) and table5_curves_MODEL.png "
        "(per-epoch curves). Finished arms are never retrained.",
    )
    t5.add_argument(
        "--preset",
        choices=("paper", "mini"),
        default="mini",
        help="paper: VOC on a GPU (SGD, Nesterov 0.9); mini: embedded data on CPU",
    )
    t5.add_argument("--models", default=None, help="comma-separated, e.g. yolov5s,yolov5x (default: the preset's)")
    t5.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    add_options(t5, (OVERRIDES["epochs"],))
    t5.add_argument("--data", default=None, help="override the preset's data YAML (voc.yaml: the converted VOC)")
    t5.add_argument(
        "--weights-dir",
        default=None,
        help="folder with starting checkpoints named MODEL.pt or MODELu.pt (e.g. COCO-pretrained yolov5su.pt)",
    )
    t5.add_argument("--device", default=None, help="override the preset's device")
    add_options(t5, (OVERRIDES["batch"],))
    t5.add_argument("--arms", default=None, help="comma-separated subset of base,guarded-1e-4,paper-b32 (default all)")
    _jobs_flag(t5)
    t5.add_argument("--out", default="runs/table5", help="output folder (default runs/table5)")


def _jobs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs side by side, each its own process pinned to 1/JOBS of the cores (default 1: one after another)",
    )


def _ab_parser(rsub: argparse._SubParsersAction) -> None:
    ab = command(
        rsub,
        "ab",
        cmd_ab,
        help="A/B harness: named arms of training options x seeds on any data YAML, paired by seed, resumable",
        description="Trains every arm for every seed (the first arm is the baseline) and writes ab.md / ab.csv "
        "(mean ± std per arm; paired differences with a 95 % t-interval, the minimum detectable effect at 80 % power, "
        "the paired t-test's p Holm-corrected across arms × metrics, and an exact sign test), the per-epoch "
        "curves ab_curves_MODEL.png and the effect plot ab_effect.png. Finished runs are reused only with the same "
        "settings; interrupted ones resume.",
    )
    ab.add_argument(
        "--preset",
        default=None,
        help=f"one of {', '.join(PRESETS)} (fashion-det studies on CPU; the last one on a GPU)",
    )
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
    add_options(ab, (OVERRIDES["epochs"],))
    ab.add_argument(
        "--opt",
        dest="train_options",  # read by the harness, not as this command's own key=value arguments
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training option common to every arm (repeat)",
    )
    _jobs_flag(ab)
    ab.add_argument("--out", default=None, help="output folder (default runs/ab/PRESET or runs/ab/custom)")


def cmd_ab(a: argparse.Namespace) -> int:
    from sos_detect.reproduce.ab import run_ab
    from sos_detect.reproduce.ab_presets import ab_config, parse_options

    cfg = ab_config(
        a.preset,
        data=a.data,
        models=a.models.split(",") if a.models else None,
        weights=a.weights,
        arm_specs=a.arm,
        arms=a.arms.split(",") if a.arms else None,
        seeds=_seeds(a.seeds) if a.seeds is not None else None,
        options={**parse_options(a.train_options), **({"epochs": a.epochs} if a.epochs is not None else {})},
    )
    paths = run_ab(cfg, Path(a.out or f"runs/ab/{a.preset or 'custom'}"), jobs=a.jobs)
    print(paths[0].read_text())
    print("written: " + ", ".join(map(str, paths)))
    return 0


def _classify_parser(rsub: argparse._SubParsersAction) -> None:
    rc = command(
        rsub,
        "classify",
        cmd_reproduce_classify,
        help="SGD/SAM/NSO with and without SOS over seeds (Table 3 style)",
        description="Trains every scheme × seed (finished runs are read back, interrupted ones resumed) and "
        "writes classify.md and classify.csv with mean ± std and paired differences (as reproduce ab: 95 % "
        "t-interval, minimum detectable effect, Holm-corrected t-test p, sign test), the paper's Table 3 (Table 4 "
        "for an --sos-batch sweep) beside every row it has. Runs keep the layout OUT/runs/SCHEME_sSEED.",
    )
    rc.add_argument(
        "--preset",
        choices=("paper", "mini", "terminal"),
        default="mini",
        help="paper: CIFAR-100 ResNet-18 on a GPU (--root needed); mini: Fashion-MNIST on CPU; terminal: digits MLP "
        "trained to 100%% training accuracy (200 epochs), sgd vs sgd+sos at b = 10,16,24,32,38 of m = 64, 8 seeds",
    )
    rc.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's; paper, mini 0,1,2)")
    rc.add_argument(
        "--schemes",
        default=None,
        help="comma-separated subset of sgd,sgd+sos,sam,sam+sos,nso,nso+sos (default: the preset's; all but terminal)",
    )
    rc.add_argument("--model", default=None, help="override the preset's model (e.g. vgg16_bn, densenet201)")
    rc.add_argument(
        "--data",
        default=None,
        help="override the preset's dataset (cifar10, cifar100, ..., digits; all of it unless --train-subset)",
    )
    rc.add_argument("--root", default=None, help="dataset root")
    add_options(rc, (OVERRIDES["epochs"], OVERRIDES["batch"], CLASSIFY_IMGSZ))
    rc.add_argument(
        "--sos-batch",
        default=None,
        help="comma-separated SOS batches b, e.g. 200,300,400: every +sos scheme runs at each (Table 4 beside; "
        "default: the preset's sweep, none but terminal's)",
    )
    rc.add_argument("--train-subset", type=int, default=None, help="use this many training samples")
    rc.add_argument("--test-subset", type=int, default=None, help="use this many test samples")
    rc.add_argument("--device", default=None, help="override the preset's device")
    rc.add_argument(
        "--paper-figures",
        default=None,
        help="CSV with columns scheme,top1 (published test top-1 in %%) set beside the measured table instead of "
        "the paper's Tables 3/4, which ship with sos-detect and appear wherever a row matches",
    )
    _jobs_flag(rc)
    rc.add_argument("--out", default="runs/classify_table", help="output folder")


def _sensing_parser(rsub: argparse._SubParsersAction) -> None:
    rs = command(
        rsub,
        "sensing",
        cmd_reproduce_sensing,
        help="matrix sensing testbed: GD, noise injection, NSO, SAM, optimum shifting; exact Hessians",
        description="Deep matrix factorisation on Gaussian measurements: every trainer over seeds with exact "
        "tr(H), λ_max, test error and nuclear norm, paired against GD; writes sensing.md/.csv and sensing.png. "
        "A finished case in --out is read back.",
    )
    rs.add_argument(
        "--preset",
        choices=("default", "tiny"),
        default="default",
        help="default: 4 problems (minutes); tiny: one small problem (seconds)",
    )
    rs.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    rs.add_argument("--out", default="runs/sensing", help="output folder (default runs/sensing)")


def cmd_reproduce_sensing(a: argparse.Namespace) -> int:
    from sos_detect.sensing.compare import reproduce_sensing

    paths = reproduce_sensing(a.preset, Path(a.out), _seeds(a.seeds))
    print(paths[0].read_text())
    print("written: " + ", ".join(map(str, paths)))
    return 0


def _seeds(text: str, flag: str = "--seeds", low: int = 0) -> list[int]:
    """Comma-separated distinct integers >= low (seeds; --sos-batch sizes with low 1); empty is refused."""
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: must be comma-separated integers") from None
    if any(v < low for v in values):
        raise ValueError(f"{flag} {text}: must be integers >= {low}")
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise ValueError(f"{flag} {text}: {twice} given twice (a repeated seed would count one run twice)")
    return values


def cmd_reproduce_classify(a: argparse.Namespace) -> int:
    from sos_detect.reproduce.classify import SCHEMES, reproduce_classify

    keys = ("model", "data", "root", "epochs", "imgsz", "train_subset", "test_subset", "device")
    given = {**{k: getattr(a, k) for k in keys}, "batch_size": a.batch}
    overrides = {k: v for k, v in given.items() if v is not None}
    schemes = tuple(a.schemes.split(",")) if a.schemes else None
    bad = [s for s in schemes or () if s not in SCHEMES]
    if bad:
        raise ValueError(f"--schemes: unknown {bad}; choose from {SCHEMES}")
    md, csv_path = reproduce_classify(
        a.preset,
        Path(a.out),
        seeds=_seeds(a.seeds) if a.seeds else None,
        schemes=schemes,
        overrides=overrides,
        paper_figures=a.paper_figures,
        sos_batches=_seeds(a.sos_batch, "--sos-batch", 1) if a.sos_batch is not None else None,
        jobs=a.jobs,
    )
    print(md.read_text())
    print(f"written: {md}, {csv_path}")
    return 0


def _starting_weights(folder: str, models: list[str]) -> dict[str, str]:
    found = {}
    for m in models:
        cands = [Path(folder) / f"{m}{suffix}.pt" for suffix in ("", "u")]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            raise FileNotFoundError(f"{cands[0]}: no starting checkpoint for {m} in --weights-dir")
        found[m] = str(hit)
    return found


def cmd_table5(a: argparse.Namespace) -> int:
    from sos_detect.reproduce.table5 import PRESETS, reproduce_table5

    preset = PRESETS[a.preset]
    models = a.models.split(",") if a.models else list(preset.models)
    overrides: dict[str, Any] = {
        k: v for k, v in (("epochs", a.epochs), ("device", a.device), ("batch", a.batch)) if v is not None
    }
    if a.data:
        from sos_detect.detect.data import load_data

        overrides["data"] = load_data(a.data, f"--data {a.data}")[0]
    if a.weights_dir:
        overrides["weights"] = _starting_weights(a.weights_dir, models)
    arms = a.arms.split(",") if a.arms else None
    paths = reproduce_table5(
        a.preset, Path(a.out), models=models, seeds=_seeds(a.seeds), arms=arms, overrides=overrides, jobs=a.jobs
    )
    print(Path(paths[0]).read_text())
    print("written: " + ", ".join(map(str, paths)))
    return 0
