"""The one paired summary (core/stats.py) against scipy: t-interval, paired t-test p, minimum detectable effect
(t-quantile formula, and its distance from the exact noncentral-t power), Holm's adjustment against the
procedure itself, and what one seed prints."""

import math

import numpy as np
import pytest
from scipy import stats

from sos_detect.core.stats import (
    holm,
    mean_std,
    min_detectable_effect,
    paired_summary,
    sign_test,
    t_interval,
    t_quantile,
    t_test_p,
    with_holm,
)

SAMPLES = (
    [0.3, -0.1, 0.5, 0.2, 0.4],
    [1.0, 2.5],
    [-0.02, -0.01, 0.0, -0.03, 0.01, -0.05],
    [-4.2, -5.1, -3.9, -6.0, -4.6, -5.5, -3.1, -4.8, -5.0],
)


def _exact_power(effect: float, sd: float, n: int) -> float:
    """Power of the two-sided paired t-test at α = 0.05 for a true mean difference `effect` (noncentral t)."""
    df, crit = n - 1, stats.t.ppf(0.975, n - 1)
    ncp = effect / (sd / math.sqrt(n))
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


@pytest.mark.parametrize("diffs", SAMPLES)
def test_paired_summary_matches_scipy(diffs):
    control = {s: 10.0 + s for s in range(len(diffs))}
    treated = {s: control[s] + d for s, d in enumerate(diffs)}
    treated[99] = 1.0  # a seed without its pair is not in the summary
    s = paired_summary(treated, control)
    x, y = np.array([treated[i] for i in range(len(diffs))]), np.array([control[i] for i in range(len(diffs))])
    d = x - y
    assert s.n == len(diffs) and s.mean == pytest.approx(d.mean(), abs=1e-12)
    assert s.std == pytest.approx(d.std(ddof=1), rel=1e-9)
    ci = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (s.ci_low, s.ci_high) == pytest.approx(ci, rel=1e-9)
    assert s.t_p == pytest.approx(stats.ttest_rel(x, y).pvalue, rel=1e-9, abs=1e-14)
    mde = (stats.t.ppf(0.975, len(d) - 1) + stats.t.ppf(0.8, len(d) - 1)) * d.std(ddof=1) / math.sqrt(len(d))
    assert s.mde == pytest.approx(mde, rel=1e-9)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    assert (s.n_pos, s.n_neg, s.sign_p) == (pos, neg, pytest.approx(stats.binomtest(pos, pos + neg).pvalue))


@pytest.mark.parametrize("n,low,high", [(3, 0.74, 0.8), (5, 0.785, 0.8), (8, 0.795, 0.8), (30, 0.799, 0.801)])
def test_mde_is_the_t_quantile_approximation_of_80_percent_power(n, low, high):
    # the docstring's claim: the formula sits just below the exact noncentral-t MDE, so its exact power is a little
    # under 80 % (within 0.1 % of it from n = 15 on; n = 2 is left out: scipy's noncentral t is unreliable at 1 df)
    assert low <= _exact_power(min_detectable_effect(1.0, n), 1.0, n) <= high


def _holm_by_procedure(p: list[float]) -> list[float]:
    """Adjusted p_i = the smallest level α at which Holm's step-down procedure rejects H_i (scanned over every
    level where the decisions can change)."""
    k = len(p)
    order = sorted(range(k), key=lambda i: p[i])
    levels = sorted({min(1.0, (k - j) * p[i]) for j, i in enumerate(order)} | {1.0})
    out = [math.inf] * k
    for alpha in levels:
        for j, i in enumerate(order):
            if p[i] > alpha / (k - j):
                break
            out[i] = min(out[i], alpha)
    return [1.0 if math.isinf(v) else v for v in out]


@pytest.mark.parametrize(
    "p",
    [[0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.01], [0.5], [1e-6, 0.9, 0.04, 0.012, 0.03, 0.3], [0.03, 0.03, 0.03]],
)
def test_holm_equals_the_procedure(p):
    assert holm(p) == pytest.approx(_holm_by_procedure(p), rel=1e-12)
    assert holm([*p, math.nan])[:-1] == pytest.approx(holm(p)) and math.isnan(holm([*p, math.nan])[-1])


def test_with_holm_adjusts_across_the_family():
    summaries = [paired_summary(dict(enumerate(d)), dict.fromkeys(range(len(d)), 0.0)) for d in SAMPLES]
    adjusted = with_holm(summaries)
    assert [s.holm_p for s in adjusted] == pytest.approx(_holm_by_procedure([s.t_p for s in summaries]))
    assert all(a.t_p == s.t_p and a.ci_low == s.ci_low for a, s in zip(adjusted, summaries, strict=True))


def test_one_seed_has_no_interval_and_zero_spread_is_exact():
    one = paired_summary({0: 0.52}, {0: 0.50})
    cells = one.cells()
    assert cells[0] == "2.00 (n = 1)" and cells[1] == "n = 1: no interval" and "± 0.00" not in " ".join(cells)
    assert math.isnan(one.mde) and math.isnan(one.t_p) and cells[2:5] == ["–", "–", "–"]
    same = paired_summary({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # every difference +0.5
    assert (same.t_p, same.mde) == (0.0, 0.0)
    assert t_test_p([0.0, 0.0, 0.0]) == 1.0


def test_t_quantile_is_scipys_two_sided_quantile():
    """The closed-form t distribution (odd and even df) inverted by bisection, against scipy's."""
    for level in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
        for df in (1, 2, 3, 4, 5, 8, 29, 30, 200):
            assert t_quantile(level, df) == pytest.approx(stats.t.ppf((1 + level) / 2, df), rel=1e-9), (level, df)


@pytest.mark.parametrize("level", [0.8, 0.9, 0.99])
@pytest.mark.parametrize("values", SAMPLES)
def test_t_interval_at_any_level_matches_scipy(values, level):
    ref = stats.t.interval(level, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert t_interval(values, level) == pytest.approx(ref, rel=1e-9)
    assert t_interval([*values, math.nan], level) == pytest.approx(ref, rel=1e-9)  # NaN is not a value


@pytest.mark.parametrize("values", [*SAMPLES, [0.1, 0.2], [5.0, -5.0, 0.1]])
def test_t_test_p_is_scipys_one_sample_t_test(values):
    assert t_test_p(values) == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("alpha, power", [(0.05, 0.8), (0.01, 0.9), (0.1, 0.5), (0.05, 0.95)])
def test_min_detectable_effect_formula_at_any_level_and_power(alpha, power):
    for n in (2, 3, 7, 40):
        expected = (stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * 0.7 / math.sqrt(n)
        assert min_detectable_effect(0.7, n, alpha, power) == pytest.approx(expected, rel=1e-9), n
        assert math.isnan(min_detectable_effect(math.nan, n))
    assert math.isnan(min_detectable_effect(0.7, 1, alpha, power))


@pytest.mark.parametrize("values", [*SAMPLES, [0.0, 0.0, 0.3, -0.2, 0.0], [0.0, 0.0], [1e-3] * 12])
def test_sign_test_is_scipys_binomial_test_without_zeros(values):
    pos, neg, p = sign_test(values)
    assert (pos, neg) == (sum(v > 0 for v in values), sum(v < 0 for v in values))
    assert p == (1.0 if pos + neg == 0 else pytest.approx(stats.binomtest(pos, pos + neg).pvalue, rel=1e-12))


def test_mean_std_is_numpys_sample_std():
    for values in SAMPLES:
        assert mean_std([*values, math.nan, None]) == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    assert mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in mean_std([math.nan]))
