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


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 2, seeds: int = 2) -> str:
    """`mean ± std` scaled; over one seed the mean alone (a sample std needs two), "–" for none."""
    if math.isnan(mean):
        return "–"
    if seeds < 2:
        return f"{mean * scale:.{digits}f}"
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


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer df, in closed form (Abramowitz & Stegun 26.7.3–4):
    with θ = atan(t/√df) and c = cos²θ, odd df: (2/π)(θ + sinθ cosθ Σ_k a_k c^k), a_0 = 1, a_k = a_{k−1}·2k/(2k+1);
    even df: sinθ Σ_k b_k c^k, b_0 = 1, b_k = b_{k−1}(2k−1)/(2k); sums over k < (df−1)/2 resp. k < df/2."""
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term = total = 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c * 2 * k / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term = total = 1.0
    for k in range(1, df // 2):
        term *= c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """t with P(|T| ≤ t) = level for Student's t with df degrees of freedom (bisection on the closed form)."""
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided `level` confidence interval of the mean: x̄ ± t_{(1+level)/2, n−1} · s/√n (NaN for n < 2)."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if len(vals) < 2:
        return math.nan, math.nan
    mean, sd = mean_std(vals)
    half = t_quantile(level, len(vals) - 1) * sd / math.sqrt(len(vals))
    return mean - half, mean + half


def sign_test(values: Sequence[float]) -> tuple[int, int, float]:
    """Exact two-sided sign test of median 0: (#positive, #negative, p), zeros dropped;
    p = min(1, 2 · P(X ≤ min(n₊, n₋))) for X ~ Binomial(n₊ + n₋, 1/2)."""
    pos = sum(1 for v in values if v > 0)
    neg = sum(1 for v in values if v < 0)
    n = pos + neg
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, k) for k in range(min(pos, neg) + 1)) / 2**n
    return pos, neg, min(1.0, 2 * tail)
