"""Classification tables: SGD, SAM, NSO, each with and without SOS, over seeds (optionally over SOS batches b);
resumable. The paper's Table 3 (and, for an SOS-batch sweep, Table 4) figures are set beside every row that matches
(model, data, augmentation, scheme[, b]); `--paper-figures CSV` sets figures from another source instead.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from sos_detect.classify.train import CHECKPOINT, FINISHED, TrainConfig, changed_settings, train, with_imgsz
from sos_detect.reproduce.paper import CITATION, PAPER_DIR, fmt_figure, table3_top1, table4_top1
from sos_detect.reproduce.stats import fmt, markdown_table, mean_std, paired_differences, write_csv

SCHEMES = ("sgd", "sgd+sos", "sam", "sam+sos", "nso", "nso+sos")
PRESETS = {
    # CIFAR-100, ResNet-18 (CIFAR stem), the paper's Table 3 setting: 300 epochs, batch 64, SGD Nesterov 0.9, weight
    # decay 1e-4, lr 0.1 ÷10 at 50 % and 75 %, SOS paper mode with b = 300.
    "paper": TrainConfig(
        model="resnet18",
        data="cifar100",
        epochs=300,
        batch_size=64,
        lr=0.1,
        weight_decay=1e-4,
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


def run_label(scheme: str, sos_batch: int | None) -> str:
    """A table row: the scheme, with its SOS batch b in an SOS-batch sweep."""
    return scheme if sos_batch is None else f"{scheme} b={sos_batch}"


def run_scheme(scheme: str, seed: int, base: TrainConfig, out: Path, sos_batch: int | None = None) -> dict[str, Any]:
    """One finished run of `scheme` (read back when finished, resumed when interrupted) as a record for the table."""
    name = scheme.replace("+", "_") + (f"_b{sos_batch}" if sos_batch is not None else "") + f"_s{seed}"
    folder = out / "runs" / name
    optimizer, _, sos = scheme.partition("+")
    cfg = replace(base, optimizer=optimizer, sos=bool(sos), seed=seed, project=str(folder.parent), name=name)
    cfg = with_imgsz(replace(cfg, exist_ok=True, **({"sos_batch": sos_batch} if sos_batch is not None else {})))
    done = folder / "done.json"
    if not done.is_file():
        if not (folder / FINISHED).is_file():
            train(replace(cfg, resume=str(folder) if (folder / CHECKPOINT).is_file() else False))
        final = list(csv.DictReader((folder / "log.csv").read_text().splitlines()))[-1]
        record = {
            "scheme": scheme,
            "row": run_label(scheme, sos_batch),
            "seed": seed,
            **{k: float(final[f"test_{k}"]) for k in ("top1", "top5")},
            "last_norm": float(final["last_norm"]),
            "seconds": float(final["seconds"]),
            "config": torch.load(folder / FINISHED, map_location="cpu", weights_only=True)["config"],
        }
        done.write_text(json.dumps(record, indent=1))
    record = json.loads(done.read_text())
    changed = changed_settings(record["config"], cfg)
    if changed:
        raise ValueError(f"{done}: a finished run with other settings ({', '.join(changed)}); choose another --out")
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


def published_figures(base: TrainConfig, labels: dict[str, tuple[str, int | None]]) -> dict[str, tuple]:
    """{row: ((top-1, std), "Table n")} for the rows the paper has: Table 4 for SGD+SOS at b in a sweep on CIFAR-100
    with basic augmentation, Table 3 for every other scheme (model, data, augmentation, scheme)."""
    aug = "mixup" if base.mixup > 0 else "basic"
    table3 = table3_top1(base.model, base.data, aug)
    table4 = table4_top1(base.model) if (base.data, aug) == ("cifar100", "basic") else {}
    found = {}
    for row, (scheme, b) in labels.items():
        if b is not None and scheme == "sgd+sos" and b in table4:
            found[row] = (table4[b], "Table 4")
        elif b is None and scheme in table3:
            found[row] = (table3[scheme], "Table 3")
    return found


def aggregate(results: list[dict[str, Any]], paper: dict[str, tuple] | None = None) -> tuple[list[dict], str]:
    """Rows (mean ± std over seeds) and, per SOS row, its paired difference with the scheme without SOS.

    `paper`: {row: ((top-1 %, std), source)} set beside the rows it names.
    """
    paper = paper or {}
    rows, md_rows, diff_rows = [], [], []
    label = lambda r: r.get("row", r["scheme"])  # noqa: E731
    by = {row: {r["seed"]: r for r in results if label(r) == row} for row in dict.fromkeys(map(label, results))}
    base_row = {row: row.split(" ")[0][:-4] for row in by if row.split(" ")[0].endswith("+sos")}
    for row, per in by.items():
        stats = {k: mean_std([r[k] for r in per.values()]) for k in ("top1", "top5", "last_norm")}
        (published, std), source = paper.get(row, ((math.nan, math.nan), ""))
        rows.append(
            {
                "row": row,
                "seeds": len(per),
                **{f"{k}_{s}": v for k, (m, sd) in stats.items() for s, v in (("mean", m), ("std", sd))},
                "per_seed_top1": json.dumps({s: round(r["top1"], 5) for s, r in per.items()}),
                "paper_top1": published,
                "paper_top1_std": std,
                "paper_source": source,
            }
        )
        n = len(per)
        cells = [row, str(n), fmt(*stats["top1"], seeds=n), fmt(*stats["top5"], seeds=n)]
        cells.append(fmt(*stats["last_norm"], 1.0, 3, seeds=n))
        if paper:
            ours = stats["top1"][0] * 100 - published
            cells.append("–" if row not in paper else f"{fmt_figure((published, std))} / {ours:+.2f} ({source})")
        md_rows.append(cells)
        if base_row.get(row) in by:
            base = base_row[row]
            diffs = paired_differences(
                {s: r["top1"] for s, r in per.items()}, {s: r["top1"] for s, r in by[base].items()}
            )
            m, sd = mean_std(list(diffs.values()))
            rows.append(
                {
                    "row": f"{row} - {base}",
                    "seeds": len(diffs),
                    "top1_mean": m,
                    "top1_std": sd,
                    "per_seed_top1": json.dumps({s: round(d, 5) for s, d in diffs.items()}),
                }
            )
            per_seed = ", ".join(f"s{s}: {d * 100:+.2f}" for s, d in diffs.items())
            diff_rows.append([f"{row} − {base}", per_seed, fmt(m, sd, seeds=len(diffs))])
    fields = ["row", "seeds"] + sorted({k for r in rows for k in r} - {"row", "seeds"})
    rows = [{k: r.get(k, "") for k in fields} for r in rows]
    header = ["row", "seeds", "test top-1 (%)", "test top-5 (%)", "last-layer norm"]
    md = markdown_table(header + (["paper top-1 (%) / ours − paper"] if paper else []), md_rows)
    md += "\n\nPaired differences in test top-1 (percentage points):\n\n"
    md += markdown_table(["comparison", "per seed", "mean ± std"], diff_rows)
    return rows, md


def _paper_note(base: TrainConfig, paper: dict[str, tuple], paper_figures: str | Path | None) -> str:
    if paper_figures:
        return f"Paper top-1 from {paper_figures}."
    aug = "mixup" if base.mixup > 0 else "basic"
    if not paper:
        return (
            f"The paper's Tables 3–4 have no row for model {base.model} on {base.data} ({aug} augmentation); "
            "`--paper-figures CSV` sets other figures beside."
        )
    tables = " and ".join(sorted({source for _, source in paper.values()}))
    return (
        f"Paper: {tables} of {CITATION}, mean ± std as printed, matched on model {base.model}, data {base.data}, "
        f"{aug} augmentation, scheme (and SOS batch b); shipped in {PAPER_DIR.name}/ with a README of the places "
        "where the printed tables contradict each other (Table 4 at b = 300 is not Table 3's SGD+SOS). The paper's "
        "setting: 300 epochs, batch 64, weight decay 1e-4, flip-only augmentation (ours adds a padded random crop)."
    )


def reproduce_classify(
    preset: str,
    out: Path,
    *,
    seeds: list[int],
    schemes: tuple[str, ...] = SCHEMES,
    overrides: dict[str, Any] | None = None,
    paper_figures: str | Path | None = None,
    sos_batches: list[int] | None = None,
) -> tuple[Path, Path]:
    """Train every scheme × seed (× SOS batch b for the SOS schemes, with sos_batches); finished runs are read back,
    interrupted ones resumed. Writes classify.md and classify.csv, the paper's matching figures beside."""
    base = replace(PRESETS[preset], **(overrides or {}))
    base.check()
    for b in sos_batches or ():
        replace(base, sos_batch=b).check()
    out = out.resolve()
    plan = [
        (scheme, b) for scheme in schemes for b in (sos_batches if sos_batches and scheme.endswith("+sos") else [None])
    ]
    results = [run_scheme(scheme, seed, base, out, b) for seed in seeds for scheme, b in plan]
    labels = {run_label(scheme, b): (scheme, b) for scheme, b in plan}
    if paper_figures:
        given = read_paper_figures(paper_figures)
        paper = {row: ((given[s], math.nan), "given") for row, (s, _) in labels.items() if s in given}
    else:
        paper = published_figures(base, labels)
    rows, table = aggregate(results, paper)
    write_csv(out / "classify.csv", rows)
    settings = {
        k: v
        for k, v in asdict(with_imgsz(base)).items()
        if k not in ("project", "name", "exist_ok", "optimizer", "sos", "seed", "resume")
    }
    (out / "classify.md").write_text(
        f"# Classification reproduction — preset `{preset}`\n\n{table}\n\nFinal-epoch test accuracy, mean ± sample "
        f"std over seeds {seeds}. {_paper_note(base, paper, paper_figures)}\nSettings: {json.dumps(settings)}\n"
    )
    return out / "classify.md", out / "classify.csv"
