"""Cost of SOS inside Ultralytics training on the embedded tree data (YOLOv5n, imgsz 320, CPU).

Two runs from the same seed, side by side: baseline (--no-sos) and SOS after every epoch (guarded τ = 1e-4,
64 capture images → all 37 training tiles). Reports the time of one training iteration (forward + backward
+ optimizer step, timed between batch callbacks), of one shift step (capture + solve + apply, model and
EMA; the trainer's sos/seconds), the split of a shift into capture and solve, and the whole-run ratio.
Writes benchmarks/results/bench_sos_overhead.json and the SOS run's log as sos_log_example.jsonl.
Run: python benchmarks/bench_sos_overhead.py [epochs]
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sos_detect.runtime import configure

threads = configure()
import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from sos_detect.detect import SOSDetectionTrainer  # noqa: E402
from sos_detect.detect.embedded import EMBEDDED_YAML  # noqa: E402
from sos_detect.detect.heads import detect_head_layers  # noqa: E402
from sos_detect.detect.shifting import images_forward  # noqa: E402
from sos_detect.layers import as_v, capture_grams  # noqa: E402
from sos_detect.shift import solve_shift  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(project: Path, name: str, epochs: int, sos: bool) -> dict:
    batch_times: list[float] = []
    clock = {}
    model = YOLO("yolov5n.yaml")
    model.add_callback("on_train_batch_start", lambda t: clock.__setitem__("t", time.perf_counter()))
    model.add_callback("on_train_batch_end", lambda t: batch_times.append(time.perf_counter() - clock["t"]))
    start = time.perf_counter()
    model.train(
        trainer=SOSDetectionTrainer,
        data=str(EMBEDDED_YAML),
        epochs=epochs,
        imgsz=320,
        batch=8,
        nbs=8,
        device="cpu",
        amp=False,
        workers=0,
        seed=0,
        optimizer="SGD",
        lr0=0.01,
        plots=False,
        verbose=False,
        project=str(project),
        name=name,
        exist_ok=True,
        sos=sos,
        sos_start=0,
        sos_every=1,
        sos_images=64,
    )
    total = time.perf_counter() - start
    rows = list(csv.DictReader((project / name / "results.csv").read_text().splitlines()))
    shift_s = [float(r["sos/seconds"]) for r in rows if float(r["sos/shifted"]) > 0]
    return {
        "total_s": total,
        "iterations": len(batch_times),
        "iteration_s": statistics.median(batch_times),
        "shift_s": statistics.median(shift_s) if shift_s else None,
        "trainer": model.trainer,
        "map50": float(model.trainer.validator.metrics.box.map50),
    }


def split_shift(trainer) -> dict:
    """Capture (one eval forward over the capture images) vs solve (eigh + bisection), on the final EMA."""
    model = trainer.ema.ema
    heads = detect_head_layers(model)
    batches = trainer._capture.sample(64, 0)
    t0 = time.perf_counter()
    grams = capture_grams(model, heads, batches, forward=images_forward(trainer.device))
    t1 = time.perf_counter()
    for name, layer in heads.items():
        solve_shift(grams[name].gram, as_v(layer.weight.detach()), tau=1e-4)
    t2 = time.perf_counter()
    return {"capture_s": t1 - t0, "solve_s": t2 - t1}


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        base = run(project, "base", epochs, sos=False)
        sos = run(project, "sos", epochs, sos=True)
        parts = split_shift(sos["trainer"])
        shutil.copy(project / "sos" / "sos_log.jsonl", RESULTS / "sos_log_example.jsonl")
    result = {
        "torch": torch.__version__,
        "threads": threads,
        "epochs": epochs,
        "imgsz": 320,
        "batch": 8,
        "iteration_s": base["iteration_s"],
        "iterations_per_epoch": base["iterations"] // epochs,
        "shift_step_s_model_and_ema": sos["shift_s"],
        **{f"one_target_{k}": v for k, v in parts.items()},
        "shift_over_iteration": sos["shift_s"] / base["iteration_s"],
        "run_s_base": base["total_s"],
        "run_s_sos": sos["total_s"],
        "run_ratio_sos_over_base": sos["total_s"] / base["total_s"],
        "map50_base": base["map50"],
        "map50_sos": sos["map50"],
    }
    print(f"{'quantity':<46} {'value':>10}")
    for key, value in result.items():
        print(f"{key:<46} {value:>10.4g}" if isinstance(value, float) else f"{key:<46} {value!s:>10}")
    (RESULTS / "bench_sos_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
