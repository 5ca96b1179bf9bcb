"""SOSDetectionTrainer: Ultralytics' DetectionTrainer with periodic optimum shifting of the head convs."""

from __future__ import annotations

import contextlib
import json
import math
import time
from types import SimpleNamespace

from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, IterableSimpleNamespace
from ultralytics.utils.torch_utils import unwrap_model

from sos_detect.detect.heads import detect_head_layers
from sos_detect.detect.plots import head_norm, plot_run
from sos_detect.detect.shifting import CaptureSet, build_capture_set, detection_loss_tensor, shift_detector
from sos_detect.hessian import gradients_enabled, hessian_trace
from sos_detect.layers import ShiftReport
from sos_detect.options import SOS_DEFAULTS, check_sos_args


class SOSDetectionTrainer(DetectionTrainer):
    """DetectionTrainer that shifts the head's 1×1 output convs of the model *and* its EMA at epoch ends.

    Options are `sos_*` keys in `self.args` (see SOS_DEFAULTS), so they survive DDP re-spawn and resume.
    A shift runs at the end of epoch e (0-based) when e ≥ sos_start and (e − sos_start) % sos_every == 0,
    and after the final epoch when sos_final; it precedes that epoch's validation and checkpoint.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        cfg = {**SOS_DEFAULTS, **cfg2dict(cfg)}
        check_sos_args(SimpleNamespace(**{**cfg, **(overrides or {})}))  # before anything is written to disk
        super().__init__(cfg, overrides, _callbacks)
        check_sos_args(self.args)  # again: a resumed run takes its options from the checkpoint
        self._capture: CaptureSet | None = None
        self._sos_row = self._empty_row()

    # -- Ultralytics extension points --------------------------------------------------------------
    def get_validator(self):
        """The stock validator, built from args without the sos_* keys (its own arg check rejects them)."""
        with self._plain_args():
            return super().get_validator()

    def run_callbacks(self, event: str):
        """Shift at the epoch end, before validation and saving (a method, so it survives DDP re-spawn)."""
        if event == "on_train_epoch_end":
            if self._shift_due(self.epoch):
                self.sos_shift(self.epoch)
            self._sos_row["sos/head_norm"] = head_norm(self.ema.ema)
            every = self.args.sos_hessian_every
            if every and ((self.epoch + 1) % every == 0 or self.epoch + 1 >= self.epochs):
                self._sos_row.update(self.sos_hessian())
        if event == "on_train_end" and RANK in {-1, 0}:
            plot_run(self.save_dir)
        super().run_callbacks(event)

    def save_metrics(self, metrics: dict):
        """results.csv with the sos/ columns (constant across epochs; zeros where no shift ran)."""
        super().save_metrics({**metrics, **self._sos_row})
        self._sos_row = self._empty_row()

    # -- SOS -----------------------------------------------------------------------------------------
    @property
    def sos_start(self) -> int:
        start = self.args.sos_start
        return math.ceil(self.args.warmup_epochs) if start is None else int(start)

    def _shift_due(self, epoch: int) -> bool:
        if not self.args.sos:
            return False
        scheduled = epoch >= self.sos_start and (epoch - self.sos_start) % self.args.sos_every == 0
        return scheduled or (self.args.sos_final and epoch + 1 >= self.epochs)

    def sos_shift(self, epoch: int) -> dict[str, ShiftReport]:
        """Shift the model (with its optimiser state) and the EMA, each on its own features."""
        start = time.perf_counter()
        if self._capture is None:
            self._build_capture()
        world = max(self.world_size, 1)
        batches = self._capture.sample(self.args.sos_images, self.args.seed + epoch, max(RANK, 0), world)
        targets = {"model": (unwrap_model(self.model), self.optimizer), "ema": (self.ema.ema, None)}
        reports = {}
        for name, (model, optimizer) in targets.items():
            reports[name] = shift_detector(
                model,
                batches,
                device=self.device,
                heads=self.args.sos_heads,
                mode=self.args.sos_mode,
                tau=self.args.sos_tau,
                rows=self.args.sos_rows,
                optimizer=optimizer,
                loss_tol=self.args.sos_loss_tol,
                measure_loss=self.args.sos_hessian_every > 0,
                seed=self.args.seed + epoch,
            )
        seconds = time.perf_counter() - start
        applied = [r for r in reports.values() if r.applied]
        self._sos_row.update(
            {
                "sos/shifted": float(len(applied) == len(reports)),
                "sos/norm_ratio": reports["model"].norm_ratio if reports["model"].applied else 1.0,
                "sos/ema_norm_ratio": reports["ema"].norm_ratio if reports["ema"].applied else 1.0,
                "sos/out_change": max((r.max_out_change for r in applied), default=0.0),
                "sos/seconds": seconds,
            }
        )
        if RANK in {-1, 0}:
            self._log_shift(epoch, reports)
        return reports

    def sos_hessian(self) -> dict[str, float]:
        """Hutchinson trace of the EMA's detection loss on a fixed batch: head convs and the whole model."""
        if self._capture is None:
            self._build_capture()
        batches = self._capture.sample(self.args.sos_hessian_images, self.args.seed)  # the same images each time
        model = self.ema.ema
        heads = [m.weight for m in detect_head_layers(model, self.args.sos_heads).values()]
        out = {}
        for key, params in (("sos/trace_head", heads), ("sos/trace_all", list(model.parameters()))):
            with gradients_enabled(params):
                est = hessian_trace(
                    lambda: detection_loss_tensor(model, batches, self.device),
                    params,
                    max_probes=self.args.sos_hessian_probes,
                    rtol=0.05,
                    seed=self.args.seed,
                )
            out[key] = est.value
        return out

    def _log_shift(self, epoch: int, reports: dict[str, ShiftReport]) -> None:
        with open(self.save_dir / "sos_log.jsonl", "a", encoding="utf-8") as f:
            for target, report in reports.items():
                entry = {"epoch": epoch + 1, "target": target, **report.to_dict()}
                f.write(json.dumps(entry) + "\n")
        for target, report in reports.items():
            LOGGER.info(
                f"SOS epoch {epoch + 1} {target}: norm ratio {report.norm_ratio:.4f}, "
                f"max output change {report.max_out_change:.2e}, "
                f"{'applied' if report.applied else 'rolled back: ' + report.reason}"
            )

    def _build_capture(self) -> None:
        stride = max(int(unwrap_model(self.model).stride.max()), 32)
        with self._plain_args():
            self._capture = build_capture_set(self.args, self.data, stride, self.batch_size)

    def _empty_row(self) -> dict[str, float]:
        """Every sos/ column at its no-shift value (NaN: not measured this epoch)."""
        row = {
            "sos/shifted": 0.0,
            "sos/norm_ratio": 1.0,
            "sos/ema_norm_ratio": 1.0,
            "sos/out_change": 0.0,
            "sos/seconds": 0.0,
            "sos/head_norm": math.nan,
        }
        if self.args.sos_hessian_every:
            row.update({"sos/trace_head": math.nan, "sos/trace_all": math.nan})
        return row

    @contextlib.contextmanager
    def _plain_args(self):
        """Temporarily hide the sos_* keys from code that re-checks args against Ultralytics' defaults."""
        full = self.args
        self.args = IterableSimpleNamespace(**{k: v for k, v in vars(full).items() if k not in SOS_DEFAULTS})
        try:
            yield
        finally:
            self.args = full
