"""What SOS costs where users train: wall time with vs without SOS, side by side, interleaved, median ratio.

(a) the main job at its defaults: `sos-detect train` vs `sos-detect train --no-sos` (real processes, same seed);
(b) a 518-image dataset at 320 px (the 37 embedded training tiles, each linked 14 times), 3 epochs, same CLI;
(c) per image, YOLOv5s (nc = 20) at 640 px: a training step (forward + loss + backward; autocast on CUDA), the
    same step with the head-input Gram hooks on (the training-pass capture), and an eval capture forward (the
    separate-pass capture, sos_capture=eval), projected onto a VOC epoch (16,551 images).
Runs alternate base/SOS order pair by pair; ratios are SOS/base per pair, medians reported. Prints a table and
writes benchmarks/results/bench_sos_overhead.json (and, for that default CPU run, the last SOS run's log as
sos_log_example.jsonl).
Run: python benchmarks/bench_sos_overhead.py [--repeats 3] [--sections a,b,c] [--device 0 --batch 16]
(--device 0: every section on the first GPU, the result named bench_sos_overhead_cuda.json by default)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sos_detect.runtime import configure

threads = configure()
import torch  # noqa: E402

from sos_detect.detect.embedded import REPO_ROOT  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOC_TRAIN_IMAGES = 16_551


def cli_run(args: list[str], project: Path, name: str) -> tuple[float, Path]:
    """Wall seconds of one `sos-detect train` process and its run folder."""
    cmd = [sys.executable, "-m", "sos_detect.cli", "train", "--project", str(project), "--name", name, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return time.perf_counter() - start, project / name


def sos_seconds(run: Path) -> float:
    """Time the run spent in shift steps (the trainer's sos/seconds column)."""
    import csv

    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    key = next(k for k in rows[0] if k.strip() == "sos/seconds")
    return sum(float(r[key]) for r in rows)


def paired(label: str, args: list[str], repeats: int, work: Path, example_log: Path | None = None) -> dict:
    """Interleaved base/SOS pairs of the same command; median of the per-pair wall-time ratios. The last SOS run's
    sos_log.jsonl is copied to `example_log` when given."""
    pairs = []
    for r in range(repeats):
        order = ("base", "sos") if r % 2 == 0 else ("sos", "base")
        times = {}
        for arm in order:
            seconds, run = cli_run(args + ([] if arm == "sos" else ["--no-sos"]), work, f"{label}_{arm}_{r}")
            times[arm] = seconds
            if arm == "sos":
                times["shift_s"] = sos_seconds(run)
                if example_log:
                    shutil.copy(run / "sos_log.jsonl", example_log)
        pairs.append({**times, "ratio": times["sos"] / times["base"]})
    ratios = [p["ratio"] for p in pairs]
    return {
        "command": "sos-detect train " + " ".join(args),
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_base_s": statistics.median(p["base"] for p in pairs),
        "median_shift_s": statistics.median(p["shift_s"] for p in pairs),
    }


def repeated_dataset(work: Path, copies: int = 14) -> Path:
    """A data YAML whose train split links each embedded training tile `copies` times (val: the embedded val)."""
    src = REPO_ROOT / "data" / "deepforest"
    for sub in ("images", "labels"):
        (work / "rep" / sub / "train").mkdir(parents=True, exist_ok=True)
    for img in sorted((src / "images" / "train").glob("*.jpg")):
        label = src / "labels" / "train" / f"{img.stem}.txt"
        for k in range(copies):
            (work / "rep" / "images" / "train" / f"{img.stem}_{k}.jpg").symlink_to(img)
            (work / "rep" / "labels" / "train" / f"{img.stem}_{k}.txt").symlink_to(label)
    yaml = work / "rep.yaml"
    yaml.write_text(f"path: {work / 'rep'}\ntrain: images/train\nval: {src / 'images' / 'val'}\nnames:\n  0: Tree\n")
    return yaml


def per_image_costs(repeats: int, device: str, batch_size: int, cfg: str, nc: int, imgsz: int) -> dict:
    """Seconds per image (default YOLOv5s, nc = 20, 640 px) of a training step (autocast on CUDA, as Ultralytics'
    AMP), the same step with the capture hooks on, and an eval capture forward."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from sos_detect.detect.heads import detect_head_layers
    from sos_detect.layers import GramCapture

    torch.manual_seed(0)
    dev = torch.device("cpu" if device == "cpu" else f"cuda:{device}")
    model = DetectionModel(cfg, nc=nc, verbose=False).to(dev)
    model.args = get_cfg(overrides={"task": "detect"})
    heads = detect_head_layers(model)
    n = batch_size
    batch = {
        "img": torch.rand(n, 3, imgsz, imgsz, device=dev),
        "batch_idx": torch.arange(n, device=dev).repeat_interleave(3).float(),
        "cls": torch.randint(0, nc, (3 * n, 1), device=dev).float(),
        "bboxes": torch.rand(3 * n, 4, device=dev) * 0.4 + 0.3,
    }
    amp = torch.autocast(dev.type, enabled=dev.type == "cuda")

    def synced() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def step(hooks: bool) -> float:
        model.train()
        capture = GramCapture(heads, skip_nonfinite=True) if hooks else None
        start = synced()
        if capture:
            capture.start()
        with amp:
            loss, _ = model.loss(batch)
        loss.sum().backward()
        if capture:
            capture.stop()
        model.zero_grad(set_to_none=True)
        return synced() - start

    def eval_capture() -> float:
        model.eval()
        start = synced()
        with torch.no_grad(), amp, GramCapture(heads):
            model(batch["img"])
        return synced() - start

    step(False), step(True), eval_capture()  # warm-up
    samples = {"train": [], "train_hooked": [], "eval_capture": []}
    for _ in range(repeats):
        samples["train"].append(step(False))
        samples["train_hooked"].append(step(True))
        samples["eval_capture"].append(eval_capture())
    med = {k: statistics.median(v) / n for k, v in samples.items()}  # per image
    hook = med["train_hooked"] - med["train"]
    out = {
        "model": cfg,
        "nc": nc,
        "imgsz": imgsz,
        "batch": n,
        "train_step_s_per_image": med["train"],
        "hooked_step_s_per_image": med["train_hooked"],
        "eval_capture_s_per_image": med["eval_capture"],
        "hook_over_step": hook / med["train"],
        "eval_capture_over_step": med["eval_capture"] / med["train"],
    }
    for images in (64, 256):
        epoch = VOC_TRAIN_IMAGES * med["train"]
        out[f"voc_epoch_overhead_train_capture_{images}"] = images * hook / epoch
        out[f"voc_epoch_overhead_eval_capture_{images}"] = 2 * images * med["eval_capture"] / epoch
    return out


def device_arg(value: str) -> str:
    """--device: 'cpu' or one CUDA index."""
    if value == "cpu" or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: cpu or one CUDA index, e.g. 0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="a,b,c")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu or one CUDA index, e.g. 0")
    ap.add_argument("--batch", type=int, default=4, help="batch of section c")
    ap.add_argument("--model", default="yolov5s.yaml", help="model of section c (the main job's: yolov5n.yaml)")
    ap.add_argument("--nc", type=int, default=20, help="classes of section c (VOC's 20; the main job's 1)")
    ap.add_argument("--imgsz", type=int, default=640, help="image size of section c (the main job's 320)")
    ap.add_argument("--out", default=None, help="default results/bench_sos_overhead[_cuda].json")
    a = ap.parse_args()
    sections = a.sections.split(",")
    out = a.out or RESULTS / ("bench_sos_overhead.json" if a.device == "cpu" else "bench_sos_overhead_cuda.json")
    result = {"torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(), "repeats": a.repeats}
    result["device"] = "cpu" if a.device == "cpu" else torch.cuda.get_device_name(torch.device("cuda", int(a.device)))
    device_args = [] if a.device == "cpu" else ["--device", a.device]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "a" in sections:
            example = RESULTS / "sos_log_example.jsonl" if a.out is None and a.device == "cpu" else None
            result["a_main_job"] = paired("a", device_args, a.repeats, work, example)
        if "b" in sections:
            yaml = repeated_dataset(work)
            result["b_518_images_320px"] = paired(
                "b", ["--data", str(yaml), "--epochs", "3", *device_args], a.repeats, work
            )
    if "c" in sections:
        key = f"c_{Path(a.model).stem}_{a.imgsz}_per_image"
        result[key] = per_image_costs(max(a.repeats, 5), a.device, a.batch, a.model, a.nc, a.imgsz)
    print(f"{'quantity':<58} {'value':>12}")
    for section, values in result.items():
        if not isinstance(values, dict):
            print(f"{section:<58} {values!s:>12}")
            continue
        for key, value in values.items():
            if isinstance(value, float):
                print(f"{section + '.' + key:<58} {value:>12.4g}")
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
