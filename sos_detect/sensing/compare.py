"""`sos-detect reproduce sensing`: every trainer on a few sensing problems over seeds, exact diagnostics, each
method paired against GD on the same problem and initialisation.

Every method runs with the same learning rate and step budget. The one hyper-parameter of a method (σ, ρ or τ)
is chosen from its grid by the lowest test error on a separate tuning problem (seed `TUNING_SEED`, never
reported), then fixed for the reported seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sos_detect.core.runs import finished_record, write_csv, write_text_atomic
from sos_detect.core.runtime import one_thread
from sos_detect.core.stats import markdown_table, mean_std, paired_summary
from sos_detect.sensing.diagnostics import diagnose
from sos_detect.sensing.problem import SensingConfig, SensingProblem
from sos_detect.sensing.shifting import shift_last_factor
from sos_detect.sensing.trainers import Method, TrainSettings, train

TUNING_SEED = 1000
METRICS = ("train_loss", "test_error", "trace", "lambda_max", "nuclear", "last_norm")
PAIRED = ("test_error", "trace", "nuclear", "train_loss")  # paired differences with a 95 % t-interval
COMPARISONS = (("nso", "gd+noise"),)  # besides every method against GD
LABELS = {
    "train_loss": "train loss",
    "test_error": "test error",
    "trace": "tr(H)",
    "lambda_max": "λ_max",
    "nuclear": "‖X‖_*",
    "last_norm": "‖W_L‖_F",
}


@dataclass(frozen=True)
class Case:
    config: SensingConfig
    settings: TrainSettings


# Trainers in table order: (method, grid of its hyper-parameter; empty = fixed). "posthoc_*" rows are not
# trained: they shift the last factor of that seed's GD solution once. One grid for σ, ρ and τ alike.
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
METHODS: tuple[tuple[Method, tuple[float, ...]], ...] = (
    (Method("gd", "gd"), ()),
    (Method("gd+os", "os", 0.0), ()),
    (Method("gd+os_tau", "os"), GRID),
    (Method("gd+noise", "noise"), GRID),
    (Method("nso", "nso"), GRID),
    (Method("sam", "sam"), GRID),
)
POSTHOC: tuple[tuple[str, tuple[float, ...]], ...] = (("posthoc_os", (0.0,)), ("posthoc_os_tau", GRID))
HYPER = {"os": "τ", "noise": "σ", "nso": "σ", "sam": "ρ"}

# The same learning rate and step budget for every method and case: by 1000 steps GD's test error has settled
# in every case (within 0.003 of its value at 3000 steps, seeds 0 and 1).
SETTINGS = TrainSettings(steps=1000, lr=0.3, perturbations=2, shift_every=100)
PRESETS: dict[str, tuple[Case, ...]] = {
    "default": (
        Case(SensingConfig(d=10, r=2, n=60, depth=2, init=0.1), SETTINGS),  # moderate initialisation
        Case(SensingConfig(d=10, r=2, n=60, depth=2, init=0.5), SETTINGS),  # large: GD's low-rank bias is weak
        Case(SensingConfig(d=10, r=2, n=60, depth=3, init=0.3), SETTINGS),
        Case(SensingConfig(d=8, r=1, n=24, depth=3, init=0.3), SETTINGS),
    ),
    # One small problem in seconds, for a quick check of the pipeline (and the tests).
    "tiny": (Case(SensingConfig(d=5, r=1, n=12, depth=2, init=0.1), TrainSettings(steps=100, lr=0.3, shift_every=25)),),
}


def tune(case: Case) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Each method's hyper-parameter: the grid value with the lowest test error on the tuning problem."""
    problem = SensingProblem.generate(case.config, TUNING_SEED)
    init = problem.initial_factors(TUNING_SEED)
    trials: list[dict[str, Any]] = []
    for method, grid in METHODS:
        for value in grid:
            error = _test_error_or_inf(problem, init, replace(method, value=value), case.settings)
            trials.append({"method": method.name, "value": value, "test_error": error})
    gd = train(problem, init, METHODS[0][0], case.settings, TUNING_SEED)
    for name, grid in POSTHOC:
        for value in grid:
            shifted = [w.clone() for w in gd]
            shift_last_factor(problem, shifted, tau=value)
            trials.append({"method": name, "value": value, "test_error": problem.test_error(shifted)})
    chosen = {}
    for name in dict.fromkeys(t["method"] for t in trials):
        best = min((t for t in trials if t["method"] == name), key=lambda t: t["test_error"])
        chosen[name] = best["value"]
    for t in trials:
        t["chosen"] = chosen[t["method"]] == t["value"]
    return chosen, trials


