"""Run plots in the spirit of the paper's figures: Hessian trace (Figs 3/5), head norm (Fig 4), shift loss,
top eigenvalues before/after a shift (Fig 2)."""

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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    key = next((k for k in rows[0] if k.strip() == name), None) if rows else None
    return [float(r[key]) for r in rows] if key else []


def plot_run(save_dir: str | Path) -> list[Path]:
    """Write sos_trace.png, sos_head_norm.png and sos_shift_loss.png where the run logged the data."""
    save_dir = Path(save_dir)
    written: list[Path] = []
    csv_path = save_dir / "results.csv"
    rows = list(csv.DictReader(csv_path.read_text().splitlines())) if csv_path.is_file() else []
    plt = _pyplot()
    epochs = _column(rows, "epoch")
    traces = {k: _column(rows, f"sos/trace_{k}") for k in ("head", "all")}
    if any(not math.isnan(v) for vals in traces.values() for v in vals):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, (k, vals) in zip(axes, traces.items(), strict=True):
            pts = [(e, v) for e, v in zip(epochs, vals, strict=True) if not math.isnan(v)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            ax.set(title=f"Hessian trace ({'head convs' if k == 'head' else 'whole model'})", xlabel="epoch")
        written.append(_save(fig, save_dir / "sos_trace.png", plt))
    norms = _column(rows, "sos/head_norm")
    if norms and any(not math.isnan(v) for v in norms):
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot(epochs, norms, marker="o")
        ax.set(title="head output-conv weight norm (EMA)", xlabel="epoch", ylabel="‖W‖_F")
        written.append(_save(fig, save_dir / "sos_head_norm.png", plt))
    log = save_dir / "sos_log.jsonl"
    entries = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    shifts = [e for e in entries if e.get("loss_before") is not None and e["target"] == "model"]
    if shifts:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot([e["epoch"] for e in shifts], [e["loss_before"] for e in shifts], marker="o", label="before shift")
        ax.plot([e["epoch"] for e in shifts], [e["loss_after"] for e in shifts], marker="x", label="after shift")
        ax.set(title="capture-set loss at each shift", xlabel="epoch", ylabel="loss per image")
        ax.legend()
        written.append(_save(fig, save_dir / "sos_shift_loss.png", plt))
    return written


def plot_eigenvalues(before: list[float], after: list[float], path: str | Path) -> Path:
    """Fig 2: the top Hessian eigenvalues before and after a shift."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    idx = range(1, len(before) + 1)
    ax.bar([i - 0.2 for i in idx], before, width=0.4, label="before SOS")
    ax.bar([i + 0.2 for i in idx], after, width=0.4, label="after SOS")
    ax.set(title="top Hessian eigenvalues", xlabel="rank", ylabel="eigenvalue", xticks=list(idx))
    ax.legend()
    return _save(fig, Path(path), plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
