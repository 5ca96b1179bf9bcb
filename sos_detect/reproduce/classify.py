"""Classification tables: SGD, SAM, NSO, each with and without SOS, over seeds; resumable.

The paper's Table 3 figures are not bundled (they could not be checked here): `read_paper_figures` takes them
from a CSV the user writes, and the table then sets them beside what was measured.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sos_detect.classify.train import TrainConfig, changed_settings, train
from sos_detect.reproduce.stats import fmt, markdown_table, mean_std, paired_differences, write_csv

SCHEMES = ("sgd", "sgd+sos", "sam", "sam+sos", "nso", "nso+sos")
PRESETS = {
    # CIFAR-100, ResNet-18 (CIFAR stem), 200 epochs, SGD Nesterov 0.9, step LR, SOS paper mode with b = 300.
    "paper": TrainConfig(
        model="resnet18",
        data="cifar100",
        epochs=200,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        schedule="step",
        rho=0.1,
        sigma=0.01,
        sos_mode="paper",
        sos_batch=300,
        device="cuda",
    ),
    # Fashion-MNIST (first 10,000 of a seeded permutation of the 60,000 training images; the full 10,000 test
    # images), a small CNN whose final layer is 128 wide, paper-mode SOS with b = 64 (b/m = 0.5 as 300/512).
    "mini": TrainConfig(
        model="smallcnn",
        data="fashion-mnist",
        epochs=6,
        batch_size=128,
        lr=0.05,
        weight_decay=5e-4,
        schedule="step",
        rho=0.05,
        sigma=0.01,
        sos_mode="paper",
        sos_batch=64,
        train_subset=10_000,
        device="cpu",
    ),
}


def run_scheme(scheme: str, seed: int, base: TrainConfig, out: Path) -> dict[str, Any]:
    run_dir = out / "runs" / f"{scheme.replace('+', '_')}_s{seed}"
    done = run_dir / "done.json"
    optimizer, _, sos = scheme.partition("+")
    cfg = replace(base, optimizer=optimizer, sos=bool(sos), seed=seed, out=str(run_dir))
    if done.is_file():
        record = json.loads(done.read_text())
        changed = changed_settings(record["config"], cfg)
        if changed:
            raise ValueError(f"{done}: a finished run with other settings ({', '.join(changed)}); choose another --out")
        return record
    result = train(cfg)
    final = result["final"]
    record = {
        "scheme": scheme,
        "seed": seed,
        "top1": final["test_top1"],
        "top5": final["test_top5"],
        "last_norm": final["last_norm"],
        "seconds": final["seconds"],
        "config": asdict(cfg),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def read_paper_figures(path: str | Path) -> dict[str, float]:
    """Published test top-1 (%) per scheme from a CSV with columns `scheme,top1` (e.g. sgd,76.50)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: paper figures file not found (--paper-figures)")
    reader = csv.DictReader(path.read_text().splitlines())
    if not {"scheme", "top1"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{path}: needs a header with columns scheme,top1, got {reader.fieldnames}")
    figures = {}
    for line, row in enumerate(reader, start=2):
        scheme, value = (row["scheme"] or "").strip(), (row["top1"] or "").strip()
        if scheme not in SCHEMES:
            raise ValueError(f"{path}:{line}: unknown scheme {scheme!r}; choose from {SCHEMES}")
        try:
            figures[scheme] = float(value)
        except ValueError:
            raise ValueError(f"{path}:{line}: top1 must be a number in percent, got {value!r}") from None
        if not 0 <= figures[scheme] <= 100:
            raise ValueError(f"{path}:{line}: top1 is in percent (0-100), got {value}")
    return figures


def aggregate(results: list[dict[str, Any]], paper: dict[str, float] | None = None) -> tuple[list[dict], str]:
    """Rows per scheme (mean ± std) and per scheme+SOS − scheme (paired by seed); paper top-1 beside if given."""
    paper = paper or {}
    rows, md_rows, diff_rows = [], [], []
    by = {s: {r["seed"]: r for r in results if r["scheme"] == s} for s in dict.fromkeys(r["scheme"] for r in results)}
    for scheme, per in by.items():
        stats = {k: mean_std([r[k] for r in per.values()]) for k in ("top1", "top5", "last_norm")}
        rows.append(
            {
                "row": scheme,
                "seeds": len(per),
                **{f"{k}_{s}": v for k, (m, sd) in stats.items() for s, v in (("mean", m), ("std", sd))},
                "per_seed_top1": json.dumps({s: round(r["top1"], 5) for s, r in per.items()}),
                "paper_top1": paper.get(scheme, math.nan),
            }
        )
        md_rows.append(
            [
                scheme,
                str(len(per)),
                fmt(*stats["top1"]),
                fmt(*stats["top5"]),
                fmt(*stats["last_norm"], scale=1.0, digits=3),
            ]
            + ([_paper_cells(paper.get(scheme), stats["top1"][0])] if paper else [])
        )
        if scheme.endswith("+sos") and scheme[:-4] in by:
            diffs = paired_differences(
                {s: r["top1"] for s, r in per.items()}, {s: r["top1"] for s, r in by[scheme[:-4]].items()}
            )
            m, sd = mean_std(list(diffs.values()))
            rows.append(
                {
                    "row": f"{scheme} - {scheme[:-4]}",
                    "seeds": len(diffs),
                    "top1_mean": m,
                    "top1_std": sd,
                    "per_seed_top1": json.dumps({s: round(d, 5) for s, d in diffs.items()}),
                }
            )
            diff_rows.append(
                [f"{scheme} − {scheme[:-4]}", ", ".join(f"s{s}: {d * 100:+.2f}" for s, d in diffs.items()), fmt(m, sd)]
            )
    fields = ["row", "seeds"] + sorted({k for r in rows for k in r} - {"row", "seeds"})
    rows = [{k: r.get(k, "") for k in fields} for r in rows]
    header = ["scheme", "seeds", "test top-1 (%)", "test top-5 (%)", "last-layer norm"]
    md = markdown_table(header + (["paper top-1 (%) / ours − paper"] if paper else []), md_rows)
    md += "\n\nPaired differences in test top-1 (percentage points):\n\n"
    md += markdown_table(["comparison", "per seed", "mean ± std"], diff_rows)
    return rows, md


def _paper_cells(published: float | None, ours: float) -> str:
    if published is None:
        return "–"
    return f"{published:.2f} / {ours * 100 - published:+.2f}"


def reproduce_classify(
    preset: str,
    out: Path,
    *,
    seeds: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    overrides: dict[str, Any] | None = None,
    paper_figures: str | Path | None = None,
) -> tuple[Path, Path]:
    """Train every scheme × seed (finished runs read back, interrupted ones resumed); write classify.md/.csv."""
    base = replace(PRESETS[preset], **(overrides or {}))
    base.check()
    paper = read_paper_figures(paper_figures) if paper_figures else None
    out = out.resolve()
    results = [run_scheme(scheme, seed, base, out) for seed in seeds for scheme in schemes]
    rows, table = aggregate(results, paper)
    write_csv(out / "classify.csv", rows)
    settings = {k: v for k, v in asdict(base).items() if k not in ("out", "optimizer", "sos", "seed", "resume")}
    source = (
        f"Paper top-1 from {paper_figures}."
        if paper
        else "The paper's Table 3 figures are not bundled; `--paper-figures CSV` sets them beside these."
    )
    (out / "classify.md").write_text(
        f"# Classification reproduction — preset `{preset}`\n\n{table}\n\nFinal-epoch test accuracy, mean ± sample "
        f"std over seeds {seeds}. {source}\nSettings: {json.dumps(settings)}\n"
    )
    return out / "classify.md", out / "classify.csv"
