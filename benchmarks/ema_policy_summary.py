"""The EMA's output change on images it was not solved on, and what its shift cost, per run: how `--sos-ema` was
chosen. Reads finished `sos-detect train` runs (their sos_args.yaml, results.csv and sos_log.jsonl), prints one row
per run and writes benchmarks/results/ema_policy.json.

Run (the main job, paired: the same model trajectory, only the EMA's shift differs):
    OMP_NUM_THREADS=2 sos-detect train --name own
    OMP_NUM_THREADS=2 sos-detect train --sos-ema grams --name grams
    python benchmarks/ema_policy_summary.py runs/sos/own runs/sos/grams
The committed table: benchmarks/results/ema_policy/ holds those runs' small files (args.yaml, sos_args.yaml,
results.csv, sos_log.jsonl; the folder names say the thread count), summarised by
    python benchmarks/ema_policy_summary.py benchmarks/results/ema_policy/*/
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

from sos_detect.detect.plots import read_results

RESULTS = Path(__file__).parent / "results"


def summary(run: Path) -> dict:
    sos = yaml.safe_load((run / "sos_args.yaml").read_text())
    cols = read_results(run)
    tau = float(sos["sos_tau"])
    held = [v / tau for v in cols["sos/ema_heldout_change"] if v == v]  # NaN: no shift that epoch
    log = [json.loads(line) for line in (run / "sos_log.jsonl").read_text().splitlines()]
    ema = [e["seconds"] for e in log if e["target"] == "ema"]
    return {
        "run": run.name,
        "sos_ema": sos["sos_ema"],
        "shifts": len(held),
        "heldout_median_tau": statistics.median(held),
        "heldout_min_tau": min(held),
        "heldout_max_tau": max(held),
        "ema_seconds_per_shift": statistics.mean(ema) if ema else 0.0,
        "map50": cols["metrics/mAP50(B)"][-1],
        "map50_95": cols["metrics/mAP50-95(B)"][-1],
    }


def main() -> None:
    rows = [summary(Path(r)) for r in sys.argv[1:] if (Path(r) / "sos_log.jsonl").is_file()]
    print(f"{'run':<28} {'sos_ema':>7} {'shifts':>6} {'held-out median (τ)':>20} {'range (τ)':>14} {'s/shift':>8}")
    for r in rows:
        span = f"{r['heldout_min_tau']:.2f}–{r['heldout_max_tau']:.2f}"
        print(
            f"{r['run'][-28:]:<28} {r['sos_ema']:>7} {r['shifts']:>6} {r['heldout_median_tau']:>20.2f} {span:>14} "
            f"{r['ema_seconds_per_shift']:>8.3f}"
        )
    (RESULTS / "ema_policy.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
