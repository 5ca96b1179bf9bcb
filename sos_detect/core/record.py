"""The record of one shift: per-layer figures (`LayerReport`), their totals and verdict (`ShiftReport`), and the
run's shift log (sos_log.jsonl: one JSON line per shifted network and epoch) with its trimming on resume."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerReport:
    name: str
    in_width: int
    out_width: int
    rows: int  # rows the shift was solved on (the sampled ones in paper mode)
    rank: int
    norm_before: float
    norm_after: float
    out_change_predicted: float
    out_change_measured: float  # on the rows solved on, with the weights as written
    out_change_all: float  # on every captured row (differs from the above in paper mode only)
    out_change_unsampled: float | None  # on the captured rows not solved on (paper mode; None when all were)
    budget: float  # the bound the solver promised for out_change_measured
    mu: float


@dataclass
class ShiftReport:
    """Per-layer figures of one shift and whether it was kept."""

    mode: str
    tau: float
    layers: list[LayerReport] = field(default_factory=list)
    loss_before: float | None = None
    loss_after: float | None = None
    applied: bool = False
    reason: str = ""
    seconds: float = 0.0

    @property
    def norm_ratio(self) -> float:
        """‖V'‖/‖V‖ over all shifted layers together."""
        before = math.sqrt(sum(r.norm_before**2 for r in self.layers))
        after = math.sqrt(sum(r.norm_after**2 for r in self.layers))
        return after / before if before > 0 else 1.0

    @property
    def max_out_change(self) -> float:
        return max((r.out_change_measured for r in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["norm_ratio"] = self.norm_ratio
        for layer in d["layers"]:
            layer["out_change"] = layer["out_change_measured"]
        return d

    def format(self) -> str:
        """A fixed-width table, one line per layer, then the totals."""
        lines = [
            f"{'layer':<28} {'m':>5} {'n':>4} {'rows':>8} {'rank':>5} {'‖V‖':>9} {'‖V′‖':>9} "
            f"{'Δout pred':>10} {'Δout meas':>10} {'Δout all':>10}"
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<28} {r.in_width:>5} {r.out_width:>4} {r.rows:>8} {r.rank:>5} "
                f"{r.norm_before:>9.4f} {r.norm_after:>9.4f} {r.out_change_predicted:>10.2e} "
                f"{r.out_change_measured:>10.2e} {r.out_change_all:>10.2e}"
            )
        status = "applied" if self.applied else f"rolled back ({self.reason})"
        loss = ""
        if self.loss_before is not None:
            loss = f", loss {self.loss_before:.6g} -> {self.loss_after:.6g}"
        lines.append(
            f"mode={self.mode} tau={self.tau:g}: norm ratio {self.norm_ratio:.4f}{loss}, {status}, {self.seconds:.2f}s"
        )
        return "\n".join(lines)


def results_columns(reports: Mapping[str, ShiftReport]) -> dict[str, float]:
    """An epoch's shifts as results.csv columns: sos/shifted (1 when every target's shift applied), ‖V'‖/‖V‖ of the
    model and of the EMA (1 when not applied), the largest output change on the rows an applied shift solved on."""
    applied = [r for r in reports.values() if r.applied]
    ratio = lambda t: reports[t].norm_ratio if t in reports and reports[t].applied else 1.0  # noqa: E731
    return {
        "sos/shifted": float(len(applied) == len(reports)),
        "sos/norm_ratio": ratio("model"),
        "sos/ema_norm_ratio": ratio("ema"),
        "sos/out_change": max((r.max_out_change for r in applied), default=0.0),
    }


def append_log(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append shift-log entries to `path`, one JSON line each."""
    with open(path, "a", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


def keep_log_epochs(path: Path, epochs: int) -> None:
    """Keep the shift-log lines of epochs 1..`epochs` (those a checkpoint holds), dropping any logged after it."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["epoch"] <= epochs))


def log_table(path: Path) -> str:
    """The shift log as a table, a line per entry: epoch, target, ‖V'‖/‖V‖ over its layers, the largest output
    change on the rows solved on, seconds, applied or why rolled back."""
    lines = [f"{'epoch':>5} {'target':>6} {'norm ratio':>10} {'max Δout':>9} {'seconds':>8}  status"]
    for line in path.read_text().splitlines():
        e = json.loads(line)
        worst = max(r["out_change"] for r in e["layers"])
        status = "applied" if e["applied"] else f"rolled back: {e['reason']}"
        lines.append(
            f"{e['epoch']:>5} {e['target']:>6} {e['norm_ratio']:>10.4f} {worst:>9.2e} {e['seconds']:>8.2f}  {status}"
        )
    return "\n".join(lines)
