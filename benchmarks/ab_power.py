"""Paired summaries of a finished study from its table alone: the per-seed differences that an `ab.csv`,
`table5.csv` or `classify.csv` holds, summarised again with `paired_summary` (95 % t-interval, minimum detectable
effect at 80 % power, paired t-test p, Holm-corrected across the file's comparisons) — for tables written before
the harness reported MDE and Holm p.

    python benchmarks/ab_power.py benchmarks/results/fashion_det_finetune/ab.csv [more CSVs: one family each] \
        > benchmarks/results/ab_power.md
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from sos_detect.core.stats import SUMMARY_HEADER, markdown_table, paired_summary, with_holm

SCALE = {"map50": 100.0, "map5095": 100.0, "voc07": 100.0, "top1": 100.0, "top5": 100.0}  # others as logged


def comparisons(path: Path) -> list[tuple[str, str, dict[int, float]]]:
    """(comparison, metric, {seed: difference}) for every paired-difference row of a harness CSV."""
    out = []
    for row in csv.DictReader(path.read_text().splitlines()):
        if " - " not in row["row"]:
            continue
        if row.get("metric"):  # ab.csv / table5.csv: one row per arm and metric
            out.append((row["row"], row["metric"], row["per_seed"]))
        else:  # classify.csv: top-1 (and, since MDE was added, top-5) per comparison
            for metric in ("top1", "top5"):
                text = row.get(f"{metric}_per_seed") or (row.get("per_seed_top1") if metric == "top1" else "")
                if text:
                    out.append((row["row"], metric, text))
    return [(name, metric, {int(s): d for s, d in json.loads(text).items()}) for name, metric, text in out]


def power_table(path: Path) -> str:
    found = comparisons(path)
    summaries = with_holm([paired_summary(diffs, dict.fromkeys(diffs, 0.0)) for _, _, diffs in found])
    body = [
        [name, metric, *s.cells(SCALE.get(metric, 1.0), 2 if metric in SCALE else 4)]
        for (name, metric, _), s in zip(found, summaries, strict=True)
    ]
    return f"## {path}\n\n" + markdown_table(["comparison", "metric", *SUMMARY_HEADER], body)


HEADER = (
    "# Paired summaries of the committed studies, recomputed from their tables\n\n"
    "Command: `python benchmarks/ab_power.py {files} > benchmarks/results/ab_power.md` (each file one Holm family; "
    "MDE = minimum detectable effect of a two-sided paired t-test at α = 0.05 with 80 % power, "
    "≈ (t_{{0.975,n−1}} + t_{{0.8,n−1}})·sd/√n; mAP and top-1 in percentage points, head norm as logged)."
)

if __name__ == "__main__":
    print("\n\n".join([HEADER.format(files=" ".join(sys.argv[1:])), *(power_table(Path(p)) for p in sys.argv[1:])]))
