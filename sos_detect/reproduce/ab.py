"""A/B harness: named arms of training options × seeds on any detection data YAML, paired by seed, resumable.

An arm is a name and the training options that make it differ (`base: sos=False`, `guarded-1e-3: sos_tau=1e-3`,
`paper-b32: sos_mode=paper, sos_rows=32`); every arm of a (model, seed) shares the common options and the seed,
so arm − baseline differences are paired. The first arm is the baseline. Regimes: from scratch, or fine-tuning
from one start shared by every arm — a given checkpoint, or one pretrained here once (from scratch, SOS off) on
a slice of the training images while the arms train on another slice.

The study's parts: ab_presets.py (configuration, presets, arm syntax, checks), ab_runs.py (one run: settings, data,
shared start, train / resume / read back, final metrics), ab_report.py (tables and statistics), ab_plots.py (the
curves and the effect plot), jobs.py (runs side by side); this module drives a study through them.
"""

from __future__ import annotations

import json
from pathlib import Path

from sos_detect.core.runs import write_csv
from sos_detect.reproduce.ab_plots import plot_curves, plot_effects
from sos_detect.reproduce.ab_presets import ABConfig, check_study
from sos_detect.reproduce.ab_report import STATISTICS_NOTE, aggregate
from sos_detect.reproduce.ab_runs import best_epoch_metrics, plan_runs, train_run
from sos_detect.reproduce.jobs import core_shares, run_tasks


def run_ab(cfg: ABConfig, out: str | Path, name: str = "ab", jobs: int = 1) -> list[Path]:
    """Train (or reuse, or resume) every model × seed × arm — `jobs` runs side by side, each in its own process
    pinned to its share of the cores (reproduce/jobs.py) — and write {name}.md, {name}.csv, the per-model curves
    {name}_curves_MODEL.png and the effect plot {name}_effect.png under `out`; return the written paths. A shared
    pretrained start is trained first, in this process."""
    check_study(cfg)
    core_shares(jobs)  # a --jobs this machine cannot pin: one line before anything trains
    out = Path(out).resolve()  # Ultralytics puts a relative project under its own runs folder
    out.mkdir(parents=True, exist_ok=True)
    plan, tasks = plan_runs(cfg, out)
    records = run_tasks(train_run, tasks, jobs, out / "logs")
    results = [
        {**where, **record, **best_epoch_metrics(Path(where["run"]))}
        for where, record in zip(plan, records, strict=True)
    ]
    curves = plot_curves(cfg, results, out, name)
    rows, table = aggregate(results, list(cfg.arms), cfg.reference)
    write_csv(out / f"{name}.csv", rows)
    plot_effects(rows, out / f"{name}_effect.png")
    _write_summary(cfg, out, name, table)
    return [out / f"{name}.md", out / f"{name}.csv", out / f"{name}_effect.png", *curves]


def _write_summary(cfg: ABConfig, out: Path, name: str, table: str) -> None:
    """out/{name}.md: the study's description, its tables (ab_report.aggregate), the statistics note and the
    settings it ran with."""
    settings = {
        "data": cfg.data,
        "common": cfg.train,
        "arms": cfg.arms,
        "weights": cfg.weights,
        "pretrain": cfg.pretrain.__dict__ if cfg.pretrain else None,
        "train_images": cfg.train_images,
        "val_images": cfg.val_images,
    }
    (out / f"{name}.md").write_text(
        f"# A/B comparison: {out.name}\n\n" + (f"{cfg.description}\n\n" if cfg.description else "") + f"{table}\n\n"
        f"{STATISTICS_NOTE}\n\n"
        f"Settings: `{json.dumps(settings)}`\n"
    )
