"""The A/B study's plots: per model every arm's training curves over its seeds, and the effect plot (each arm's paired
difference to the baseline with its interval, per model and metric)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sos_detect.detect.compare import compare_runs
from sos_detect.detect.plots import pyplot, save_figure
from sos_detect.reproduce.ab_presets import ABConfig


def plot_curves(cfg: ABConfig, results: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Per model, out/{name}_curves_MODEL.png: every arm's runs' training curves (detect/compare.compare_runs)."""
    written = []
    for model in cfg.models:
        groups = {arm: [r["run"] for r in results if r["model"] == model and r["arm"] == arm] for arm in cfg.arms}
        curves = out / f"{name}_curves_{Path(model).stem}.png"
        base = next(iter(groups))  # the arms are named in the legend; a title listing them widens the figure
        compare_runs(groups, curves, title=f"{model}: {len(groups)} arms, baseline {base} (seeds {list(cfg.seeds)})")
        written.append(curves)
    return written


def plot_effects(rows: list[dict[str, Any]], path: Path) -> Path:
    """The answer in one figure: per model and mAP metric, each arm's mean paired difference to the baseline
    with its 95 % t-interval (points and bars), zero marked."""
    diffs = [r for r in rows if r.get("metric") in ("map50", "map5095")]
    models = list(dict.fromkeys(r["model"] for r in diffs))
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(max(len(models), 1), 2, figsize=(10, 1.7 + 0.45 * _arm_count(diffs)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=False):
        for ax, metric in zip(row_axes, ("map50", "map5095"), strict=True):
            mine = [r for r in diffs if r["model"] == model and r["metric"] == metric]
            intervals, span = False, 1e-3
            for y, r in enumerate(mine):
                mean, lo, hi = (100 * float(r[k]) for k in ("mean", "ci_low", "ci_high"))
                if not math.isnan(lo):
                    ax.plot([lo, hi], [y, y], color="C0", lw=2)
                    intervals, span = True, max(span, abs(lo), abs(hi))
                span = max(span, abs(mean))
                ax.plot([mean], [y], "o", color="C0")
                ax.annotate(f"{mean:+.3g}", (mean, y), xytext=(0, 7), textcoords="offset points", ha="center")
            ax.set_xlim(-1.25 * span, 1.25 * span)  # zero in the middle: the sign is the answer
            ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))
            ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
            ax.set_yticks(range(len(mine)), [r["row"] for r in mine])
            ax.set_ylim(-0.6, len(mine) - 0.4)
            ax.invert_yaxis()
            label = "mAP50" if metric == "map50" else "mAP50-95"
            seeds = max((int(r["seeds"]) for r in mine), default=0)
            what = "mean, 95 % t-interval" if intervals else f"{seeds} seed{'s' * (seeds != 1)}, no interval"
            ax.set(title=f"{model}: {label}, arm − baseline", xlabel=f"difference (points): {what}")
    return save_figure(fig, path, plt)


def _arm_count(rows: list[dict[str, Any]]) -> int:
    """The most difference rows any one model has (the figure's height)."""
    return max(len({r["row"] for r in rows if r["model"] == m}) for m in {r["model"] for r in rows}) if rows else 1
