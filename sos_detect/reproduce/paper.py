"""The paper's published figures, shipped as CSV in paper/ (Tables 1–5; paper/README.md lists the places where the
printed tables contradict each other). Figures are percent, mean and standard deviation as printed."""

from __future__ import annotations

import csv
import math
from pathlib import Path

PAPER_DIR = Path(__file__).with_name("paper")
CITATION = (
    'Zhou, Li, Feng, Huang, "Improving Generalization of Deep Neural Networks by Optimum Shifting" '
    "(AAAI 2025, arXiv 2405.14111)"
)
FILES = {
    1: "table1_posthoc_cifar.csv",
    2: "table2_posthoc_imagenet.csv",
    3: "table3_training_schemes.csv",
    4: "table4_sos_batch.csv",
    5: "table5_voc_detection.csv",
}
IMAGENET_NAMES = {"resnet50_imagenet": "resnet50"}  # this project's model name → the paper's, for Table 2


def paper_rows(table: int, **match: str) -> list[dict[str, str]]:
    """The rows of Table `table` whose columns equal every `match` value (compared as text)."""
    with open(PAPER_DIR / FILES[table], newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == str(v) for k, v in match.items())]


def _figure(row: dict[str, str], key: str) -> tuple[float, float]:
    """(mean, std) of a column pair; std NaN where the paper prints none."""
    return float(row[key]), float(row[f"{key}_std"]) if row[f"{key}_std"] else math.nan


def fmt_figure(figure: tuple[float, float]) -> str:
    mean, std = figure
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def table3_top1(model: str, data: str, augmentation: str) -> dict[str, tuple[float, float]]:
    """Table 3: {scheme: (top-1, std)} for sgd, sgd+sos, sam, sam+sos; {} where the paper has no such setting."""
    rows = paper_rows(3, model=model, data=data, augmentation=augmentation)
    return {r["scheme"]: _figure(r, "top1") for r in rows}


def table4_top1(model: str) -> dict[int | None, tuple[float, float]]:
    """Table 4 (SGD + SOS, CIFAR-100): {SOS batch b: (top-1, std)}, None for the run without SOS."""
    return {
        None if r["sos_batch"] == "none" else int(r["sos_batch"]): _figure(r, "top1")
        for r in paper_rows(4, model=model)
    }


def table5_map50() -> dict[str, tuple[float, float]]:
    """Table 5 (VOC mAP50, %): {model: (baseline, with SOS)}, with the printed table's swapped labels put right."""
    arms = {(r["model"], r["arm"]): float(r["map50"]) for r in paper_rows(5)}
    return {m: (arms[(m, "baseline")], arms[(m, "sos")]) for m, arm in arms if arm == "baseline"}


def posthoc_lines(model: str, data: str, num_classes: int) -> list[str]:
    """The published before → after figures of a post-hoc shift that match (Table 1: CIFAR; Table 2: ImageNet)."""
    lines = []
    if data in ("cifar10", "cifar100"):
        for aug in ("basic", "mixup"):
            when = {r["when"]: _figure(r, "top1") for r in paper_rows(1, model=model, data=data, augmentation=aug)}
            if when:
                delta = when["after"][0] - when["before"][0]
                lines.append(
                    f"paper, Table 1 ({model}, {data}, {aug} augmentation): top-1 {fmt_figure(when['before'])} → "
                    f"{fmt_figure(when['after'])} % ({delta:+.2f})"
                )
    elif data == "imagefolder" and num_classes == 1000:
        when = {r["when"]: r for r in paper_rows(2, model=IMAGENET_NAMES.get(model, model))}
        if when:
            b, a = when["before"], when["after"]
            lines.append(
                f"paper, Table 2 ({model}, ImageNet): top-1 {fmt_figure(_figure(b, 'top1'))} → "
                f"{fmt_figure(_figure(a, 'top1'))} %, top-5 {fmt_figure(_figure(b, 'top5'))} → "
                f"{fmt_figure(_figure(a, 'top5'))} %"
            )
    if lines:
        lines.append(f"({CITATION}; inconsistencies of the printed tables: {PAPER_DIR / 'README.md'})")
    return lines
