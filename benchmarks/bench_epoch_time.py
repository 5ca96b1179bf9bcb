"""Seconds per training epoch and per validation pass of YOLOv5n on fashion-det, for planning the A/B study.

Usage: python benchmarks/bench_epoch_time.py [DATA_YAML] [--images 300] [--val-images 200] [--imgsz 160,224]
    [--repeats 2] [--threads N]
Trains two epochs from scratch on the first --images training images (baseline and guarded SOS, interleaved,
mosaic on), validating on the first --val-images validation images; times the second epoch (the first includes
warm-up), per image size. Prints seconds per 100 training images and per 100 validation images, and the SOS /
baseline ratio of the training epoch, with the machine's load average; writes results/bench_epoch_time.json.
On a shared machine, CPU seconds with --threads 1 (e.g. under `taskset -c 0`) are the stable measure: with more
threads than free cores, OpenMP's spin-waiting inflates both clocks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sos_detect.core.runtime import configure  # noqa: E402


def one_epoch(data: str, imgsz: int, sos: bool, project: str) -> dict[str, float]:
    """Wall and CPU seconds (all threads of this process) of the second epoch's training and validation."""
    from ultralytics import YOLO

    from sos_detect.detect.trainer import SOSDetectionTrainer

    model = YOLO("yolov5n.yaml")
    times: dict[str, float] = {}

    def mark(key: str):
        def record(trainer) -> None:
            if trainer.epoch == 1:
                times[key], times[f"{key}_cpu"] = time.perf_counter(), time.process_time()

        return record

    model.add_callback("on_train_epoch_start", mark("start"))
    model.add_callback("on_train_epoch_end", mark("end"))
    model.add_callback("on_fit_epoch_end", mark("validated"))
    model.train(
        trainer=SOSDetectionTrainer,
        data=data,
        epochs=2,
        close_mosaic=0,
        imgsz=imgsz,
        batch=16,
        workers=0,
        device="cpu",
        amp=False,
        optimizer="SGD",
        lr0=0.01,
        plots=False,
        seed=0,
        deterministic=True,
        sos=sos,
        sos_images=64,
        project=project,
        name="run",
        exist_ok=False,
        verbose=False,
    )
    return {
        "train_wall": times["end"] - times["start"],
        "train_cpu": times["end_cpu"] - times["start_cpu"],
        "val_wall": times["validated"] - times["end"],
        "val_cpu": times["validated_cpu"] - times["end_cpu"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="?", default="datasets/fashion-det/fashion-det.yaml")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--imgsz", default="160,224")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    a = p.parse_args()
    threads = configure(a.threads)
    from sos_detect.reproduce.ab_runs import subset_yaml

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_yaml(a.data, Path(tmp), 0, a.images, a.val_images))
        for imgsz in (int(s) for s in a.imgsz.split(",")):
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(a.repeats):
                for sos in (False, True):
                    runs[sos].append(one_epoch(data, imgsz, sos, f"{tmp}/i{imgsz}r{r}s{int(sos)}"))

            def med(side: list[dict[str, float]], key: str) -> float:
                return statistics.median(t[key] for t in side)

            every = runs[False] + runs[True]
            results.append(
                {
                    "imgsz": imgsz,
                    "train_images": a.images,
                    "val_images": a.val_images,
                    **{
                        f"{kind}_{clock}_per_100": 100
                        * med(runs[False] if kind == "train" else every, f"{kind}_{clock}")
                        / (a.images if kind == "train" else a.val_images)
                        for kind in ("train", "val")
                        for clock in ("wall", "cpu")
                    },
                    "sos_over_base_train_wall": med(runs[True], "train_wall") / med(runs[False], "train_wall"),
                    "sos_over_base_train_cpu": med(runs[True], "train_cpu") / med(runs[False], "train_cpu"),
                    "raw": {str(k): v for k, v in runs.items()},
                }
            )
    load = os.getloadavg()
    print(
        f"YOLOv5n from scratch, batch 16, {threads} CPU threads; load average (1 min) {load_before[0]:.1f} before, "
        f"{load[0]:.1f} after (this machine has {os.cpu_count()} cores)"
    )
    print("seconds per 100 images (second epoch; CPU = all threads of this process)")
    print(
        f"{'imgsz':>5} {'train wall':>10} {'train CPU':>9} {'val wall':>8} {'val CPU':>7} "
        f"{'SOS/base wall':>13} {'CPU':>5}"
    )
    for r in results:
        print(
            f"{r['imgsz']:>5} {r['train_wall_per_100']:>10.1f} {r['train_cpu_per_100']:>9.1f} "
            f"{r['val_wall_per_100']:>8.1f} {r['val_cpu_per_100']:>7.1f} {r['sos_over_base_train_wall']:>13.3f} "
            f"{r['sos_over_base_train_cpu']:>5.3f}"
        )
    out = Path(__file__).parent / "results" / "bench_epoch_time.json"
    out.write_text(
        json.dumps(
            {"threads": threads, "loadavg_before": load_before, "loadavg_after": load, "results": results}, indent=1
        )
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
