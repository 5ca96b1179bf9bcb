"""Table 5 of the paper: YOLO on VOC with and without SOS, paired by seed, resumable.

Each (model, seed) trains a baseline arm and an SOS arm that differ only in `sos`; finished arms leave a
`done.json` and are never retrained, an interrupted arm resumes from its last.pt.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sos_detect.detect.embedded import EMBEDDED_YAML, REPO_ROOT
from sos_detect.reproduce.paper import table5_map50
from sos_detect.reproduce.stats import fmt, markdown_table, mean_std, paired_differences, write_csv

# Paper, Table 5: VOC mAP50 (%), baseline → with SOS (the printed table swaps the row labels), from the shipped CSV.
PAPER = table5_map50()
ARMS = ("base", "sos")


@dataclass
class Preset:
    models: tuple[str, ...]
    data: str
    train: dict[str, Any]
    weights: dict[str, str] = field(default_factory=dict)  # model -> starting checkpoint


PRESETS = {
    # VOC on a GPU: SGD with Nesterov momentum 0.9 (Ultralytics' SGD is Nesterov), COCO-pretrained starts
    # given with --weights-dir (yolov5su.pt, yolov5xu.pt), all Ultralytics defaults otherwise.
    "paper": Preset(
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
            sos_tau=1e-4,
            sos_images=256,
            sos_every=1,
        ),
    ),
    # The embedded tree data on CPU: fine-tune the shipped YOLOv5n detector for a few epochs at 320 px.
    "mini": Preset(
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
            sos_tau=1e-4,
            sos_images=64,
            sos_start=0,
            sos_every=1,
        ),
        weights={"yolov5n": str(REPO_ROOT / "data" / "checkpoints" / "yolov5n-trees.pt")},
    ),
}


def _resumable(last: Path) -> bool:
    from ultralytics.utils.patches import torch_load

    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception:  # noqa: BLE001 - a truncated file is simply not resumable
        return False
    return ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0


def _epoch_map50(results_csv: Path) -> list[float]:
    rows = list(csv.DictReader(Path(results_csv).read_text().splitlines()))
    key = next(k for k in rows[0] if k.strip() == "metrics/mAP50(B)")
    return [float(r[key]) for r in rows]


def run_arm(model: str, seed: int, arm: str, preset: Preset, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one arm (or load its finished result) and return its metrics."""
    from ultralytics import YOLO

    from sos_detect.detect.trainer import SOSDetectionTrainer

    name = f"{model}_s{seed}_{arm}"
    run_dir = out / "runs" / name
    done = run_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.time()
    last = run_dir / "weights" / "last.pt"
    if last.is_file() and _resumable(last):
        YOLO(str(last)).train(trainer=SOSDetectionTrainer, resume=True)
    else:
        args = {
            **preset.train,
            **overrides,
            "data": overrides.get("data", preset.data),
            "seed": seed,
            "sos": arm == "sos",
            "project": str(out / "runs"),
            "name": name,
            "exist_ok": True,
            "plots": False,
            "deterministic": True,
        }
        weights = overrides.get("weights", {}).get(model) or preset.weights.get(model)
        args.pop("weights", None)
        if weights:
            args["pretrained"] = weights
        YOLO(f"{model}.yaml").train(trainer=SOSDetectionTrainer, **args)
    result = {
        "model": model,
        "seed": seed,
        "arm": arm,
        **_final_metrics(run_dir, overrides.get("data", preset.data)),
        "epoch_map50": _epoch_map50(run_dir / "results.csv"),
        "seconds": time.time() - start,
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def _final_metrics(run_dir: Path, data_yaml: str) -> dict[str, float]:
    """mAP50 and mAP50-95 of the final weights (last.pt: both arms end at the same epoch), + VOC07 if known."""
    from ultralytics import YOLO

    from sos_detect.detect.data import image_files, load_data
    from sos_detect.detect.evaluate import load_ground_truth, predict, voc07_map
    from sos_detect.detect.voc import difficult_file_for

    weights = run_dir / "weights" / "last.pt"
    args = _run_args(run_dir)
    metrics = YOLO(str(weights)).val(
        data=data_yaml, imgsz=args["imgsz"], batch=args["batch"], device=args["device"], plots=False, verbose=False
    )
    result = {"map50": float(metrics.box.map50), "map5095": float(metrics.box.map), "voc07": float("nan")}
    _, data = load_data(data_yaml)
    files = image_files(data["val"])
    sidecar = difficult_file_for(files)
    if sidecar.is_file():
        dets = predict(weights, files, imgsz=args["imgsz"], batch=args["batch"], device=args["device"])
        result["voc07"] = voc07_map(dets, load_ground_truth(files, sidecar), int(data["nc"]))[0]
    return result


def _run_args(run_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_dir / "args.yaml").read_text())