def _test_error_or_inf(problem: SensingProblem, init, method: Method, settings: TrainSettings) -> float:
    try:
        return problem.test_error(train(problem, init, method, settings, TUNING_SEED))
    except FloatingPointError:
        return math.inf


def run_seed(case: Case, chosen: dict[str, float], seed: int) -> list[dict[str, Any]]:
    """Every method on one seed's problem and initialisation, with exact diagnostics of its final factors."""
    problem = SensingProblem.generate(case.config, seed)
    init = problem.initial_factors(seed)
    records, gd = [], None
    for method, grid in METHODS:
        m = replace(method, value=chosen[method.name]) if grid else method
        factors = train(problem, init, m, case.settings, seed)
        records.append(_record(problem, m.name, m.value, seed, factors))
        gd = factors if m.kind == "gd" else gd
    for name, _ in POSTHOC:
        shifted = [w.clone() for w in gd]
        shift_last_factor(problem, shifted, tau=chosen[name])
        records.append(_record(problem, name, chosen[name], seed, shifted))
    return records


def _record(problem: SensingProblem, name: str, value: float, seed: int, factors) -> dict[str, Any]:
    return {"method": name, "value": value, "seed": seed, **diagnose(problem, factors).as_dict()}


def run_case(case: Case, seeds: list[int], folder: Path) -> dict[str, Any]:
    """Tune, then run every seed; the result is kept in `folder`/<case>.json and read back when rerun."""
    if TUNING_SEED in seeds:
        raise ValueError(f"--seeds: seed {TUNING_SEED} is the tuning problem's; choose other seeds")
    key = {
        "config": asdict(case.config),
        "settings": asdict(case.settings),
        "seeds": seeds,
        "methods": [[asdict(m), list(g)] for m, g in METHODS],
        "posthoc": [[n, list(g)] for n, g in POSTHOC],
    }
    path = folder / f"{case.config.label}.json"
    saved = finished_record(path, json.loads(json.dumps(key)), key="key")
    if saved is not None:
        return saved
    from ultralytics.utils import TQDM

    chosen, trials = tune(case)
    records = [r for seed in TQDM(seeds, desc=f"sensing {case.config.label}") for r in run_seed(case, chosen, seed)]
    result = {"key": key, "case": case.config.label, "chosen": chosen, "tuning": trials, "records": records}
    write_text_atomic(path, json.dumps(result, indent=1))
    return result


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case and method against GD: mean ± std of every metric and the differences paired by seed;
    then one row per extra comparison in `COMPARISONS` (differences only)."""
    rows = []
    for res in results:
        per = {}
        for r in res["records"]:
            per.setdefault(r["method"], {})[r["seed"]] = r
        for name, runs in per.items():
            row: dict[str, Any] = {"case": res["case"], "method": name, "baseline": "gd"}
            row |= {"value": runs[min(runs)]["value"], "seeds": len(runs)}
            for k in METRICS:
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in runs.values()])
            rows.append(row | (_paired(runs, per["gd"]) if name != "gd" else {}))
        for name, baseline in COMPARISONS:
            row = {"case": res["case"], "method": name, "baseline": baseline, "seeds": len(per[name])}
            rows.append(row | _paired(per[name], per[baseline]))
    return rows


def _paired(runs: dict[int, dict], baseline: dict[int, dict]) -> dict[str, float]:
    """Per metric in PAIRED: mean of run − baseline over shared seeds, its 95 % t-interval, seeds where lower."""
    out: dict[str, float] = {}
    for k in PAIRED:
        summary = paired_summary({s: r[k] for s, r in runs.items()}, {s: r[k] for s, r in baseline.items()})
        out[f"d_{k}_mean"], out[f"d_{k}_lo"], out[f"d_{k}_hi"] = summary.mean, summary.ci_low, summary.ci_high
        out[f"d_{k}_lower"] = summary.n_neg
    return out


def correlations(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pearson r per case over all runs: pooled, and within seed (each seed's mean over methods removed)."""
    out = []
    for res in results:
        recs = res["records"]
        for a, b in (("trace", "nuclear"), ("test_error", "trace"), ("test_error", "nuclear")):
            x, y = (np.array([r[k] for r in recs]) for k in (a, b))
            seeds = np.array([r["seed"] for r in recs])
            xc, yc = x.copy(), y.copy()
            for s in set(seeds.tolist()):
                xc[seeds == s] -= x[seeds == s].mean()
                yc[seeds == s] -= y[seeds == s].mean()
            out.append(
                {
                    "case": res["case"],
                    "x": a,
                    "y": b,
                    "pooled_r": _pearson(x, y),
                    "within_seed_r": _pearson(xc, yc),
                    "runs": len(recs),
                }
            )
    return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g} ± {std:.2g}"


