"""Aggregation over seeds: mean ± sample std, paired differences, markdown/CSV tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value; NaN for none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def paired_differences(treated: dict[int, float], control: dict[int, float]) -> dict[int, float]:
    """treated − control for every seed present in both."""
    return {s: treated[s] - control[s] for s in sorted(set(treated) & set(control))}


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t interval mean ± t_{(1+c)/2, n−1}·s/√n (NaN bounds for fewer than 2)."""
    mean, std = mean_std(values)
    n = sum(1 for v in values if v is not None and not math.isnan(float(v)))
    if n < 2:
        return mean, math.nan, math.nan
    half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def _t_quantile(confidence: float, df: int) -> float:
    """t with P(|T| ≤ t) = confidence for Student's t with integer df, by bisection on the exact CDF."""
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_central(mid, df) < confidence else (lo, mid)
    return 0.5 * (lo + hi)


def _t_central(t: float, df: int) -> float:
    """P(|T| ≤ t) in closed form for integer df (Abramowitz & Stegun 26.7.3–4), θ = arctan(t/√df)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # θ + sinθ·(cosθ + (2/3)cos³θ + … up to cos^{df−2}θ), times 2/π
        term, total = math.cos(theta), 0.0
        for k in range(1, df - 1, 2):
            total += term
            term *= c2 * (k + 1) / (k + 2)
        return 2.0 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # sinθ·(1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … up to cos^{df−2}θ)
    for k in range(0, df - 1, 2):
        total += term
        term *= c2 * (k + 1) / (k + 2)
    return s * total
