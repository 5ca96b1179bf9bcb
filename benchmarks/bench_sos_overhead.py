"""What SOS costs where users train: wall time with vs without SOS, side by side, interleaved, median ratio.

(a) the main job at its defaults: `sos-detect train` vs `sos-detect train --no-sos` (real processes, same seed);
(b) a 518-image dataset at 320 px (the 37 embedded training tiles, each linked 14 times), 3 epochs, each ending in
    a shift (--sos-start 0: the steady state of a longer run, whose shifts start after the 3 warm-up epochs);
(c) per image, YOLOv5s (nc = 20) at 640 px: a training step (forward + loss + backward; autocast on CUDA), the
    same step with the head-input Gram hooks on (the training-pass capture), and an eval capture forward (the
    separate-pass capture, sos_capture=eval), projected onto a VOC epoch (16,551 images).
Runs alternate base/SOS order pair by pair; ratios are SOS/base per pair, medians reported. Each run of (a) and (b)
is the real command in its own process with a recorder on Ultralytics' callbacks, so its wall time splits into
phases (start-up, training steps with and without the capture hooks, data loading, epoch end = the shift,
validation, metrics and checkpoints, final evaluation and plots, exit); the mean per-pair difference of each phase
adds up to the mean difference of the whole run, the account of where SOS's time goes. Prints tables and writes
benchmarks/results/bench_sos_overhead.json (and, for that default CPU run, the last SOS run's log as
sos_log_example.jsonl).
Run: python benchmarks/bench_sos_overhead.py [--repeats 3] [--sections a,b,c] [--device 0 --batch 16]
(--device 0: every section on the first GPU, the result named bench_sos_overhead_cuda.json by default;
--train-args="--sos-every 2": epochs with capture alternate with epochs without, so the training steps' SOS/base
ratio in the one against the other measures the hooks in the same processes)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from sos_detect.core.runtime import configure

threads = configure()
import torch  # noqa: E402

from sos_detect.core.stats import t_interval  # noqa: E402
from sos_detect.detect.embedded import REPO_ROOT  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VOC_TRAIN_IMAGES = 16_551


# The callbacks a timed run records (Ultralytics calls the validator's with the trainer's callback table).
TIMED_EVENTS = (
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_val_start",
    "on_val_end",
    "on_fit_epoch_end",
    "on_train_end",
)

# Where a timed run's wall time goes: each span between two recorded callbacks belongs to one phase. "data loading"
# is the span before a step: the loader's next batch plus the loop's per-batch set-up (progress bar, warm-up learning
# rate, the capture's start). A --no-sos run has no hooked steps, so the two step rows compare only as their sum.
PHASES = (
    "start-up",
    "data loading",
    "steps",
    "steps, hooks on",
    "epoch end (shift)",
    "validation",
    "metrics, checkpoints",
    "between",
    "final eval, plots",
    "exit",
)


def timed_train(events_json: str, argv: list[str]) -> int:
    """Child process: `sos-detect train ARGV`, writing to `events_json` an [event, time.time(), capture hooks on,
    SOS seconds so far] record at every TIMED_EVENTS callback, and the total. SOS seconds: time inside SOS code
    (capture hooks, epoch end with the shift, held-out change, SOS log, SOS plots, the printed SOS log), outermost
    calls only."""
    from ultralytics.utils.callbacks import base

    from sos_detect.cli import detect as cli_detect
    from sos_detect.cli import main as cli_main
    from sos_detect.core.capture import GramCapture
    from sos_detect.detect import shifting, trainer

    log: list[tuple[str, float, bool, float]] = []
    clock = {"seconds": 0.0, "depth": 0}

    def clocked(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            clock["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["depth"] -= 1
                if clock["depth"] == 0:
                    clock["seconds"] += time.perf_counter() - start

        return wrapper

    hook = GramCapture._hook
    GramCapture._hook = lambda self, name: clocked(hook(self, name))
    for cls, name in (
        (trainer.SOSDetectionTrainer, "_maybe_start_train_capture"),
        (trainer.SOSDetectionTrainer, "_epoch_end"),
        (trainer.SOSDetectionTrainer, "_write_log"),
        (shifting.HeldOutChange, "finish"),
    ):
        setattr(cls, name, clocked(getattr(cls, name)))
    trainer.plot_run = clocked(trainer.plot_run)
    cli_detect.print_sos_log = clocked(cli_detect.print_sos_log)

    def recorder(event: str) -> Callable:
        def record(obj: object) -> None:
            log.append((event, time.time(), getattr(obj, "_train_capture", None) is not None, clock["seconds"]))

        return record

    for event in TIMED_EVENTS:
        base.default_callbacks[event].append(recorder(event))
    try:
        return cli_main(["train", *argv])
    finally:
        Path(events_json).write_text(json.dumps({"events": log, "sos_s": clock["seconds"]}))


def phases(timed: dict, launched: float, ended: float) -> dict[str, dict[str, float]]:
    """Seconds of each phase of one timed run (they add up to its wall time `ended − launched`) and the SOS seconds
    within each, plus the median training step without and with the capture hooks."""
    seconds, sos = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0.0)
    steps: dict[bool, list[float]] = {False: [], True: []}
    epoch_steps: list[float] = []  # step seconds of each epoch
    hooked_epochs: set[int] = set()
    last, last_sos, last_event, final = launched, 0.0, "launch", False
    for event, t, hooked, sos_s in timed["events"]:
        final = final or (last_event == "on_fit_epoch_end" and event in ("on_val_start", "on_train_end"))
        if event == "on_train_epoch_start":
            epoch_steps.append(0.0)
        if final:
            phase = "final eval, plots"
        elif last_event == "launch":
            phase = "start-up"
        elif event == "on_train_batch_start":
            phase = "data loading"
        elif event == "on_train_batch_end":
            phase = "steps, hooks on" if hooked else "steps"
            steps[hooked].append(t - last)
            epoch_steps[-1] += t - last
            if hooked:
                hooked_epochs.add(len(epoch_steps) - 1)
        elif event == "on_train_epoch_end":
            phase = "epoch end (shift)"
        elif event == "on_val_end":
            phase = "validation"
        elif event == "on_fit_epoch_end":
            phase = "metrics, checkpoints"
        else:  # EMA attributes and memory checks before a validation, the gap before the next epoch
            phase = "between"
        seconds[phase] += t - last
        sos[phase] += sos_s - last_sos
        last, last_sos, last_event = t, sos_s, event
    seconds["exit"] += ended - last
    sos["exit"] += timed["sos_s"] - last_sos
    return {
        "seconds": seconds,
        "sos_code_s": sos,
        "step_s": {
            "plain": statistics.median(steps[False]) if steps[False] else math.nan,
            "hooked": statistics.median(steps[True]) if steps[True] else math.nan,
        },
        "epoch_step_s": epoch_steps,
        "hooked_epochs": sorted(hooked_epochs),
    }


def cli_run(args: list[str], project: Path, name: str) -> tuple[float, Path, dict[str, float]]:
    """Wall seconds of one `sos-detect train` process, its run folder and its phases."""
    events = project / f"{name}_events.json"
    cmd = [sys.executable, __file__, "--timed", str(events), "--project", str(project), "--name", name, *args]
    launched = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return seconds, project / name, phases(json.loads(events.read_text()), launched, launched + seconds)


def sos_seconds(run: Path) -> float:
    """Time the run spent in shift steps (the trainer's sos/seconds column)."""
    import csv

    rows = list(csv.DictReader((run / "results.csv").read_text().splitlines()))
    key = next(k for k in rows[0] if k.strip() == "sos/seconds")
    return sum(float(r[key]) for r in rows)


def paired(label: str, args: list[str], repeats: int, work: Path, example_log: Path | None = None) -> dict:
    """Interleaved base/SOS pairs of the same command: median of the per-pair wall-time ratios, the mean paired
    difference with its 95 % t-interval, and per phase the mean paired difference (they add up to the total's) and
    the seconds inside SOS code. The last SOS run's sos_log.jsonl is copied to `example_log` when given."""
    pairs = []
    for r in range(repeats):
        order = ("base", "sos") if r % 2 == 0 else ("sos", "base")
        pair: dict = {}
        for arm in order:
            seconds, run, phase_s = cli_run(args + ([] if arm == "sos" else ["--no-sos"]), work, f"{label}_{arm}_{r}")
            pair[arm], pair[f"{arm}_phases"] = seconds, phase_s
            if arm == "sos":
                pair["shift_s"] = sos_seconds(run)
                if example_log:
                    shutil.copy(run / "sos_log.jsonl", example_log)
        pairs.append({**pair, "ratio": pair["sos"] / pair["base"]})
    ratios = [p["ratio"] for p in pairs]
    base_s = statistics.mean(p["base"] for p in pairs)
    diffs = [p["sos"] - p["base"] for p in pairs]
    code = [sum(p["sos_phases"]["sos_code_s"].values()) - sum(p["base_phases"]["sos_code_s"].values()) for p in pairs]
    speed = [step_ratios(p) for p in pairs]
    account = {}
    for phase in PHASES:
        d = [p["sos_phases"]["seconds"][phase] - p["base_phases"]["seconds"][phase] for p in pairs]
        account[phase] = {
            "base_s": statistics.mean(p["base_phases"]["seconds"][phase] for p in pairs),
            "sos_s": statistics.mean(p["sos_phases"]["seconds"][phase] for p in pairs),
            "diff_s": statistics.mean(d),
            "diff_std_s": statistics.stdev(d) if len(d) > 1 else math.nan,
            "diff_of_base_run": statistics.mean(d) / base_s,
            "sos_code_s": statistics.mean(p["sos_phases"]["sos_code_s"][phase] for p in pairs),
            "base_sos_code_s": statistics.mean(p["base_phases"]["sos_code_s"][phase] for p in pairs),
        }
    return {
        "command": "sos-detect train " + " ".join(args),
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_base_s": statistics.median(p["base"] for p in pairs),
        "median_shift_s": statistics.median(p["shift_s"] for p in pairs),
        "mean_diff_s": statistics.mean(diffs),
        "mean_diff_ci95_s": t_interval(diffs) if len(diffs) > 1 else (math.nan, math.nan),
        "mean_diff_of_base_run": statistics.mean(diffs) / base_s,
        "sos_code_diff_s": statistics.mean(code),
        "sos_code_diff_of_base_run": statistics.mean(code) / base_s,
        "phases": account,
        "step_ratio_capture_epochs": median(r[0] for r in speed),
        "step_ratio_other_epochs": median(r[1] for r in speed),
        "step_ratio_capture_over_other": median(r[0] / r[1] for r in speed),
        "median_step_s": {
            f"{arm} {kind}": median(p[f"{arm}_phases"]["step_s"][kind] for p in pairs)
            for arm in ("base", "sos")
            for kind in ("plain", "hooked")
        },
    }


def step_ratios(pair: dict) -> tuple[float, float]:
    """SOS/base ratio of the training-step seconds in the epochs the SOS run captured in, and in the others (no SOS
    code runs in their steps: the ratio there is how fast the two processes ran). NaN where there are none."""
    captured = set(pair["sos_phases"]["hooked_epochs"])
    out = []
    for inside in (True, False):
        sums = [
            sum(s for e, s in enumerate(pair[f"{arm}_phases"]["epoch_step_s"]) if (e in captured) == inside)
            for arm in ("sos", "base")
        ]
        out.append(sums[0] / sums[1] if sums[1] else math.nan)
    return out[0], out[1]


def median(values: Iterable[float]) -> float:
    """Median of the finite values (a run without hooked steps has NaN for their median); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def print_account(section: str, result: dict) -> None:
    """The phase table of one paired section: mean seconds per run, base and SOS, their mean difference, and the
    seconds spent inside SOS code (in the SOS runs; in the --no-sos runs the trainer's head-norm column and plots)."""
    print(f"\n{section}: {result['command']} ({len(result['pairs'])} pairs)")
    head = f"{'phase':<22} {'base s':>8} {'SOS s':>8} {'diff s':>8} {'± std':>6} {'of base':>8} {'SOS code s':>11}"
    print(head + f" {'(base)':>7}")
    for phase, row in result["phases"].items():
        print(
            f"{phase:<22} {row['base_s']:>8.3f} {row['sos_s']:>8.3f} {row['diff_s']:>+8.3f} {row['diff_std_s']:>6.3f} "
            f"{100 * row['diff_of_base_run']:>+7.2f}% {row['sos_code_s']:>11.3f} {row['base_sos_code_s']:>7.3f}"
        )
    steps = [result["phases"][k] for k in ("steps", "steps, hooks on")]
    base, sos = sum(r["base_s"] for r in steps), sum(r["sos_s"] for r in steps)
    print(
        f"{'(all steps)':<22} {base:>8.3f} {sos:>8.3f} {sos - base:>+8.3f} {'':>6} "
        f"{100 * sum(r['diff_of_base_run'] for r in steps):>+7.2f}% {sum(r['sos_code_s'] for r in steps):>11.3f}"
    )
    lo, hi = result["mean_diff_ci95_s"]
    print(
        f"whole run: {result['mean_diff_s']:+.3f} s = {100 * result['mean_diff_of_base_run']:+.2f} % of the base run "
        f"(95 % interval [{lo:+.3f}, {hi:+.3f}] s), median ratio {result['median_ratio']:.4f}; inside SOS code "
        f"{result['sos_code_diff_s']:+.3f} s = {100 * result['sos_code_diff_of_base_run']:+.2f} %"
    )
    steps = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["median_step_s"].items() if math.isfinite(v))
    print(f"median training step: {steps}")
    print(
        f"training steps SOS/base (median over pairs): {result['step_ratio_capture_epochs']:.4f} in the epochs with "
        f"capture, {result['step_ratio_other_epochs']:.4f} in the others; capture/other "
        f"{result['step_ratio_capture_over_other']:.4f}"
    )


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

    from sos_detect.core.capture import GramCapture
    from sos_detect.detect.heads import detect_head_layers

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
    if sys.argv[1:2] == ["--timed"]:  # a child run of sections a and b
        sys.exit(timed_train(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="a,b,c")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu or one CUDA index, e.g. 0")
    ap.add_argument("--batch", type=int, default=4, help="batch of section c")
    ap.add_argument("--model", default="yolov5s.yaml", help="model of section c (the main job's: yolov5n.yaml)")
    ap.add_argument("--nc", type=int, default=20, help="classes of section c (VOC's 20; the main job's 1)")
    ap.add_argument("--imgsz", type=int, default=640, help="image size of section c (the main job's 320)")
    ap.add_argument("--train-args", default="", help="more `sos-detect train` arguments for sections a and b")
    ap.add_argument("--out", default=None, help="default results/bench_sos_overhead[_cuda].json")
    a = ap.parse_args()
    sections = a.sections.split(",")
    out = a.out or RESULTS / ("bench_sos_overhead.json" if a.device == "cpu" else "bench_sos_overhead_cuda.json")
    result = {"torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(), "repeats": a.repeats}
    result["device"] = "cpu" if a.device == "cpu" else torch.cuda.get_device_name(torch.device("cuda", int(a.device)))
    run_args = ([] if a.device == "cpu" else ["--device", a.device]) + shlex.split(a.train_args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "a" in sections:
            example = RESULTS / "sos_log_example.jsonl" if a.out is None and a.device == "cpu" else None
            result["a_main_job"] = paired("a", run_args, a.repeats, work, example)
        if "b" in sections:
            yaml = repeated_dataset(work)
            result["b_518_images_320px"] = paired(
                "b", ["--data", str(yaml), "--epochs", "3", "--sos-start", "0", *run_args], a.repeats, work
            )
    if "c" in sections:
        key = f"c_{Path(a.model).stem}_{a.imgsz}_per_image"
        result[key] = per_image_costs(max(a.repeats, 5), a.device, a.batch, a.model, a.nc, a.imgsz)
    print(f"{'quantity':<58} {'value':>12}")
    for section, values in result.items():
        if isinstance(values, dict) and "phases" in values:
            print_account(section, values)
            continue
        if not isinstance(values, dict):
            print(f"{section:<58} {values!s:>12}")
            continue
        for key, value in values.items():
            if isinstance(value, float):
                print(f"{section + '.' + key:<58} {value:>12.4g}")
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