def _diff(row: dict[str, Any], k: str) -> str:
    if f"d_{k}_mean" not in row:
        return "–"
    mean, lo, hi = (row[f"d_{k}_{s}"] for s in ("mean", "lo", "hi"))
    return f"{mean:+.3g} [{lo:+.3g}, {hi:+.3g}] ({row[f'd_{k}_lower']}/{row['seeds']})"


def markdown(results: list[dict[str, Any]], rows: list[dict[str, Any]], corr: list[dict[str, Any]]) -> str:
    kinds = {m.name: m.kind for m, _ in METHODS} | {n: "os" for n, _ in POSTHOC}
    shown = ("test_error", "trace", "nuclear")
    parts = []
    for res in results:
        header = ["method", "hyper-parameter"] + [LABELS[k] for k in METRICS]
        header += [f"Δ {LABELS[k]} vs GD [95 % CI] (seeds lower)" for k in shown]
        body = [
            [r["method"], f"{HYPER[kinds[r['method']]]} = {r['value']:g}" if kinds[r["method"]] in HYPER else "–"]
            + [_pm(r[f"{k}_mean"], r[f"{k}_std"]) for k in METRICS]
            + [_diff(r, k) for k in shown]
            for r in rows
            if r["case"] == res["case"] and r["baseline"] == "gd"
        ]
        parts.append(f"## {res['case']}\n\n{markdown_table(header, body)}")
    extra = ("test_error", "trace", "train_loss")
    body = [
        [r["case"], f"{r['method']} − {r['baseline']}"] + [_diff(r, k) for k in extra]
        for r in rows
        if r["baseline"] != "gd"
    ]
    parts.append(
        "## Paired comparisons besides GD (each method at its own tuned hyper-parameter)\n\n"
        + markdown_table(["case", "comparison"] + [f"Δ {LABELS[k]} [95 % CI] (seeds lower)" for k in extra], body)
    )
    corr_rows = [
        [c["case"], f"{LABELS[c['x']]} vs {LABELS[c['y']]}"]
        + [f"{c['pooled_r']:+.3f}", f"{c['within_seed_r']:+.3f}", str(c["runs"])]
        for c in corr
    ]
    parts.append(
        "## Correlations over all runs of a case (Pearson r; within seed: each seed's mean over methods removed)\n\n"
        + markdown_table(["case", "pair", "pooled r", "within-seed r", "runs"], corr_rows)
    )
    return "\n\n".join(parts)


# How each method is drawn: legend label, colour, marker. Hollow markers of distinct shapes, so that methods ending at
# the same point (SAM with a tiny ρ on GD, say) stay visible on top of each other.
METHOD_STYLE = {
    "gd": ("GD (the origin of the top row)", "black", "o"),
    "gd+os": ("GD + optimum shifting, τ = 0 (periodic)", "C1", "s"),
    "gd+os_tau": ("GD + guarded optimum shifting (τ tuned)", "C2", "D"),
    "gd+noise": ("GD + noise injection (σ tuned)", "C3", "v"),
    "nso": ("NSO (σ tuned)", "C0", "^"),
    "sam": ("SAM (ρ tuned)", "C5", "P"),
    "posthoc_os": ("GD, then one shift, τ = 0", "C6", "x"),
    "posthoc_os_tau": ("GD, then one guarded shift (τ tuned)", "C7", "+"),
}


