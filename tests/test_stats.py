"""The report's statistics against published tables and hand computations (never against themselves)."""

from __future__ import annotations

import math

import pytest

from cbn_detect.stats import estimate, finite, paired_differences, regularized_incomplete_beta, t_cdf, t_quantile

# Student-t quantiles as printed in standard tables (4 decimals, so within 5e-5 of the true value).
T_0975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 120: 1.9799}
T_095 = {1: 6.3138, 2: 2.9200, 5: 2.0150, 10: 1.8125}
T_0995 = {1: 63.6567, 3: 5.8409, 10: 3.1693}
TABLE_TOLERANCE = 5.1e-5


@pytest.mark.parametrize("df, expected", sorted(T_0975.items()))
def test_t_quantile_0975_matches_the_table(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=TABLE_TOLERANCE)


@pytest.mark.parametrize("p, table", [(0.95, T_095), (0.995, T_0995)])
def test_t_quantile_other_levels_match_the_table(p: float, table: dict[int, float]) -> None:
    for df, expected in table.items():
        assert t_quantile(p, df) == pytest.approx(expected, abs=TABLE_TOLERANCE), df


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999, 0.99999])
def test_t_quantile_matches_the_closed_forms_for_one_and_two_df(p: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 has t = (2p - 1) / sqrt(2p(1 - p)).
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_is_symmetric_and_tends_to_the_normal() -> None:
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=TABLE_TOLERANCE)
    assert t_quantile(0.975, 1_000_000) == pytest.approx(1.959964, abs=1e-5)
    assert t_cdf(t_quantile(0.9, 3.5), 3.5) == pytest.approx(0.9, abs=1e-12)  # non-integer df


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (-0.1, 3), (0.975, 0), (0.975, -1)])
def test_t_quantile_refuses_arguments_outside_its_domain(p: float, df: float) -> None:
    with pytest.raises(ValueError):
        t_quantile(p, df)


def test_incomplete_beta_matches_closed_forms() -> None:
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b.
    assert regularized_incomplete_beta(0.3, 2.5, 1.0) == pytest.approx(0.3**2.5, rel=1e-12)
    assert regularized_incomplete_beta(0.7, 1.0, 4.0) == pytest.approx(1 - 0.3**4, rel=1e-12)
    assert regularized_incomplete_beta(0.0, 2.0, 3.0) == 0.0
    assert regularized_incomplete_beta(1.0, 2.0, 3.0) == 1.0


def test_finite_drops_none_nan_and_inf() -> None:
    assert finite([0.1, None, math.nan, math.inf, -math.inf, 2]) == [0.1, 2.0]


def test_estimate_matches_a_hand_computation() -> None:
    # values 0.1, 0.2, 0.4: mean 0.7/3; squared deviations 0.1/3^2 + ... = 0.0466667, / (n - 1) = 0.0233333
    result = estimate([0.1, 0.2, None, 0.4, math.nan])
    assert result.n == 3
    assert result.mean == pytest.approx(0.2333333, abs=1e-7)
    assert result.std == pytest.approx(math.sqrt(0.0233333), abs=1e-6)  # 0.152753
    # 95% half-width: t(0.975, 2) * sd / sqrt(3) = 4.3027 * 0.152753 / 1.732051 = 0.379464
    assert result.half_width == pytest.approx(0.379464, abs=1e-5)
    assert (result.low, result.high) == pytest.approx((0.2333333 - 0.379464, 0.2333333 + 0.379464), abs=1e-5)


def test_estimate_leaves_undefined_numbers_undefined() -> None:
    empty = estimate([None, math.nan])
    assert (empty.n, empty.mean, empty.std, empty.half_width, empty.low) == (0, None, None, None, None)
    single = estimate([0.5])
    assert (single.n, single.mean, single.std, single.half_width, single.high) == (1, 0.5, None, None, None)


def test_estimate_at_another_confidence() -> None:
    # 90%: t(0.95, 1) = 6.3138; values 1, 3 have sd sqrt(2): half-width 6.3138 * sqrt(2) / sqrt(2).
    assert estimate([1.0, 3.0], confidence=0.90).half_width == pytest.approx(6.3138, abs=TABLE_TOLERANCE)


def test_paired_differences_keep_only_seeds_finite_on_both_sides() -> None:
    treatment = {0: 0.5, 1: 0.6, 2: None, 3: 0.7, 4: math.nan}
    baseline = {0: 0.4, 1: 0.65, 2: 0.3, 3: math.inf, 4: 0.2, 5: 0.9}
    assert paired_differences(treatment, baseline) == pytest.approx({0: 0.1, 1: -0.05})
    assert paired_differences({}, baseline) == {}
