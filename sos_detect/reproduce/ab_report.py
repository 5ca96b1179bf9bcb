"""The A/B harness's tables: per model and arm mean ± std of each final metric, and per arm and metric the paired
difference to the baseline arm (`paired_summary`), with the t-test p Holm-corrected across the study."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from sos_detect.core.stats import SUMMARY_HEADER, fmt, markdown_table, mean_std, paired_summary, with_holm

# metric key → (table header, scale); mAP figures in percent, norm and trace as logged
METRICS = {
    "map50": ("mAP50 (%)", 100.0),
    "map5095": ("mAP50-95 (%)", 100.0),
    "best_map50": ("best.pt mAP50 (%)", 100.0),
    "best_map5095": ("best.pt mAP50-95 (%)", 100.0),
    "voc07": ("VOC07 mAP (%)", 100.0),
    "head_norm": ("head norm", 1.0),
    "trace_head": ("tr(H) head", 1.0),
    "trace_all": ("tr(H) model", 1.0),
}
STATISTICS_NOTE = (
    "Final-epoch validation (results.csv) of each run, and that of the epoch best.pt holds (the highest mAP50-95; "
    "chosen on the same validation images, so optimistic alike for every arm); mean ± sample std over seeds; paired "
    "differences arm − baseline per seed with a two-sided 95 % Student-t interval, the minimum detectable effect of a "
    "two-sided paired t-test at α = 0.05 with 80 % power, MDE ≈ (t_{0.975,n−1} + t_{0.8,n−1})·sd/√n from the "
    "observed paired sd (an effect smaller than it is not excluded by a difference that is not significant), "
    "the paired t-test's p, that p Holm-corrected across every arm × metric of this study, and an exact "
    "two-sided sign test."
)


def _metrics_present(results: list[dict[str, Any]]) -> list[str]:
    return [k for k in METRICS if any(not math.isnan(float(r.get(k, math.nan))) for r in results)]


def aggregate(
    results: list[dict[str, Any]], arms: list[str], reference: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[list[dict], str]:
    """CSV rows and markdown: per model and arm mean ± std of each metric; per arm and metric the paired
    differences against the first arm (`paired_summary`: 95 % t-interval, MDE at 80 % power, t-test p, sign
    test), with the t-test p Holm-adjusted across every arm × metric (× model) of the study."""
    reference = reference or {}
    base = arms[0]
    arm_rows: dict[str, list[dict[str, Any]]] = {}  # model → per-arm CSV rows
    tables, comparisons = {}, []  # model → per-arm markdown table; (model, arm, metric, summary)
    for model in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == model]
        metrics = _metrics_present(mine)
        per = {arm: {r["seed"]: r for r in mine if r["arm"] == arm} for arm in arms}
        ref = reference.get(model, {})
        arm_cells, arm_rows[model] = [], []
        for arm in arms:
            stats = {k: mean_std([r.get(k, math.nan) for r in per[arm].values()]) for k in metrics}
            arm_rows[model].append(
                {
                    "model": model,
                    "row": arm,
                    "seeds": len(per[arm]),
                    **{f"{k}_{s}": v for k, (m, sd) in stats.items() for s, v in (("mean", m), ("std", sd))},
                    "per_seed": json.dumps({s: round(r["map50"], 5) for s, r in per[arm].items()}),
                    "reference_map50": ref.get(arm, ""),
                }
            )
            n = len(per[arm])
            cells = [arm, str(n)] + [fmt(*stats[k], *_scale_digits(k), n=n) for k in metrics]
            arm_cells.append(cells + ([f"{ref[arm]:.1f}" if arm in ref else "–"] if ref else []))
        header = ["arm", "seeds", *(METRICS[k][0] for k in metrics)] + (["published mAP50 (%)"] if ref else [])
        tables[model] = markdown_table(header, arm_cells)
        for arm in arms[1:]:
            for k in metrics:
                treated, control = ({s: r[k] for s, r in per[a].items()} for a in (arm, base))
                comparisons.append((model, arm, k, paired_summary(treated, control)))
    summaries = with_holm([c[-1] for c in comparisons])
    rows, md = [], []
    for model, table in tables.items():
        rows += arm_rows[model]
        diff_cells = []
        for (m, arm, k, _), summary in zip(comparisons, summaries, strict=True):
            if m == model:
                rows.append({"model": model, "row": f"{arm} - {base}", "metric": k, **summary.row()})
                diff_cells.append([arm, k, *summary.cells(*_scale_digits(k))])
        md.append(f"## {model}\n\n{table}")
        md.append(
            f"Paired differences, arm − {base} (mAP in percentage points):\n\n"
            + markdown_table(["arm", "metric", *SUMMARY_HEADER], diff_cells)
        )
    fields = ["model", "row", "metric", "seeds"]
    fields += sorted({k for r in rows for k in r} - set(fields))
    return [{k: r.get(k, "") for k in fields} for r in rows], "\n\n".join(md)


def _scale_digits(metric: str) -> tuple[float, int]:
    """A metric's table scale and decimals: mAP in percent with 2, norms and traces as logged with 4."""
    scale = METRICS[metric][1]
    return scale, 2 if scale == 100 else 4
