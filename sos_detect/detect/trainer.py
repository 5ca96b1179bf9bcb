"""SOS inside Ultralytics training: `SOSTrainerMixin`, which any Ultralytics trainer of a model with a Detect head
takes (`class X(SOSTrainerMixin, SegmentationTrainer)`), and the four trainers made with it — detect, segment, pose,
OBB (`sos_trainer(task)`).

Where the shift happens: `sos_shift`, at the end of an epoch before its validation and checkpoint (sos_order="end"),
or at the start of the next epoch, which then trains (sos_order="start", the paper's Algorithm 1). By default
(sos_capture="train") the head convs' input Grams come from the epoch's own last training passes: hooks are on only
for the last ⌈sos_images / images per batch⌉ batches, so no extra forward pass is made.

What survives DDP re-spawn and resume: Ultralytics rebuilds the trainer from `vars(args)` in a generated script that
imports the trainer class by name (so the classes are module-level), and callbacks added with `add_callback` are
lost there; every SOS option is therefore a key of `self.args` and every SOS step a method of the trainer.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ultralytics.cfg import cfg2dict
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.obb import OBBTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, YAML, IterableSimpleNamespace
from ultralytics.utils.torch_utils import unwrap_model

from sos_detect.core.apply import first_moments, rank_rows, shift_targets
from sos_detect.core.capture import GramCapture, as_v
from sos_detect.core.options import SOS_DEFAULTS, ShiftConfig, check_sos_args
from sos_detect.core.record import ShiftReport, append_log, keep_log_epochs, results_columns
from sos_detect.detect.detector_shift import (
    CaptureSet,
    HeldOutChange,
    build_capture_set,
    detection_loss,
    layer_changes,
    layer_inputs,
    shift_detector,
)
from sos_detect.detect.flatness import detector_traces
from sos_detect.detect.heads import detect_head, detect_head_layers, frozen_layers, head_task, missing_kind
from sos_detect.detect.plots import head_norm, plot_run

SOS_LOG, SOS_ARGS = "sos_log.jsonl", "sos_args.yaml"
LEGACY = {"sos_ema": "grams", "sos_order": "end"}  # what runs saved before these options existed did
RESUME_HINT = "resume with SOS: sos-detect train --resume LAST_PT, or YOLO(LAST_PT).train(resume=True, trainer={})"


class SOSTrainerMixin:
    """Shifts the head's 1×1 output convs of the model *and* its EMA during training; mixed into an Ultralytics
    trainer whose model has a Detect head (detect, segment, pose, OBB), before it in the bases.

    Options are `sos_*` keys in `self.args` (see SOS_DEFAULTS), so they survive DDP re-spawn and resume. The Grams
    of epoch e (0-based) are captured when e ≥ sos_start and (e − sos_start) % sos_every == 0 (and in the final
    epoch when sos_final, order "end"); the shift follows at that epoch's end (order "end") or at the next epoch's
    start (order "start"). Frozen head convs (freeze=) are never shifted.
    """

    task = "detect"  # the task the trainer trains; a model of another task is refused

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        cfg = {**SOS_DEFAULTS, **cfg2dict(cfg)}
        check_sos_args(SimpleNamespace(**{**cfg, **(overrides or {})}))  # before anything is written to disk
        given = (overrides or {}).get("task")  # Model.train passes the model's task
        if given and given != self.task:
            raise TypeError(f"task={given}: {type(self).__name__} trains task={self.task}; use {_trainer_hint(given)}")
        missing = missing_kind({**cfg, **(overrides or {})}["sos_heads"], self.task)
        if missing:
            raise ValueError(f"sos_heads: {missing}")
        super().__init__(cfg, overrides, _callbacks)
        check_sos_args(self.args)  # again: a resumed run takes its options from the checkpoint
        self.sos_config = ShiftConfig.of(self.args)  # what every shift of this run does
        self._capture_set: CaptureSet | None = None  # letterboxed training images (eval capture, loss, Hessian)
        self._val_set: CaptureSet | None = None  # letterboxed validation images (sos_heldout_images)
        self._train_capture: GramCapture | None = None  # hooks on the training model during an epoch's last batches
        self._shift_next = False  # order "start": a shift is due before the next epoch trains …
        self._next_capture: GramCapture | None = None  # … on these Grams (None with sos_capture="eval")
        self._batch = 0
        self._held_out: HeldOutChange | None = None
        self._pending: list[dict[str, Any]] = []  # sos_log entries of this epoch, written with its metrics
        self._sos_row = self._empty_row()
        if RANK in {-1, 0}:
            self._write_run_args()

    def _write_run_args(self) -> None:
        """args.yaml as plain Ultralytics writes it (`yolo train cfg=RUN/args.yaml` replays the run without SOS) and
        the SOS options beside it in sos_args.yaml (`sos-detect train cfg=RUN/args.yaml` replays it whole). A new
        run in a reused folder (exist_ok) starts its SOS log afresh, as Ultralytics starts its results.csv."""
        YAML.save(self.save_dir / "args.yaml", {k: v for k, v in vars(self.args).items() if k not in SOS_DEFAULTS})
        YAML.save(self.save_dir / SOS_ARGS, {k: getattr(self.args, k) for k in SOS_DEFAULTS})
        if not self.resume:
            (self.save_dir / SOS_LOG).unlink(missing_ok=True)

    # -- Ultralytics extension points --------------------------------------------------------------
    def check_resume(self, overrides):
        """Ultralytics' resume, plus the SOS options: the checkpoint keeps them on its model (`sos_args`), not in its
        train_args, so that plain Ultralytics can resume, fine-tune and validate it too. A resumed checkpoint
        continues in the run folder it lives in (RUN/weights/last.pt → RUN), copied or not."""
        super().check_resume(overrides)
        if not self.resume:
            return
        from ultralytics.utils.patches import torch_load

        last = Path(self.args.resume)
        ckpt = torch_load(last, map_location="cpu")
        saved = getattr(ckpt.get("ema") or ckpt.get("model"), "sos_args", None) or {}
        if saved:  # a checkpoint from before an option existed ran as its LEGACY value
            saved = {**LEGACY, **saved}
        for key, default in SOS_DEFAULTS.items():
            setattr(self.args, key, saved.get(key, getattr(self.args, key, default)))
        ignored = [k for k, v in (overrides or {}).items() if k in SOS_DEFAULTS and v != getattr(self.args, k)]
        if ignored:
            LOGGER.warning(
                f"Resume ignores {ignored}, using the checkpoint's SOS options. Start a new run to change them."
            )
        if last.parent.name == "weights":
            self.args.save_dir = str(last.parent.parent)

    def resume_training(self, ckpt):
        """Resume, and cut results.csv and sos_log.jsonl back to the checkpoint's epochs: an epoch logged after its
        checkpoint was written (an interruption in between) is trained and logged again, not twice."""
        super().resume_training(ckpt)
        if self.resume and RANK in {-1, 0}:
            keep_epochs(self.csv, self.save_dir / SOS_LOG, self.start_epoch)
        if self.resume and self.args.sos and self.args.sos_order == "start" and self._shift_due(self.start_epoch - 1):
            LOGGER.warning(
                f"SOS: the shift before epoch {self.start_epoch + 1} is skipped (its Grams were captured "
                "before the interruption); the schedule goes on from the next one"
            )

    def save_model(self):
        """Ultralytics' checkpoints, with train_args free of sos_* keys (plain Ultralytics rejects unknown keys when
        it resumes) and the SOS options on the saved model as `sos_args`, where this trainer finds them. Plain
        `YOLO(last.pt).train(resume=True)` takes Ultralytics' own trainer and continues without SOS (its results.csv
        rows then lack the sos/ columns; `compare` marks them): `sos_resume` on the model says how to keep SOS."""
        self.ema.ema.sos_args = {k: getattr(self.args, k) for k in SOS_DEFAULTS}
        self.ema.ema.sos_resume = RESUME_HINT.format(type(self).__name__)
        with self._plain_args():
            return super().save_model()

    def get_model(self, cfg=None, weights=None, verbose=True):
        """The task's model, refused unless its head is a Detect of this trainer's task."""
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        task = head_task(detect_head(model))
        if task != self.task:
            raise TypeError(f"a {task} model: {type(self).__name__} trains task={self.task}; use {_trainer_hint(task)}")
        return model

    def build_optimizer(self, *args, **kwargs):
        """Ultralytics' optimiser, refused at the start when SOS does not know how to map its state in a shift; the
        head convs freeze= keeps out of every shift are said here, once (Ultralytics has applied freeze= by now)."""
        optimizer = super().build_optimizer(*args, **kwargs)
        if self.args.sos:
            first_moments(optimizer)
            frozen = self._frozen
            if frozen:
                LOGGER.info(f"SOS: {', '.join(frozen)} not shifted: frozen (freeze={self.args.freeze})")
        return optimizer

    def get_validator(self):
        """The stock validator, built from args without the sos_* keys (its own arg check rejects them)."""
        with self._plain_args():
            return super().get_validator()

    def run_callbacks(self, event: str):
        """Capture during an epoch's last batches, shift at its end (methods, so they survive DDP re-spawn)."""
        if event == "on_train_epoch_start":
            self._stop_train_capture()
            self._batch = 0
            if self._shift_next:  # order "start": shift before this epoch trains
                captured, self._shift_next, self._next_capture = self._next_capture, False, None
                self.sos_shift(self.epoch, captured)
        elif event == "on_train_batch_start":
            self._maybe_start_train_capture()
            self._batch += 1
        elif event == "on_train_epoch_end":
            self._epoch_end()
        elif event == "on_train_end" and RANK in {-1, 0} and self.args.plots:
            for path in plot_run(self.save_dir):
                self.on_plot(path)
        super().run_callbacks(event)

    def save_metrics(self, metrics: dict):
        """results.csv and the loggers' `trainer.metrics` get the sos/ figures; sos_log.jsonl gets this epoch's
        shifts, with the EMA's output change measured on the validation images it was not solved on."""
        if self._held_out is not None:
            change = self._held_out.finish()
            self._held_out = None
            self._sos_row["sos/ema_heldout_change"] = change
            LOGGER.info(f"SOS epoch {self.epoch + 1} ema: output change {change:.2e} on the validation images")
            for entry in self._pending:
                if entry["target"] == "ema":
                    entry["heldout_change"] = change
        self._write_log()
        self.metrics = {**(self.metrics or {}), **self._sos_row}
        super().save_metrics({**metrics, **self._sos_row})
        self._sos_row = self._empty_row()

    # -- SOS -----------------------------------------------------------------------------------------
    @property
    def sos_start(self) -> int:
        start = self.args.sos_start
        return math.ceil(self.args.warmup_epochs) if start is None else int(start)

    def _shift_due(self, epoch: int) -> bool:
        """Whether epoch's Grams are captured for a shift (after it with order "end", before the next with "start")."""
        if not self.args.sos:
            return False
        last = epoch + 1 >= self.epochs
        if self.args.sos_order == "start":
            return not last and epoch >= self.sos_start and (epoch - self.sos_start) % self.args.sos_every == 0
        scheduled = epoch >= self.sos_start and (epoch - self.sos_start) % self.args.sos_every == 0
        return scheduled or (self.args.sos_final and last)

    def _shifted_layers(self, model) -> dict:
        """The head convs to shift: those of sos_heads that training updates (freeze= ones are left out)."""
        return detect_head_layers(model, self.args.sos_heads, self._frozen)

    @property
    def _frozen(self) -> list[str]:
        return frozen_layers(detect_head_layers(unwrap_model(self.model), self.args.sos_heads))

    def _maybe_start_train_capture(self) -> None:
        """Hooks on for the last ⌈sos_images / images per batch⌉ batches of an epoch that ends with a shift."""
        if self.args.sos_capture != "train" or self._train_capture is not None or not self._shift_due(self.epoch):
            return
        batches = len(self.train_loader)
        per_batch = self.batch_size * max(self.world_size, 1)
        last = len(self.train_loader.dataset) * max(self.world_size, 1) - (batches - 1) * per_batch
        window = min(batches, 1 + math.ceil(max(self.args.sos_images - last, 0) / per_batch))
        if self._batch >= batches - window:
            rows = rank_rows(self.sos_config.sampled_rows)  # each rank samples its share of the b rows
            layers = self._shifted_layers(unwrap_model(self.model))
            if not layers:  # all frozen
                return
            self._train_capture = GramCapture(layers, rows=rows, seed=self.args.seed + self.epoch, skip_nonfinite=True)
            self._train_capture.start()

    def _stop_train_capture(self) -> GramCapture | None:
        capture, self._train_capture = self._train_capture, None
        if capture is not None:
            capture.stop()
        return capture

    def _epoch_end(self) -> None:
        capture = self._stop_train_capture()
        if self._shift_due(self.epoch):
            if self.args.sos_order == "end":
                self.sos_shift(self.epoch, capture)
            else:
                self._shift_next, self._next_capture = True, capture
        self._sos_row["sos/head_norm"] = head_norm(self.ema.ema)
        every = self.args.sos_hessian_every
        if every and ((self.epoch + 1) % every == 0 or self.epoch + 1 >= self.epochs):
            self._sos_row.update(self.sos_hessian())
        if self._held_out is not None:
            self._held_out.start()  # hooks on the EMA's heads: the next forward passes are the validation's

    def sos_shift(self, epoch: int, capture: GramCapture | None = None) -> dict[str, ShiftReport]:
        """Shift the model (with its optimiser state) on the Grams of the epoch's last training passes (`capture`,
        sos_capture="train") or on its own eval pass over sampled training images ("eval"); then the EMA as
        sos_ema says: on its own eval pass over sos_ema_images images ("own"), on the model's capture ("grams"), or
        not at all ("follow": the model's shift reaches it through the EMA update)."""
        start = time.perf_counter()
        model, ema, frozen = unwrap_model(self.model), self.ema.ema, self._frozen
        ema_heads = detect_head_layers(ema, self.args.sos_heads, frozen)
        if not ema_heads:
            LOGGER.warning(
                f"SOS epoch {epoch + 1}: every head conv of sos_heads is frozen ({', '.join(frozen)}); no shift"
            )
            return {}
        ema_before = {n: as_v(m.weight.detach()).clone() for n, m in ema_heads.items()}
        probes = self._heldout_probes({"model": model, **({"ema": ema} if self.args.sos_ema != "follow" else {})})
        loss_batches = None
        if self.args.sos_loss_tol is not None or self.args.sos_hessian_every:
            loss_batches = self._capture_sample(self.args.sos_images, epoch)
        config = self.sos_config
        nets = {"model": (model, self.optimizer), **({"ema": (ema, None)} if self.args.sos_ema == "grams" else {})}
        if self.args.sos_capture == "train":
            if capture is None or capture.images == 0:
                LOGGER.warning(f"SOS epoch {epoch + 1}: no training rows were captured (epoch cut short?); no shift")
                return {}
            loss_fn = detection_loss(loss_batches, self.device) if loss_batches else None
            targets = {t: (self._shifted_layers(net), net, opt) for t, (net, opt) in nets.items()}
            reports = shift_targets(capture, targets, config, loss_fn=loss_fn)
            images = {t: (capture.images * max(self.world_size, 1), "train") for t in reports}
            skipped = max(capture.skipped.values())
        else:
            batches = self._capture_sample(self.args.sos_images, epoch)
            reports = {t: self._shift_on(net, opt, batches, epoch, config) for t, (net, opt) in nets.items()}
            images = dict.fromkeys(reports, (sum(b["img"].shape[0] for b in batches), "eval"))
            skipped = 0
        if self.args.sos_ema == "own":
            batches = self._capture_sample(self.args.sos_ema_images, epoch)
            reports["ema"] = self._shift_on(ema, None, batches, epoch, config)
            images["ema"] = (sum(b["img"].shape[0] for b in batches) * max(self.world_size, 1), "eval")
        if RANK in {-1, 0} and "ema" in reports and reports["ema"].applied and self.args.sos_order == "end":
            self._held_out = HeldOutChange(ema_heads, ema_before, images=self.args.sos_images)  # in this validation
        heldout = {t: layer_changes(*probe) for t, probe in probes.items()}
        self._record(epoch, reports, images, skipped, frozen, time.perf_counter() - start, heldout)
        return reports

    def _heldout_probes(self, nets: dict[str, Any]) -> dict[str, tuple[dict, dict, dict]]:
        """Per network about to be shifted: its shifted layers, their input Grams on sos_heldout_images validation
        images (the same images at every shift) and their weights V before the shift (rank 0; none when off)."""
        if not self.args.sos_heldout_images or RANK not in {-1, 0}:
            return {}
        if self._val_set is None:
            self._val_set = self._letterboxed("val")
        batches = self._val_set.sample(self.args.sos_heldout_images, self.args.seed)
        probes = {}
        for target, net in nets.items():
            layers = self._shifted_layers(net)
            before = {n: as_v(m.weight.detach()).clone() for n, m in layers.items()}
            probes[target] = (layers, layer_inputs(net, layers, batches, self.device), before)
        return probes

    def _shift_on(self, net, optimizer, batches: list[dict[str, Any]], epoch: int, config: ShiftConfig) -> ShiftReport:
        """Shift one network's heads on its own eval pass over `batches` (shift_detector)."""
        measure = self.args.sos_loss_tol is not None or bool(self.args.sos_hessian_every)
        return shift_detector(
            net,
            batches,
            config,
            device=self.device,
            exclude=self._frozen,
            optimizer=optimizer,
            measure_loss=measure,
            seed=self.args.seed + epoch,
        )

    def sos_hessian(self) -> dict[str, float]:
        """Hessian traces of the EMA's detection loss on a fixed batch (sos/trace_X ± sos/trace_X_se): the cls head
        convs exact (closed form, se 0), the box head convs, the head (both) and the whole model by Hutch++."""
        batches = self._capture_sample(self.args.sos_hessian_images, 0)  # the same images each time
        traces = detector_traces(
            self.ema.ema, batches, self.device, max_probes=self.args.sos_hessian_probes, rtol=0.05, seed=self.args.seed
        )
        out = {}
        for what, est in traces.items():
            out[f"sos/trace_{what}"], out[f"sos/trace_{what}_se"] = est.value, est.stderr
        return out

    def _record(
        self,
        epoch: int,
        reports: dict[str, ShiftReport],
        images: dict[str, tuple[int, str]],
        skipped: int,
        frozen: list[str],
        seconds: float,
        heldout: dict[str, dict[str, float]],
    ) -> None:
        self._sos_row.update({**results_columns(reports), "sos/seconds": seconds})
        when = "before" if self.args.sos_order == "start" else "after"
        self._pending = [
            {
                "epoch": epoch + 1,
                "target": t,
                "order": self.args.sos_order,
                "capture": images[t][1],
                "images": images[t][0],
                "skipped_batches": skipped,
                "frozen": frozen,
            }
            | r.to_dict()
            for t, r in reports.items()
        ]
        for entry in self._pending:  # each layer's change on validation images (sos_heldout_images)
            for layer in entry["layers"]:
                layer["heldout_change"] = heldout.get(entry["target"], {}).get(layer["name"])
        for target, report in reports.items():
            count, kind = images[target]
            LOGGER.info(
                f"SOS epoch {epoch + 1} {target} ({when} its training): norm ratio {report.norm_ratio:.4f}, max output "
                f"change {report.max_out_change:.2e} on the {count} {kind}-pass images solved on, "
                f"{'applied' if report.applied else 'rolled back: ' + report.reason}"
            )

    def _write_log(self) -> None:
        if self._pending and RANK in {-1, 0}:
            append_log(self.save_dir / SOS_LOG, self._pending)
        self._pending = []

    def _capture_sample(self, images: int, seed_offset: int) -> list[dict[str, Any]]:
        """This rank's share of `images` letterboxed training images, seeded by args.seed + seed_offset."""
        if self._capture_set is None:
            self._capture_set = self._letterboxed("train")
        world = max(self.world_size, 1)
        return self._capture_set.sample(images, self.args.seed + seed_offset, max(RANK, 0), world)

    def _letterboxed(self, split: str) -> CaptureSet:
        """The data split's images letterboxed at imgsz without augmentation (capture, loss, Hessian, held-out)."""
        stride = max(int(unwrap_model(self.model).stride.max()), 32)
        with self._plain_args():
            return build_capture_set(self.args, self.data, stride, self.batch_size, split=split)

    def _empty_row(self) -> dict[str, float]:
        """Every sos/ column at its no-shift value (NaN: not measured this epoch)."""
        row = {
            "sos/shifted": 0.0,
            "sos/norm_ratio": 1.0,
            "sos/ema_norm_ratio": 1.0,
            "sos/out_change": 0.0,
            "sos/ema_heldout_change": math.nan,
            "sos/seconds": 0.0,
            "sos/head_norm": math.nan,
        }
        if self.args.sos_hessian_every:
            row.update({f"sos/trace_{w}{se}": math.nan for w in ("cls", "box", "head", "all") for se in ("", "_se")})
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


