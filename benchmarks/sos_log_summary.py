"""What the shifts of an A/B study did, per arm and target (model / EMA), from every run's sos_log.jsonl and
results.csv: shifts logged and applied, rollback reasons, the worst measured output change over the budget τ
(guarded arms), the largest EMA change on images it was not solved on (in τ), shift-step seconds and their share of
the training time (Σ sos/seconds / Σ epoch seconds), the median epoch seconds; per layer, where logged (paper arms:
out_change_unsampled; with sos_heldout_images: heldout_change), the median and max over shifts of the output change
off the solve's sample (on the captured rows not solved on, and on validation images).
Run: python benchmarks/sos_log_summary.py OUT/runs [--out JSON]   (OUT: a `reproduce ab` output folder)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from sos_detect.detect.plots import read_results

OFF_SAMPLE = ("out_change_unsampled", "heldout_change")  # per-layer changes off the solve's sample, where logged


def arm_of(run: Path) -> str | None:
    """MODEL_sSEED_ARM → ARM; None for other folders (a fine-tuning study's shared pretraining run)."""
    parts = run.name.split("_", 2)
    return parts[2] if len(parts) == 3 and parts[1][:1] == "s" and parts[1][1:].isdigit() else None


def summarize(runs: Path) -> dict[str, dict]:
    """Per arm: per target the shift figures, and the run-level timing."""
    out: dict[str, dict] = defaultdict(lambda: {"runs": 0, "shift_share": [], "epoch_s": []})
    targets: dict[tuple[str, str], dict] = defaultdict(
        lambda: {"shifts": 0, "applied": 0, "reasons": defaultdict(int), "change_over_tau": [], "heldout": []}
    )
    off_sample: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in sorted(p for p in runs.iterdir() if (p / "results.csv").is_file() and arm_of(p)):
        arm = arm_of(run)
        cols = read_results(run)
        elapsed = cols["time"]
        epochs = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
        out[arm]["runs"] += 1
        out[arm]["epoch_s"] += epochs
        if "sos/seconds" in cols:
            out[arm]["shift_share"].append(sum(cols["sos/seconds"]) / sum(epochs))
        log = run / "sos_log.jsonl"
        for line in log.read_text().splitlines() if log.is_file() else []:
            entry = json.loads(line)
            t = targets[(arm, entry["target"])]
            t["shifts"] += 1
            t["applied"] += bool(entry["applied"])
            if entry.get("reason"):
                t["reasons"][entry["reason"]] += 1
            tau = entry.get("tau") or 0.0
            if entry.get("mode") == "guarded" and tau > 0:
                t["change_over_tau"] += [layer["out_change_measured"] / tau for layer in entry["layers"]]
                if entry.get("heldout_change") is not None:
                    t["heldout"].append(entry["heldout_change"] / tau)
            for layer in entry["layers"]:
                for key in OFF_SAMPLE:
                    if layer.get(key) is not None:
                        off_sample[(arm, entry["target"])][layer["name"]][key].append(layer[key])
            seconds[(arm, entry["target"])].append(entry["seconds"])
    result = {}
    for arm, row in out.items():
        share = row["shift_share"]
        result[arm] = {
            "runs": row["runs"],
            "median_epoch_s": statistics.median(row["epoch_s"]),
            "shift_share_of_training": [min(share), max(share)] if share else None,
        }
        for (a, target), t in targets.items():
            if a == arm:
                result[arm][target] = {
                    "shifts": t["shifts"],
                    "applied": t["applied"],
                    "rollback_reasons": dict(t["reasons"]),
                    "worst_change_over_tau": max(t["change_over_tau"], default=None),
                    "max_heldout_change_over_tau": max(t["heldout"], default=None),
                    "median_shift_s": statistics.median(seconds[(a, target)]),
                }
                if off_sample[(a, target)]:
                    result[arm][target]["off_sample_change"] = {
                        name: {k: {"median": statistics.median(v), "max": max(v)} for k, v in keys.items()}
                        for name, keys in off_sample[(a, target)].items()
                    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, help="a `reproduce ab` output's runs/ folder")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    a = ap.parse_args()
    result = summarize(a.runs)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
