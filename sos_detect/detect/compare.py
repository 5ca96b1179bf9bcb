"""`sos-detect compare`: per-epoch curves of a baseline and SOS runs overlaid, shift epochs marked.

Panels: val mAP50, val mAP50-95, the head's output-conv norm and every logged Hessian trace `sos/trace_X`.
A group of runs (one arm over several seeds) is drawn as its mean with a band of ± one sample standard
deviation over runs; a single run's trace carries its own Hutchinson standard error (`sos/trace_X_se`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sos_detect.core.stats import mean_std
from sos_detect.detect.plots import (
    epochs_without_sos,
    pyplot,
    read_results,
    save_figure,
    shift_epochs,
    trace_columns,
    trace_label,
)

PANELS = {
    "metrics/mAP50(B)": ("val mAP50", "mAP50"),
    "metrics/mAP50-95(B)": ("val mAP50-95", "mAP50-95"),
    "sos/head_norm": ("head output-conv norm (EMA)", "‖W‖ (Frobenius)"),
}


@dataclass
class Curve:
    """One plotted line: epochs, values (the mean over runs), error (std over runs, or the trace's standard
    error for a single run; 0 where none), the epochs marked as shifted, and the number of runs."""

    epochs: list[int]
    values: list[float]
    error: list[float]
    shifts: list[int]
    runs: int
    without_sos: list[int] = field(default_factory=list)  # epochs a plain Ultralytics resume trained


def group_curve(runs: Sequence[Path], column: str) -> Curve | None:
    """The column over the epochs all runs share (NaN-free epochs only); None when no run logged it."""
    tables = [read_results(r) for r in runs]
    if not all(column in t for t in tables):
        return None
    length = min(len(t[column]) for t in tables)
    epochs, values, error = [], [], []
    for i in range(length):
        vals = [t[column][i] for t in tables]
        if any(math.isnan(v) for v in vals):
            continue
        mean, std = mean_std(vals)
        if len(runs) == 1:
            se = tables[0].get(f"{column}_se", [math.nan] * length)[i]
            std = 0.0 if math.isnan(se) else se
        epochs.append(int(tables[0]["epoch"][i]))
        values.append(mean)
        error.append(std)
    if not epochs:
        return None
    plain = [e for e in epochs_without_sos(runs[0]) if e in set(epochs)]
    return Curve(epochs, values, error, [e for e in shift_epochs(runs[0]) if e in set(epochs)], len(runs), plain)


def compare_runs(
    groups: Mapping[str, Sequence[str | Path]], path: str | Path, title: str | None = None
) -> dict[str, dict[str, Curve]]:
    """Draw every panel with one curve per group (label → run folders) into `path`; return the plotted data
    as {column: {label: Curve}}. Groups whose runs never shifted are drawn as baselines (black, dashed)."""
    groups = {label: [Path(r) for r in runs] for label, runs in groups.items()}
    for runs in groups.values():
        for r in runs:
            if not (r / "results.csv").is_file():
                raise FileNotFoundError(f"{r}: no results.csv (not an Ultralytics run folder)")
            try:
                epochs = read_results(r).get("epoch")
            except (ValueError, TypeError) as err:  # a cell that is no number, a row cut short
                raise ValueError(f"{r / 'results.csv'}: not an Ultralytics results table ({err})") from None
            if not epochs:
                raise ValueError(f"{r / 'results.csv'}: no epoch logged (the run stopped before its first epoch ended)")
    columns = list(PANELS)
    for runs in groups.values():
        for r in runs:
            columns += [c for c in trace_columns(read_results(r)) if c not in columns]
    data = {c: {label: curve for label, runs in groups.items() if (curve := group_curve(runs, c))} for c in columns}
    data = {c: curves for c, curves in data.items() if curves}
    if not data:
        raise ValueError(f"{', '.join(map(str, runs))}: no epoch with a value in any plotted column")
    plt = pyplot()
    ncols = min(3, len(data))
    nrows = math.ceil(len(data) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.3 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(data) :]:
        ax.set_visible(False)
    colours = itertools.cycle(f"C{i}" for i in range(10))  # one colour per SOS group; baselines black
    style = {}
    for label, runs in groups.items():
        baseline = not any(shift_epochs(r) for r in runs)
        style[label] = ("black", "--") if baseline else (next(colours), "-")
    for ax, (column, curves) in zip(axes.flat, data.items(), strict=False):
        for label, c in curves.items():
            colour, line = style[label]
            name = label if c.runs == 1 else f"{label} (mean of {c.runs})"
            if c.runs == 1 and column not in PANELS:
                ax.errorbar(
                    c.epochs, c.values, yerr=c.error, color=colour, ls=line, marker="o", ms=3, capsize=3, label=name
                )
            else:
                ax.plot(c.epochs, c.values, color=colour, ls=line, marker="o", ms=3, label=name)
                if c.runs > 1:
                    lo = [v - e for v, e in zip(c.values, c.error, strict=True)]
                    hi = [v + e for v, e in zip(c.values, c.error, strict=True)]
                    ax.fill_between(c.epochs, lo, hi, color=colour, alpha=0.15, lw=0)
            marks = [(e, v) for e, v in zip(c.epochs, c.values, strict=True) if e in set(c.shifts)]
            if marks:
                ax.plot(*zip(*marks, strict=True), "v", color=colour, ms=7, ls="none")
            plain = [(e, v) for e, v in zip(c.epochs, c.values, strict=True) if e in set(c.without_sos)]
            if plain:
                ax.plot(*zip(*plain, strict=True), "x", color=colour, ms=8, mew=2, ls="none")
        head, ylabel = PANELS.get(column, (f"Hessian trace, {trace_label(column)}", "tr(H)"))
        ax.set(title=head, xlabel="epoch", ylabel=ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    (marker,) = axes[0][0].plot([], [], "v", color="0.3", ls="none")
    notes = ["validated after a shift"]
    if any(c.without_sos for curves in data.values() for c in curves.values()):
        (cross,) = axes[0][0].plot([], [], "x", color="0.3", mew=2, ls="none")
        handles, labels = [*handles, cross], [*labels, "trained without SOS (plain Ultralytics resume)"]
    if any(len(runs) > 1 for runs in groups.values()):
        notes.append("bands: ± 1 std over runs")
    if any(c not in PANELS for c in data):
        notes.append("trace error bars: Hutchinson std. error")
    fig.legend(
        [*handles, marker], [*labels, "; ".join(notes)], loc="lower center", ncol=min(len(labels) + 1, 4), fontsize=8
    )
    if title:
        fig.suptitle(title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, Path(path), plt, rect=(0, (0.5 + 0.25 * (len(labels) // 4)) / (3.3 * nrows + 0.6), 1, 1))
    return data


# Training arguments that name or place a run rather than change what it trains.
NOT_DIFFERENCES = {"name", "project", "save_dir", "exist_ok", "resume", "device", "workers", "verbose", "plots"}


def run_args(run: str | Path) -> dict[str, Any]:
    """A run's training arguments: its args.yaml with the SOS options of sos_args.yaml beside it; {} when it has
    neither."""
    import yaml

    args = {}
    for name in ("args.yaml", "sos_args.yaml"):
        path = Path(run) / name
        args |= (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return args


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """A legend label per run saying what differs between the runs: `folder: KEY=VALUE, …` for the training
    arguments (args.yaml) whose values differ (at most 3 shown), the folder alone where none differ. Folders are
    parent/name where names repeat."""
    paths = [Path(r).resolve() for r in runs]
    names = [p.name for p in paths]
    folders = [p.name if names.count(p.name) == 1 else f"{p.parent.name}/{p.name}" for p in paths]
    args = [run_args(p) for p in paths]
    keys = [k for k in dict.fromkeys(k for a in args for k in a) if k not in NOT_DIFFERENCES]
    differ = [k for k in keys if len({repr(a.get(k)) for a in args}) > 1] if len(runs) > 1 else []
    labels = []
    for folder, a in zip(folders, args, strict=True):
        shown = [f"{k}={a.get(k)}" for k in differ[:3]] + (["…"] if len(differ) > 3 else [])
        labels.append(f"{folder}: {', '.join(shown)}" if shown else folder)
    return labels
