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

from sos_detect.classify.config import TrainConfig, with_imgsz
from sos_detect.classify.runs import CHECKPOINT, FINISHED, RESUME_FREE
from sos_detect.classify.train import train
from sos_detect.core.runs import finished_record, write_csv, write_text_atomic
from sos_detect.core.stats import (
    SUMMARY_HEADER,
    fmt,
    markdown_table,
    mean_std,
    paired_summary,
    with_holm,
)
from sos_detect.reproduce.jobs import core_shares, run_tasks
from sos_detect.reproduce.paper import CITATION, PAPER_DIR, fmt_figure, table3_top1, table4_top1

SCHEMES = ("sgd", "sgd+sos", "sam", "sam+sos", "nso", "nso+sos")
RUN_METRICS = ("top1", "top5", "train_acc", "last_norm")  # a run's final epoch: test top-1/5, training accuracy
PAIRED_METRICS = ("top1", "top5")  # SOS − without, paired by seed
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
    # The terminal phase of training, the regime of the paper's Neural Collapse argument: scikit-learn's digits
    # (1,347 training / 450 test images, in the wheel), the 64-64-10 MLP trained to 100 % training accuracy and well
    # beyond (200 epochs, ÷10 at 50 % and 75 %), paper-mode SOS every epoch; its last layer is m = 64 wide.
    "terminal": TrainConfig(
        model="mlp",
        data="digits",
        epochs=200,
        batch_size=64,
        lr=0.05,
        weight_decay=5e-4,
        schedule="step",
        sos_mode="paper",
        sos_batch=38,
        device="cpu",
    ),
}
# What a preset runs unless the command line says otherwise: seeds, schemes and the SOS batches b of a sweep (None:
# the config's one b). terminal: b from the number of classes (10) to ≈ 0.6·m = 38, 8 paired seeds.
PLANS: dict[str, dict[str, Any]] = {
    "paper": {"seeds": (0, 1, 2), "schemes": SCHEMES, "sos_batches": None},
    "mini": {"seeds": (0, 1, 2), "schemes": SCHEMES, "sos_batches": None},
    "terminal": {"seeds": tuple(range(8)), "schemes": ("sgd", "sgd+sos"), "sos_batches": (10, 16, 24, 32, 38)},
}


def run_label(scheme: str, sos_batch: int | None) -> str:
    """A table row: the scheme, with its SOS batch b in an SOS-batch sweep."""
    return scheme if sos_batch is None else f"{scheme} b={sos_batch}"


def run_name(scheme: str, seed: int, sos_batch: int | None = None) -> str:
    """A run's folder name under OUT/runs: SCHEME[_bB]_sSEED with + as _."""
    return scheme.replace("+", "_") + (f"_b{sos_batch}" if sos_batch is not None else "") + f"_s{seed}"


def run_scheme(scheme: str, seed: int, base: TrainConfig, out: Path, sos_batch: int | None = None) -> dict[str, Any]:
    """One finished run of `scheme` (read back when finished, resumed when interrupted) as a record for the table."""
    name = run_name(scheme, seed, sos_batch)
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
            "train_acc": float(final["train_acc"]),
            "last_norm": float(final["last_norm"]),
            "seconds": float(final["seconds"]),
            "config": torch.load(folder / FINISHED, map_location="cpu", weights_only=True)["config"],
        }
        write_text_atomic(done, json.dumps(record, indent=1))
    return finished_record(done, asdict(cfg), key="config", free=RESUME_FREE)


