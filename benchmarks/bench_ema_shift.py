"""How to shift the EMA: its own eval capture, or the model's training-pass Grams? Paired, from the same state.

At every shift of a real run (the main job's settings: YOLOv5n, embedded data, 320 px, SOS every epoch from epoch 1),
before the trainer shifts, the EMA is copied and shifted on
  (A_k) its own eval pass over k letterboxed training images (sos_capture=eval), k = 8 and all 37;
and the trainer then shifts it on
  (B)   the model's Grams of the epoch's last training passes (sos_ema=grams; the default is sos_ema=own, i.e. A8),
all with τ = 1e-4. Each variant's output change is measured on the 9 validation images (head inputs do not depend on
the head weights, so one Gram per layer serves every variant), with its norm ratio and the seconds it took.
With a second argument, the trainer captures that many training images per shift (sos_images; default 64, i.e.
all 37 here). Prints a table and writes benchmarks/results/bench_ema_shift[_imagesN].json.
Run: python benchmarks/bench_ema_shift.py [epochs] [sos_images]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sos_detect.core.runtime import configure

configure()
import torch  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from sos_detect.core.capture import GramCapture, as_v  # noqa: E402
from sos_detect.core.options import ShiftConfig  # noqa: E402
from sos_detect.core.solver import output_change  # noqa: E402
from sos_detect.detect import SOSDetectionTrainer  # noqa: E402
from sos_detect.detect.detector_shift import build_capture_set, shift_detector  # noqa: E402
from sos_detect.detect.embedded import EMBEDDED_YAML  # noqa: E402
from sos_detect.detect.heads import detect_head_layers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS: list[dict] = []


class Compare(SOSDetectionTrainer):
    def sos_shift(self, epoch, capture=None):
        ema = self.ema.ema
        before = {n: as_v(m.weight.detach()).clone() for n, m in detect_head_layers(ema).items()}
        variants, seconds, ratios = {}, {}, {}
        with self._plain_args():
            capture_set = build_capture_set(self.args, self.data, 32, self.batch_size)
        for k in (8, 37):
            copy_ = copy.deepcopy(ema)
            start = time.perf_counter()
            report = shift_detector(
                copy_, capture_set.sample(k, epoch), ShiftConfig(max_change=None), device=self.device
            )
            seconds[f"A{k}"] = time.perf_counter() - start
            ratios[f"A{k}"] = report.norm_ratio
            variants[f"A{k}"] = {n: as_v(m.weight.detach()).clone() for n, m in detect_head_layers(copy_).items()}
        start = time.perf_counter()
        reports = super().sos_shift(epoch, capture)
        seconds["B"] = reports["ema"].seconds
        ratios["B"] = reports["ema"].norm_ratio
        variants["B"] = {n: as_v(m.weight.detach()).clone() for n, m in detect_head_layers(ema).items()}
        grams = self._validation_grams(ema)
        ROWS.append(
            {
                "epoch": epoch + 1,
                **{
                    f"heldout_{v}": max(output_change(grams[n].gram, before[n], w[n]) for n in before)
                    for v, w in variants.items()
                },
                **{f"ratio_{v}": r for v, r in ratios.items()},
                **{f"seconds_{v}": s for v, s in seconds.items()},
            }
        )
        return reports

    def _validation_grams(self, model):
        capture = GramCapture(detect_head_layers(model))
        model.eval()
        with torch.no_grad(), capture:
            for batch in self.test_loader:
                model(batch["img"].to(self.device).float() / 255)
        return capture.full


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    images = int(sys.argv[2]) if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        YOLO("yolov5n.yaml").train(
            trainer=Compare,
            data=str(EMBEDDED_YAML),
            epochs=epochs,
            imgsz=320,
            batch=8,
            nbs=8,
            device="cpu",
            amp=False,
            workers=0,
            seed=0,
            plots=False,
            verbose=False,
            project=tmp,
            name="ema",
            sos_start=1,
            sos_ema="grams",  # (B): the trainer's own shift of the EMA
            **({"sos_images": images} if images else {}),
        )
    keys = [k for k in ROWS[0] if k != "epoch"]
    summary = {k: statistics.median(r[k] for r in ROWS) for k in keys}
    print(f"{'epoch':>5} " + " ".join(f"{k:>14}" for k in keys))
    for r in ROWS:
        print(f"{r['epoch']:>5} " + " ".join(f"{r[k]:>14.4g}" for k in keys))
    print(f"{'med':>5} " + " ".join(f"{summary[k]:>14.4g}" for k in keys))
    out = {"epochs": epochs, "tau": 1e-4, "sos_images": images or 64, "per_shift": ROWS, "median": summary}
    (RESULTS / f"bench_ema_shift{f'_images{images}' if images else ''}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
