"""Classification tables: SGD, SAM, NSO, each with and without SOS, over seeds; resumable.

The paper's Table 3 figures are not bundled (they could not be checked here); the table reports what was
measured, with paired per-seed differences (scheme+SOS − scheme).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sos_detect.classify.train import TrainConfig, train
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
    if done.is_file():
        return json.loads(done.read_text())
    optimizer, _, sos = scheme.partition("+")
    cfg = replace(base, optimizer=optimizer, sos=bool(sos), seed=seed, out=str(run_dir))
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


def aggregate(results: list[dict[str, Any]]) -> tuple[list[dict], str]:
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
    md = markdown_table(["scheme", "seeds", "test top-1 (%)", "test top-5 (%)", "last-layer norm"], md_rows)
    md += "\n\nPaired differences in test top-1 (percentage points):\n\n"
    md += markdown_table(["comparison", "per seed", "mean ± std"], diff_rows)
    return rows, md


def reproduce_classify(
    preset: str,
    out: Path,
    *,
    seeds: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    overrides: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    base = replace(PRESETS[preset], **(overrides or {}))
    out = out.resolve()
    results = [run_scheme(scheme, seed, base, out) for seed in seeds for scheme in schemes]
    rows, table = aggregate(results)
    write_csv(out / "classify.csv", rows)
    settings = {k: v for k, v in asdict(base).items() if k not in ("out", "optimizer", "sos", "seed")}
    (out / "classify.md").write_text(
        f"# Classification reproduction — preset `{preset}`\n\n{table}\n\nFinal-epoch test accuracy, mean ± sample "
        f"std over seeds {seeds}. The paper's Table 3 figures are not bundled here.\nSettings: {json.dumps(settings)}\n"
    )
    return out / "classify.md", out / "classify.csv"