class SOSDetectionTrainer(SOSTrainerMixin, DetectionTrainer):
    """Ultralytics' DetectionTrainer with SOS."""


class SOSSegmentationTrainer(SOSTrainerMixin, SegmentationTrainer):
    """Ultralytics' SegmentationTrainer with SOS (box and cls convs by default; sos_heads may add mask)."""

    task = "segment"


class SOSPoseTrainer(SOSTrainerMixin, PoseTrainer):
    """Ultralytics' PoseTrainer with SOS (box and cls convs by default; sos_heads may add kpt)."""

    task = "pose"


class SOSOBBTrainer(SOSTrainerMixin, OBBTrainer):
    """Ultralytics' OBBTrainer with SOS (box and cls convs by default; sos_heads may add angle)."""

    task = "obb"


SOS_TRAINERS = {t.task: t for t in (SOSDetectionTrainer, SOSSegmentationTrainer, SOSPoseTrainer, SOSOBBTrainer)}


def sos_trainer(task: str) -> type:
    """The SOS trainer of an Ultralytics task (detect, segment, pose, obb)."""
    if task not in SOS_TRAINERS:
        raise TypeError(f"task={task}: SOS trains {', '.join(SOS_TRAINERS)} models (a YOLO Detect head)")
    return SOS_TRAINERS[task]


def _trainer_hint(task: str) -> str:
    return f"{SOS_TRAINERS[task].__name__} (sos_trainer('{task}'))" if task in SOS_TRAINERS else "a detection model"


def keep_epochs(results_csv: Path, sos_log: Path, epochs: int) -> None:
    """Keep the rows of epochs 1..`epochs` in results.csv and sos_log.jsonl (those a checkpoint holds)."""
    if results_csv.is_file():
        lines = results_csv.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if float(line.split(",", 1)[0]) <= epochs]
        results_csv.write_text("".join(kept))
    keep_log_epochs(sos_log, epochs)