def case_title(config: dict[str, Any]) -> str:
    """A case's problem in words: d×d ground truth of rank r, n measurements, depth L, initial scale α."""
    c = config
    size = f"{c['d']}×{c['d']}, rank {c['r']}, {c['n']} measurements"
    return f"{size}\ndepth {c['depth']}, initial scale α = {c['init']:g}"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Per case, one point per method and seed: test error against tr(H), both as differences from GD on the same
    seed (the problem-to-problem spread removed; GD is the origin), and tr(H) against ‖X‖_*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for res in results for r in res["records"]))
    fig, axes = plt.subplots(2, len(results), figsize=(max(4.4 * len(results), 6.4), 8.2), squeeze=False)
    for col, res in enumerate(results):
        gd = {r["seed"]: r for r in res["records"] if r["method"] == "gd"}
        top, bottom = axes[0, col], axes[1, col]
        for name in names:
            recs = [r for r in res["records"] if r["method"] == name]
            label, colour, marker = METHOD_STYLE.get(name, (name, "0.4", "o"))
            filled = marker in "x+"  # line markers have no face
            style = dict(
                label=label,
                marker=marker,
                s=40,
                linewidths=1.2,
                edgecolors=None if filled else colour,
                facecolors=colour if filled else "none",
            )
            top.scatter(
                [r["trace"] - gd[r["seed"]]["trace"] for r in recs],
                [r["test_error"] - gd[r["seed"]]["test_error"] for r in recs],
                **style,
            )
            bottom.scatter([r["nuclear"] for r in recs], [r["trace"] for r in recs], **style)
        top.axhline(0, color="0.7", lw=0.8)
        top.axvline(0, color="0.7", lw=0.8)
        top.set(title=case_title(res["key"]["config"]), xlabel="tr(H) − GD's (same seed)")
        top.set_ylabel("test error − GD's (same seed)")
        bottom.set(xlabel="‖X‖_* (nuclear norm)", ylabel="tr(H)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    seeds = sorted({r["seed"] for res in results for r in res["records"]})
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2 if len(results) < 3 else 4,
        fontsize=9,
        frameon=False,
        title=f"one point per method and seed ({len(seeds)} seeds); top row: below 0 = lower test error than GD",
        title_fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend below the axes is inside the image
    plt.close(fig)


def reproduce_sensing(preset: str, out: Path, seeds: list[int]) -> tuple[Path, Path, Path, Path]:
    """Run (or read back) every case of the preset; write sensing.md, sensing.csv, runs.csv and sensing.png."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown {preset!r}; choose from {tuple(PRESETS)}")
    if len(seeds) < 2:
        raise ValueError("--seeds: need at least 2 seeds for a paired interval")
    out.mkdir(parents=True, exist_ok=True)
    with one_thread():  # a 100×100 eigh took up to 0.9 s with two threads here, 13 ms with one
        results = [run_case(case, seeds, out / "runs") for case in PRESETS[preset]]
    rows = aggregate(results)
    corr = correlations(results)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / "sensing.csv", [{k: r.get(k, "") for k in fields} for r in rows])
    write_csv(out / "runs.csv", [{"case": res["case"], **r} for res in results for r in res["records"]])
    write_csv(out / "tuning.csv", [{"case": res["case"], **t} for res in results for t in res["tuning"]])
    write_csv(out / "correlations.csv", corr)
    settings = {c.config.label: asdict(c.settings) for c in PRESETS[preset]}
    (out / "sensing.md").write_text(
        f"# Matrix sensing testbed — preset `{preset}`, seeds {seeds}\n\n"
        "Final iterates; mean ± sample std over seeds; Δ = method − GD paired by seed, mean [95 % t-interval] "
        "(number of seeds where the method is lower). Hyper-parameters: the grid value with the lowest test error "
        f"on the tuning problem (seed {TUNING_SEED}). Same learning rate and step budget for every method: "
        f"{json.dumps(settings)}\n\n{markdown(results, rows, corr)}\n"
    )
    plot(results, out / "sensing.png")
    return out / "sensing.md", out / "sensing.csv", out / "runs.csv", out / "sensing.png"