def aggregate(results: list[dict[str, Any]]) -> tuple[list[dict], str]:
    """CSV rows and markdown: per model and arm mean ± std; per-seed paired differences SOS − base."""
    rows, arm_rows, diff_rows = [], [], []
    for model in dict.fromkeys(r["model"] for r in results):
        per = {arm: {r["seed"]: r for r in results if r["model"] == model and r["arm"] == arm} for arm in ARMS}
        paper = PAPER.get(model)
        for i, arm in enumerate(ARMS):
            stats = {k: mean_std([r[k] for r in per[arm].values()]) for k in ("map50", "map5095", "voc07")}
            rows.append(
                {
                    "model": model,
                    "row": arm,
                    "seeds": len(per[arm]),
                    **{f"{k}_{s}": v for k, (m, sd) in stats.items() for s, v in (("mean", m), ("std", sd))},
                    "per_seed": json.dumps({s: round(r["map50"], 5) for s, r in per[arm].items()}),
                    "paper_map50": paper[i] if paper else "",
                }
            )
            arm_rows.append(
                [
                    model,
                    arm,
                    str(len(per[arm])),
                    fmt(*stats["map50"]),
                    fmt(*stats["map5095"]),
                    fmt(*stats["voc07"]),
                    f"{paper[i]:.1f}" if paper else "–",
                ]
            )
        for key in ("map50", "map5095", "voc07"):
            diffs = paired_differences(
                {s: r[key] for s, r in per["sos"].items()}, {s: r[key] for s, r in per["base"].items()}
            )
            m, sd = mean_std(list(diffs.values()))
            if m != m:  # NaN: the metric was not measured (no VOC07 without difficult annotations)
                continue
            rows.append(
                {
                    "model": model,
                    "row": f"sos-base {key}",
                    "seeds": len(diffs),
                    f"{key}_mean": m,
                    f"{key}_std": sd,
                    "per_seed": json.dumps({s: round(d, 5) for s, d in diffs.items()}),
                    "paper_map50": round(paper[1] - paper[0], 2) if paper and key == "map50" else "",
                }
            )
            diff_rows.append(
                [
                    model,
                    key,
                    ", ".join(f"s{s}: {d * 100:+.2f}" for s, d in diffs.items()),
                    fmt(m, sd),
                    f"{paper[1] - paper[0]:+.1f}" if paper and key == "map50" else "–",
                ]
            )
    fields = ["model", "row", "seeds"] + sorted({k for r in rows for k in r} - {"model", "row", "seeds"})
    rows = [{k: r.get(k, "") for k in fields} for r in rows]
    md = markdown_table(
        ["model", "arm", "seeds", "mAP50 (%)", "mAP50-95 (%)", "VOC07 mAP (%)", "paper mAP50"], arm_rows
    )
    md += "\n\nPaired differences, SOS − baseline (percentage points):\n\n"
    md += markdown_table(["model", "metric", "per seed", "mean ± std", "paper"], diff_rows)
    return rows, md


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """mAP50 per epoch, both arms, one panel per (model, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["model"], r["seed"]) for r in results})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, (model, seed) in zip(axes[0], keys, strict=True):
        for r in results:
            if (r["model"], r["seed"]) == (model, seed):
                ax.plot(
                    range(1, len(r["epoch_map50"]) + 1),
                    r["epoch_map50"],
                    marker="o",
                    ms=3,
                    label="SOS" if r["arm"] == "sos" else "baseline",
                )
        ax.set(title=f"{model} seed {seed}", xlabel="epoch", ylabel="val mAP50")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce_table5(
    preset_name: str,
    out: Path,
    *,
    models: list[str] | None = None,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Path, Path, Path]:
    """Run (or resume) every arm and write table5.md, table5.csv and table5.png under `out`."""
    preset = PRESETS[preset_name]
    overrides = dict(overrides or {})
    out = out.resolve()  # Ultralytics puts a relative project under its own runs folder
    out.mkdir(parents=True, exist_ok=True)
    results = [
        run_arm(m, s, arm, preset, out, overrides)
        for m in (models or preset.models)
        for s in (seeds if seeds is not None else (0, 1, 2))
        for arm in ARMS
    ]
    rows, table = aggregate(results)
    write_csv(out / "table5.csv", rows)
    settings = {**preset.train, **{k: v for k, v in overrides.items() if k != "weights"}}
    md = (
        f"# Table 5 reproduction — preset `{preset_name}`\n\n{table}\n\n"
        f"Means ± sample std over seeds of the final (last-epoch) weights; paired differences per seed.\n"
        f"Settings: {json.dumps(settings)}\n"
    )
    (out / "table5.md").write_text(md)
    plot(results, out / "table5.png")
    return out / "table5.md", out / "table5.csv", out / "table5.png"
