"""One A/B run's lifecycle: its settings and data, the shared start, training (or resuming, or reading back), and
its final metrics.

Each run leaves done.json holding its settings; a rerun reuses it only when the settings match (otherwise an
error names it), and an interrupted run resumes from its last.pt. Runs only pass options to the trainer
(SOSDetectionTrainer), so they do not depend on how SOS captures features.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sos_detect.core.runs import changed_settings, finished_record, write_text_atomic
from sos_detect.detect.compare import run_args
from sos_detect.detect.plots import read_results, trace_columns
from sos_detect.reproduce.ab_presets import ABConfig, check_subset, model_cfg

RUN_FREE = ("device", "workers")  # settings a finished or resumed run may differ in


def plan_runs(cfg: ABConfig, out: Path) -> tuple[list[dict[str, Any]], list[tuple[Path, dict[str, Any]]]]:
    """Every model × seed × arm run of the study under out/runs: where each is ({model, seed, arm, run}) and its
    (folder, settings) task. Each model's shared start is trained (shared_start) and its data subset written
    (arm_data) here, first."""
    plan, tasks = [], []
    for model in cfg.models:
        start = shared_start(cfg, model, out)
        data = arm_data(cfg, out / "data")
        for seed in cfg.seeds:  # seeds outermost: an interrupted study holds complete pairs
            for arm in cfg.arms:
                run_dir = out / "runs" / f"{Path(model).stem}_s{seed}_{arm}"
                plan.append({"model": model, "seed": seed, "arm": arm, "run": str(run_dir)})
                tasks.append((run_dir, run_settings(cfg, model, seed, arm, data, start)))
    return plan, tasks


def run_settings(cfg: ABConfig, model: str, seed: int, arm: str, data: str, start: str | None) -> dict[str, Any]:
    """One run's training options: the common ones, the arm's on top, its model, data and seed, and the shared
    start as `pretrained` when there is one."""
    settings = {**cfg.train, **cfg.arms[arm], "model": model_cfg(model), "data": data, "seed": seed}
    if start:
        settings["pretrained"] = start
    return settings


def shared_start(cfg: ABConfig, model: str, out: Path) -> str | None:
    """The checkpoint every arm of `model` starts from: the given one, or last.pt of the pretraining run."""
    if model in cfg.weights:
        path = Path(cfg.weights[model])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: starting checkpoint for {model} not found")
        return str(path.resolve())
    if cfg.pretrain is None:
        return None
    data = str(subset_yaml(cfg.data, out / "data", *cfg.pretrain.images, cfg.val_images))
    settings = {
        **cfg.train,
        **cfg.pretrain.options,
        "model": model_cfg(model),
        "data": data,
        "seed": 0,
        "sos": False,
    }
    run_dir = out / "runs" / f"{Path(model).stem}_pretrain"
    train_run(run_dir, settings)
    return str(run_dir / "weights" / "last.pt")


def arm_data(cfg: ABConfig, folder: Path) -> str:
    """The data YAML the arms train on: cfg.data, or its train / val subset written into `folder`."""
    if cfg.train_images is None and cfg.val_images is None:
        return cfg.data
    from sos_detect.detect.data import image_files, load_data

    first, count = cfg.train_images or (0, len(image_files(load_data(cfg.data)[1]["train"])))
    return str(subset_yaml(cfg.data, folder, first, count, cfg.val_images))


def subset_yaml(data_yaml: str | Path, out_dir: Path, first: int, count: int, val: int | None = None) -> Path:
    """A data YAML training on sorted training images [first, first + count) of `data_yaml`, validating on its
    first `val` validation images (all when None); same names."""
    import yaml

    from sos_detect.detect.data import load_data

    data_yaml, data = load_data(data_yaml)
    files, val_files = check_subset(data_yaml, data, first, count, val)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(data_yaml).stem}_train{first}-{first + count}" + (f"_val{val}" if val else "")
    lists = {}
    for split, chosen in (("train", files[first : first + count]), ("val", val_files[:val] if val else None)):
        if chosen is not None:
            lists[split] = out_dir / f"{stem}_{split}.txt"
            lists[split].write_text("".join(f"{Path(f).resolve()}\n" for f in chosen))
    path = out_dir / f"{stem}.yaml"
    names = data["names"] if isinstance(data["names"], dict) else dict(enumerate(data["names"]))
    spec = {"train": str(lists["train"]), "val": str(lists["val"]) if "val" in lists else data["val"], "names": names}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _checkpoint_epoch(last: Path) -> int | None:
    """The epoch stored in last.pt (−1: training finished), None when unreadable."""
    from ultralytics.utils.patches import torch_load

    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception:  # noqa: BLE001 - a truncated file is simply not usable
        return None
    return int(ckpt.get("epoch", -1)) if ckpt.get("optimizer") is not None else -1


def train_run(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Train one run (or resume it, or read it back when finished) and return its final metrics."""
    import shutil

    from ultralytics import YOLO

    from sos_detect.detect.trainer import SOSDetectionTrainer

    done = run_dir / "done.json"
    record = finished_record(done, settings, free=RUN_FREE)
    if record is not None:
        return record
    start = time.time()
    last = run_dir / "weights" / "last.pt"
    epoch = _checkpoint_epoch(last) if last.is_file() else None
    if epoch is not None:
        changed = changed_settings(run_args(run_dir), {k: v for k, v in settings.items() if k != "model"}, RUN_FREE)
        if changed:
            raise ValueError(f"{run_dir}: an unfinished run with other settings ({', '.join(changed)}); remove it")
        if epoch >= 0:
            YOLO(str(last)).train(trainer=SOSDetectionTrainer, resume=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing usable: start afresh, no stale rows in results.csv
        args = {k: v for k, v in settings.items() if k != "model"}
        args.update(project=str(run_dir.parent), name=run_dir.name, exist_ok=True)
        YOLO(settings["model"]).train(trainer=SOSDetectionTrainer, **args)
    record = {"settings": settings, **final_metrics(run_dir, settings["data"]), "seconds": time.time() - start}
    write_text_atomic(done, json.dumps(record, indent=1))
    return record


def final_metrics(run_dir: Path, data_yaml: str) -> dict[str, Any]:
    """The last epoch's validation (results.csv: the EMA that last.pt holds), head norm, the last logged value
    (and standard error) of every trace column, and the VOC07 mAP where the data has a difficult-object sidecar."""
    cols = read_results(run_dir)
    out: dict[str, Any] = {
        "epochs": len(cols.get("epoch", [])),
        "map50": cols["metrics/mAP50(B)"][-1],
        "map5095": cols["metrics/mAP50-95(B)"][-1],
        "head_norm": cols.get("sos/head_norm", [math.nan])[-1],
        "voc07": _voc07(run_dir, data_yaml),
    }
    for key in trace_columns(cols):
        values = cols[key]
        i = max(j for j, v in enumerate(values) if not math.isnan(v))
        out[key.removeprefix("sos/")] = values[i]
        out[key.removeprefix("sos/") + "_se"] = cols.get(f"{key}_se", [math.nan] * len(values))[i]
    return out


def best_epoch_metrics(run_dir: Path) -> dict[str, float]:
    """mAP50 and mAP50-95 of the epoch best.pt holds: Ultralytics' detection fitness is mAP50-95, and it rewrites
    best.pt whenever an epoch equals the best so far, so the last epoch of the highest mAP50-95 (results.csv).
    Chosen on the validation images it is measured on: optimistic, alike for every arm."""
    cols = read_results(run_dir)
    fitness = cols["metrics/mAP50-95(B)"]
    i = max(range(len(fitness)), key=lambda j: (fitness[j], j))
    return {"best_map50": cols["metrics/mAP50(B)"][i], "best_map5095": fitness[i]}


def _voc07(run_dir: Path, data_yaml: str) -> float:
    """The VOC07 mAP of the run's last.pt on the validation images, NaN without a difficult-object sidecar."""
    import yaml

    from sos_detect.detect.data import load_data
    from sos_detect.detect.metrics import predict, val_truth, voc07_map

    _, data = load_data(data_yaml)
    files, truths, sidecar = val_truth(data)
    if not sidecar.is_file():
        return math.nan
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    dets = predict(
        run_dir / "weights" / "last.pt", files, imgsz=args["imgsz"], batch=args["batch"], device=args["device"]
    )
    return voc07_map(dets, truths, int(data["nc"]))[0]