def run_task(folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """`run_scheme` as a task of the side-by-side runner (reproduce/jobs.py): `folder` is OUT/runs/NAME, `settings`
    {scheme, seed, sos_batch, base: the TrainConfig as a dict}."""
    base = TrainConfig(**settings["base"])
    return run_scheme(settings["scheme"], settings["seed"], base, folder.parent.parent, settings["sos_batch"])


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
    """Rows (mean ± std over seeds) and, per SOS row, its paired difference with the scheme without SOS in test
    top-1 and top-5 (`paired_summary`: 95 % t-interval, MDE at 80 % power, t-test p Holm-corrected across every
    comparison × metric of the table, sign test).

    `paper`: {row: ((top-1 %, std), source)} set beside the rows it names.
    """
    paper = paper or {}
    rows, md_rows, comparisons = [], [], []
    label = lambda r: r.get("row", r["scheme"])  # noqa: E731
    by = {row: {r["seed"]: r for r in results if label(r) == row} for row in dict.fromkeys(map(label, results))}
    base_row = {row: row.split(" ")[0][:-4] for row in by if row.split(" ")[0].endswith("+sos")}
    for row, per in by.items():
        stats = {k: mean_std([r.get(k, math.nan) for r in per.values()]) for k in RUN_METRICS}
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
        cells = [row, str(n), *(fmt(*stats[k], n=n) for k in ("top1", "top5", "train_acc"))]
        cells.append(fmt(*stats["last_norm"], 1.0, 3, n=n))
        if paper:
            ours = stats["top1"][0] * 100 - published
            cells.append("–" if row not in paper else f"{fmt_figure((published, std))} / {ours:+.2f} ({source})")
        md_rows.append(cells)
        if base_row.get(row) in by:
            base = base_row[row]
            for k in PAIRED_METRICS:
                treated, control = ({s: r[k] for s, r in runs.items()} for runs in (per, by[base]))
                comparisons.append((f"{row} - {base}", f"{row} − {base}", k, paired_summary(treated, control)))
    diff_rows, diff_cells = {}, []
    for (key, name, k, _), summary in zip(comparisons, with_holm([c[-1] for c in comparisons]), strict=True):
        cols = summary.row()
        diff_rows.setdefault(key, {"row": key, "seeds": cols.pop("seeds")})
        diff_rows[key] |= {f"{k}_{c}": v for c, v in cols.items() if c != "seeds"}
        diff_cells.append([name, k, *summary.cells()])
    rows += diff_rows.values()
    fields = ["row", "seeds"] + sorted({k for r in rows for k in r} - {"row", "seeds"})
    rows = [{k: r.get(k, "") for k in fields} for r in rows]
    header = ["row", "seeds", "test top-1 (%)", "test top-5 (%)", "train acc (%)", "last-layer norm"]
    md = markdown_table(header + (["paper top-1 (%) / ours − paper"] if paper else []), md_rows)
    md += "\n\nPaired differences, SOS − without (percentage points):\n\n"
    md += markdown_table(["comparison", "metric", *SUMMARY_HEADER], diff_cells)
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
    seeds: list[int] | None = None,
    schemes: tuple[str, ...] | None = None,
    overrides: dict[str, Any] | None = None,
    paper_figures: str | Path | None = None,
    sos_batches: list[int] | None = None,
    jobs: int = 1,
) -> tuple[Path, Path]:
    """Train every scheme × seed (× SOS batch b for the SOS schemes, with sos_batches), `jobs` runs side by side in
    processes pinned to their share of the cores (reproduce/jobs.py); finished runs are read back, interrupted ones
    resumed. Seeds, schemes and SOS batches default to the preset's plan (PLANS). Writes classify.md and
    classify.csv, the paper's matching figures beside."""
    core_shares(jobs)  # a --jobs this machine cannot pin: one line before anything trains
    defaults = PLANS[preset]
    seeds = list(defaults["seeds"] if seeds is None else seeds)
    schemes = tuple(defaults["schemes"] if schemes is None else schemes)
    sos_batches = list(defaults["sos_batches"] or []) if sos_batches is None else sos_batches
    overrides = dict(overrides or {})
    if "data" in overrides:  # the preset's subsets were chosen for its own dataset
        overrides = {"train_subset": None, "test_subset": None, **overrides}
    base = replace(PRESETS[preset], **overrides)
    base.check()
    for b in sos_batches or ():
        replace(base, sos_batch=b).check()
    out = out.resolve()
    plan = [
        (scheme, b) for scheme in schemes for b in (sos_batches if sos_batches and scheme.endswith("+sos") else [None])
    ]
    tasks = [
        (
            out / "runs" / run_name(scheme, seed, b),
            {"scheme": scheme, "seed": seed, "sos_batch": b, "base": asdict(base)},
        )
        for seed in seeds
        for scheme, b in plan
    ]
    results = run_tasks(run_task, tasks, jobs, out / "logs")
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
        f"# Classification reproduction — preset `{preset}`\n\n{table}\n\nFinal-epoch test accuracy (and the last "
        f"epoch's training accuracy, measured on the fly), mean ± sample std over seeds {seeds}; paired differences "
        "with a two-sided 95 % t-interval, the minimum detectable effect of a two-sided paired t-test at α = 0.05 "
        "with 80 % power (≈ (t_{0.975,n−1} + t_{0.8,n−1})·sd/√n), the t-test p and that p Holm-corrected across "
        f"the table's comparisons × metrics. {_paper_note(base, paper, paper_figures)}\n"
        f"Settings: {json.dumps(settings)}\n"
    )
    return out / "classify.md", out / "classify.csv"
