"""Run plots in the spirit of the paper's figures: Hessian trace (Figs 3/5), head norm (Fig 4), the loss change
at each shift, top eigenvalues before/after a shift (Fig 2); readers of a run's results.csv and shift log."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from torch import nn

from sos_detect.detect.heads import detect_head_layers


def head_norm(model: nn.Module) -> float:
    """Frobenius norm of all head output-conv weights together (the paper's last-layer norm)."""
    return math.sqrt(sum(float(m.weight.detach().float().norm()) ** 2 for m in detect_head_layers(model).values()))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_results(run_dir: str | Path) -> dict[str, list[float]]:
    """The columns of a run's results.csv (names stripped of padding) as floats; {} when there is none."""
    path = Path(run_dir) / "results.csv"
    rows = list(csv.DictReader(path.read_text().splitlines(), restval="nan")) if path.is_file() else []
    return {k.strip(): [float(r[k]) for r in rows] for k in (rows[0] if rows else ())}


def epochs_without_sos(run_dir: str | Path) -> list[int]:
    """1-based epochs a run logged without the sos/ columns its other epochs have: Ultralytics' own trainer wrote
    them (a plain `YOLO(last.pt).train(resume=True)`), so no SOS ran there."""
    cols = read_results(run_dir)
    shifted = cols.get("sos/shifted")
    if shifted is None or all(math.isnan(v) for v in shifted):
        return []
    return [int(e) for e, v in zip(cols["epoch"], shifted, strict=True) if math.isnan(v)]


def shift_epochs(run_dir: str | Path) -> list[int]:
    """1-based epochs whose validation followed an applied shift: from sos_log.jsonl (the model's entries),
    else from the `sos/shifted` column of results.csv."""
    log = Path(run_dir) / "sos_log.jsonl"
    if log.is_file():
        entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        return sorted({int(e["epoch"]) for e in entries if e.get("target") == "model" and e.get("applied", True)})
    cols = read_results(run_dir)
    return [int(e) for e, s in zip(cols.get("epoch", []), cols.get("sos/shifted", []), strict=False) if s > 0]


def trace_columns(columns: dict[str, list[float]]) -> list[str]:
    """The logged Hessian-trace columns (`sos/trace_X`, not their `_se` companions) holding any value."""
    return [
        k
        for k, v in columns.items()
        if k.startswith("sos/trace_") and not k.endswith("_se") and any(not math.isnan(x) for x in v)
    ]


def trace_label(column: str) -> str:
    part = column.removeprefix("sos/trace_")
    return {"head": "head output convs", "all": "whole model"}.get(part, part)


def plot_run(save_dir: str | Path) -> list[Path]:
    """Write sos_trace.png, sos_head_norm.png (runs that shifted) and sos_shift_loss.png where the run logged the
    data."""
    save_dir = Path(save_dir)
    written: list[Path] = []
    cols = read_results(save_dir)
    plt = pyplot()
    epochs = cols.get("epoch", [])
    traces = trace_columns(cols)
    if traces:
        fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.4), squeeze=False)
        for ax, key in zip(axes[0], traces, strict=True):
            se = cols.get(f"{key}_se", [math.nan] * len(epochs))
            pts = [(e, v, s) for e, v, s in zip(epochs, cols[key], se, strict=True) if not math.isnan(v)]
            err = [0.0 if math.isnan(p[2]) else p[2] for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, marker="o", ms=4, capsize=3)
            ax.set(title=f"Hessian trace, {trace_label(key)} (EMA)", xlabel="epoch", ylabel="tr(H) ± std. error")
        written.append(save_figure(fig, save_dir / "sos_trace.png", plt))
    norms = cols.get("sos/head_norm", [])
    shifted = set(shift_epochs(save_dir))
    if shifted and any(not math.isnan(v) for v in norms):  # a run without shifts (--no-sos) has nothing to show
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        ax.plot(epochs, norms, marker="o", ms=4, color="C0")
        marks = [(e, v) for e, v in zip(epochs, norms, strict=True) if int(e) in shifted]
        ax.plot(*zip(*marks, strict=True), "v", color="C3", ms=6, label="after a shift")
        ax.legend()
        ax.set(title="head output-conv weight norm (EMA)", xlabel="epoch", ylabel="‖W‖ (Frobenius)")
        written.append(save_figure(fig, save_dir / "sos_head_norm.png", plt))
    log = save_dir / "sos_log.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    measured = [e for e in entries if e.get("loss_before") is not None and e.get("loss_after") is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(4.8, 3.4))
        for i, target in enumerate(dict.fromkeys(e["target"] for e in measured)):
            pts = [
                (e["epoch"], relative_change(e["loss_before"], e["loss_after"]))
                for e in measured
                if e["target"] == target
            ]
            ax.plot(*zip(*pts, strict=True), marker="ox"[i % 2], ms=5, label=target)
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set(
            title="capture-set loss change at each shift",
            xlabel="epoch",
            ylabel="(after − before) / before",
        )
        ax.legend(title="shifted network")
        written.append(save_figure(fig, save_dir / "sos_shift_loss.png", plt))
    return written


def relative_change(before: float, after: float) -> float:
    return (after - before) / before if before else math.nan


def plot_shift_flatness(before, after, path: str | Path, title: str) -> Path:
    """Fig 2 as a change: (after − before) / before in % of every top Hessian eigenvalue and trace measured around a
    shift (`Flatness` objects), one bar each, labelled with its value and the two absolute figures."""
    plt = pyplot()
    rows = [(f"λ{i}", b, a) for i, (b, a) in enumerate(zip(before.eigenvalues, after.eigenvalues, strict=True), 1)]
    rows += [(f"tr(H) {k}", before.traces[k].value, after.traces[k].value) for k in before.traces]
    change = [100.0 * relative_change(b, a) for _, b, a in rows]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, change, color=["C2" if c < 0 else "C3" for c in change], height=0.6)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(y, [f"{n}: {b:#.4g} → {a:#.4g}" for n, b, a in rows])
    span = max([abs(c) for c in change if not math.isnan(c)] + [1e-6])
    ax.set_xlim(-1.45 * span, 1.45 * span)
    for yi, c in zip(y, change, strict=True):
        ax.annotate(
            f"{c:+.3g} %",
            (c, yi),
            xytext=(4 if c >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if c >= 0 else "right",
            va="center",
            fontsize=9,
        )
    ax.set(title=title, xlabel="change after the shift (%)  —  green: flatter")
    ax.title.set_fontsize(10)
    return save_figure(fig, Path(path), plt)


def save_figure(fig, path: Path, plt, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Integer epoch ticks on every axis labelled 'epoch', tight layout inside `rect`, 120 dpi."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # nothing drawn outside the axes is clipped
    plt.close(fig)
    return path
