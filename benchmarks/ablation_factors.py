"""How much of the paper-mode mAP loss each factor of the `synth-finetune-ablation` study explains, from its ab.csv.

The arms paper-ORDER-EMA-bB (order end/start × EMA policy grams/follow × b) each hold, per seed, their difference to
the baseline arm. For a factor switched from level x to y, per seed: the mean over the other factors' levels of the
arms at y minus those at x (the main effect, paired by seed); for two factors A and B: A's effect at each level of
B (averaged over the third) and the difference of A's effect between two levels of B (the interaction); and the
order's effect in each (EMA, b) cell, unaveraged (with EMA = follow both orders train and validate alike). Each is
summarised over seeds with `paired_summary` (95 % t-interval, MDE at 80 % power, t-test p Holm-corrected across the
metric's contrasts). The variance shares decompose the between-arm sum of squares of the seed-mean differences
(balanced design: main effects + two-way interactions + the three-way rest add up to it; seed noise included).

    python benchmarks/ablation_factors.py benchmarks/results/fashion_det_ablation/ab.csv [--out factors.md]
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
from pathlib import Path

from ab_power import SCALE, comparisons

from sos_detect.core.stats import SUMMARY_HEADER, PairedSummary, markdown_table, paired_summary, with_holm

FACTORS = {"order": ("end", "start"), "EMA": ("grams", "follow"), "b": ("32", "48", "60")}
ARM = re.compile(r"paper-(end|start)-(grams|follow)-b(\d+) - ")
Cell = tuple[str, str, str]  # (order, EMA, b)


def cells(path: Path, metric: str) -> dict[Cell, dict[int, float]]:
    """Per paper arm (order, EMA, b): its per-seed difference to the baseline in `metric`."""
    out = {}
    for name, m, diffs in comparisons(path):
        match = ARM.match(name)
        if m == metric and match:
            out[match.groups()] = diffs
    levels = set(itertools.product(*FACTORS.values()))
    if set(out) != levels:
        raise SystemExit(f"{path}: {metric} lacks the arms {sorted(levels - set(out))}")
    return out


def marginal(data: dict[Cell, dict[int, float]], **fixed: str) -> dict[int, float]:
    """Per seed (those every arm has): the mean over the arms at the `fixed` factor levels."""
    index = {f: i for i, f in enumerate(FACTORS)}
    chosen = [v for c, v in data.items() if all(c[index[f]] == level for f, level in fixed.items())]
    seeds = set.intersection(*(set(d) for d in data.values()))
    return {s: statistics.fmean(d[s] for d in chosen) for s in sorted(seeds)}


def contrasts(data: dict[Cell, dict[int, float]]) -> list[tuple[str, PairedSummary]]:
    """The loss of every paper arm together, each factor's main effects, two-way simple effects and interactions."""
    zero = dict.fromkeys(marginal(data), 0.0)
    rows = [("paper mode (all 12 arms) − base", paired_summary(marginal(data), zero))]
    for f, levels in FACTORS.items():
        for y in levels[1:]:
            rows.append(
                (f"{f}: {y} vs {levels[0]}", paired_summary(marginal(data, **{f: y}), marginal(data, **{f: levels[0]})))
            )
    for a, b in itertools.combinations(FACTORS, 2):
        if len(FACTORS[a]) > 2:
            a, b = b, a  # the two-level factor's effect, at each level of the other
        x, y = FACTORS[a]
        effect = {
            level: {s: v - marginal(data, **{a: x, b: level})[s] for s, v in marginal(data, **{a: y, b: level}).items()}
            for level in FACTORS[b]
        }
        for level in FACTORS[b]:
            rows.append((f"{a}: {y} vs {x} at {b} = {level}", paired_summary(effect[level], zero)))
        for level in FACTORS[b][1:]:
            first = FACTORS[b][0]
            rows.append(
                (f"{a} × {b}: ({y} − {x}) at {level} − at {first}", paired_summary(effect[level], effect[first]))
            )
    for ema, b in itertools.product(FACTORS["EMA"], FACTORS["b"]):  # order in each cell: what recovery is worth
        start, end = (marginal(data, order=o, EMA=ema, b=b) for o in FACTORS["order"][::-1])
        rows.append((f"order: start vs end at EMA = {ema}, b = {b}", paired_summary(start, end)))
    return rows


def variance_shares(data: dict[Cell, dict[int, float]]) -> dict[str, float]:
    """Shares of Σ_cells (m − m̄)² of the seed-mean differences m: per main effect Σ_cells (m_F − m̄)², per two-way
    interaction Σ_cells (m_FG − m_F − m_G + m̄)², the rest the three-way interaction."""
    mean = {c: statistics.fmean(v.values()) for c, v in data.items()}
    grand = statistics.fmean(mean.values())
    names = list(FACTORS)

    def avg(c: Cell, keep: tuple[int, ...]) -> float:
        return statistics.fmean(m for d, m in mean.items() if all(d[i] == c[i] for i in keep))

    total = sum((m - grand) ** 2 for m in mean.values())
    ss = {names[i]: sum((avg(c, (i,)) - grand) ** 2 for c in mean) for i in range(3)}
    for i, j in itertools.combinations(range(3), 2):
        ss[f"{names[i]} × {names[j]}"] = sum((avg(c, (i, j)) - avg(c, (i,)) - avg(c, (j,)) + grand) ** 2 for c in mean)
    ss["order × EMA × b (rest)"] = total - sum(ss.values())
    return {k: v / total if total > 0 else float("nan") for k, v in ss.items()}


def identical(data: dict[Cell, dict[int, float]]) -> list[list[Cell]]:
    """Groups of arms whose per-seed differences to the baseline are equal on every seed (to 1e-9): contrasts
    between them are exactly 0 with no spread, whatever the number of seeds."""
    groups: dict[tuple, list[Cell]] = {}
    for cell, diffs in sorted(data.items()):
        groups.setdefault(tuple(round(v, 9) for _, v in sorted(diffs.items())), []).append(cell)
    return [g for g in groups.values() if len(g) > 1]


def report(path: Path, metrics: tuple[str, ...] = ("map50", "map5095")) -> str:
    parts = [
        f"# Paper-mode factors of {path.parent.name}\n\nFrom `{path}` (per-seed differences to the baseline); "
        "python benchmarks/ablation_factors.py. Effects in percentage points, paired by seed; Holm across the "
        "contrasts of one metric."
    ]
    for metric in metrics:
        data = cells(path, metric)
        rows = contrasts(data)
        summaries = with_holm([s for _, s in rows])
        scale = SCALE.get(metric, 1.0)
        body = [[name, *s.cells(scale)] for (name, _), s in zip(rows, summaries, strict=True)]
        shares = variance_shares(data)
        parts.append(f"## {metric}\n\n" + markdown_table(["contrast", *SUMMARY_HEADER], body))
        same = ["; ".join(f"paper-{o}-{e}-b{b}" for o, e, b in g) for g in identical(data)]
        if same:
            parts.append("Arms equal on every seed: " + " | ".join(same) + ".")
        parts.append(
            "Share of the between-arm sum of squares (seed means):\n\n"
            + markdown_table(["term", "share"], [[k, f"{v:.1%}"] for k, v in shares.items()])
        )
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", type=Path, help="the ablation study's ab.csv")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print)")
    a = ap.parse_args()
    if not a.csv.is_file():
        ap.error(f"{a.csv}: no such file")
    text = report(a.csv)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
