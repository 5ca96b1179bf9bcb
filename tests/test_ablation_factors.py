"""benchmarks/ablation_factors.py on a small ab.csv written by the harness's own table code (ab_report.aggregate,
stats.write_csv) from hand-made per-seed mAPs: main effects, simple effects, interactions and variance shares
against numpy/scipy on the array arm × seed."""

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from sos_detect.core.runs import write_csv
from sos_detect.reproduce.ab_report import aggregate

REPO = Path(__file__).resolve().parents[1]
ORDERS, EMAS, BS = ("end", "start"), ("grams", "follow"), ("32", "48", "60")
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def factors():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports ab_power as a sibling, as when run
    try:
        spec = importlib.util.spec_from_file_location("ablation_factors", REPO / "benchmarks" / "ablation_factors.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def _study(tmp_path, drop=None, alias=None):
    """ab.csv of base + 12 paper arms × 3 seeds; mAP50 in 5 decimals, with main effects, interactions and noise;
    `alias` (o, e, b) → (o, e, b): that arm copies another's mAPs; returns the path and the array
    D[seed, order, EMA, b] of (arm − base) in mAP50."""
    rng = np.random.default_rng(7)
    base = {s: 0.33 + 0.002 * s for s in SEEDS}
    d = np.zeros((3, 2, 2, 3))
    results = [{"model": "m", "arm": "base", "seed": s, "map50": base[s], "map5095": base[s] - 0.1} for s in SEEDS]
    for (o, e, b), s in itertools.product(itertools.product(range(2), range(2), range(3)), SEEDS):
        value = round(base[s] - 0.05 + 0.02 * o + 0.004 * e + 0.01 * b + 0.006 * o * e - 0.003 * o * b
                      + rng.normal(0, 0.004), 5)  # fmt: skip
        if alias and (o, e, b) in alias:
            value = d[(s, *alias[(o, e, b)])] + base[s]
        d[s, o, e, b] = value - base[s]
        arm = f"paper-{ORDERS[o]}-{EMAS[e]}-b{BS[b]}"
        if arm != drop:
            results.append({"model": "m", "arm": arm, "seed": s, "map50": value, "map5095": value - 0.1})
    arms = ["base", *dict.fromkeys(r["arm"] for r in results[3:])]
    rows, _ = aggregate(results, arms)
    write_csv(tmp_path / "ab.csv", rows)
    return tmp_path / "ab.csv", d


def _check(summary, diffs):
    assert summary.n == 3
    assert summary.mean == pytest.approx(diffs.mean(), abs=1e-9)
    lo, hi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (summary.ci_low, summary.ci_high) == pytest.approx((lo, hi), abs=1e-8)


def test_effects_and_interactions_match_numpy(factors, tmp_path):
    path, d = _study(tmp_path)
    rows = dict(factors.contrasts(factors.cells(path, "map50")))
    _check(rows["paper mode (all 12 arms) − base"], d.mean(axis=(1, 2, 3)))
    _check(rows["order: start vs end"], d[:, 1].mean(axis=(1, 2)) - d[:, 0].mean(axis=(1, 2)))
    _check(rows["EMA: follow vs grams"], d[:, :, 1].mean(axis=(1, 2)) - d[:, :, 0].mean(axis=(1, 2)))
    _check(rows["b: 60 vs 32"], d[..., 2].mean(axis=(1, 2)) - d[..., 0].mean(axis=(1, 2)))
    order_at = {e: d[:, 1, e].mean(axis=1) - d[:, 0, e].mean(axis=1) for e in range(2)}
    _check(rows["order: start vs end at EMA = follow"], order_at[1])
    _check(rows["order × EMA: (start − end) at follow − at grams"], order_at[1] - order_at[0])
    order_b = {b: d[:, 1, :, b].mean(axis=1) - d[:, 0, :, b].mean(axis=1) for b in range(3)}
    _check(rows["order × b: (start − end) at 48 − at 32"], order_b[1] - order_b[0])
    ema_b = {b: d[:, :, 1, b].mean(axis=1) - d[:, :, 0, b].mean(axis=1) for b in range(3)}
    _check(rows["EMA × b: (follow − grams) at 60 − at 32"], ema_b[2] - ema_b[0])
    _check(rows["order: start vs end at EMA = grams, b = 48"], d[:, 1, 0, 1] - d[:, 0, 0, 1])
    _check(rows["order: start vs end at EMA = follow, b = 60"], d[:, 1, 1, 2] - d[:, 0, 1, 2])
    # the built-in order effect: +2 points, plus the order × EMA (+0.3) and order × b (−0.3) terms averaged
    assert rows["order: start vs end"].mean == pytest.approx(0.02 + 0.003 - 0.003, abs=0.006)


def test_variance_shares_match_numpy(factors, tmp_path):
    path, d = _study(tmp_path)
    shares = factors.variance_shares(factors.cells(path, "map50"))
    m = d.mean(axis=0)
    g = m.mean()
    total = ((m - g) ** 2).sum()
    mo, me, mb = m.mean(axis=(1, 2)), m.mean(axis=(0, 2)), m.mean(axis=(0, 1))
    assert shares["order"] == pytest.approx(6 * ((mo - g) ** 2).sum() / total, rel=1e-6)
    assert shares["b"] == pytest.approx(4 * ((mb - g) ** 2).sum() / total, rel=1e-6)
    moe = m.mean(axis=2)
    inter = moe - mo[:, None] - me[None, :] + g
    assert shares["order × EMA"] == pytest.approx(3 * (inter**2).sum() / total, rel=1e-6)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_report_identical_arms_and_a_missing_arm(factors, tmp_path):
    path, _ = _study(tmp_path)
    text = factors.report(path)
    assert "## map50" in text and "## map5095" in text and "| order: start vs end |" in text
    assert "equal on every seed" not in text
    # start-follow copies end-follow (as when the validated EMA is the unshifted model in both): order at follow is 0
    path, _ = _study(tmp_path, alias={(1, 1, b): (0, 1, b) for b in range(3)})
    data = factors.cells(path, "map50")
    assert factors.identical(data) == [[("end", "follow", b), ("start", "follow", b)] for b in BS]
    at_follow = dict(factors.contrasts(data))["order: start vs end at EMA = follow"]
    assert (at_follow.mean, at_follow.std, at_follow.ci_low, at_follow.ci_high) == pytest.approx((0, 0, 0, 0), abs=1e-9)
    assert "Arms equal on every seed: paper-end-follow-b32; paper-start-follow-b32 | " in factors.report(path)
    path, _ = _study(tmp_path, drop="paper-start-follow-b48")
    with pytest.raises(SystemExit, match=r"ab.csv: map50 lacks the arms \[\('start', 'follow', '48'\)\]"):
        factors.cells(path, "map50")
