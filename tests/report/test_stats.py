"""The report's statistics against published tables and hand computations (never against themselves)."""

from __future__ import annotations

import math

import pytest

from cbn_detect import stats
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


def test_an_estimate_carries_its_confidence_whatever_its_size() -> None:
    for values in ([], [0.5], [0.5, 0.7]):
        assert stats.estimate(values).confidence == 0.95
        assert stats.estimate(values, confidence=0.9).confidence == 0.9


def test_paired_differences_go_on_past_a_seed_the_baseline_lacks() -> None:
    assert stats.paired_differences({7: 0.5, 1: 0.75, 2: 0.25}, {1: 0.5, 2: 0.5}) == {1: 0.25, 2: -0.25}


def test_t_cdf_matches_the_cauchy_closed_form_on_both_sides() -> None:
    # df = 1: P(T <= t) = 1/2 + atan(t) / pi
    for t in (-3.0, -1.0, -0.25, 0.0, 0.25, 0.5, 0.999, 1.0, 4.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13), t
    assert stats.t_upper_tail(0.0, 3) == 0.5


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: stats.t_upper_tail(-0.5, 3), "t must be >= 0, got -0.5"),
        (lambda: stats.t_quantile(0.0, 3), r"p must lie in \(0, 1\), got 0.0"),
        (lambda: stats.t_quantile(0.9, 0), "df must be positive, got 0"),
        (lambda: stats.regularized_incomplete_beta(1.5, 1, 1), r"x must lie in \[0, 1\], got 1.5"),
        (lambda: stats.regularized_incomplete_beta(0.5, 0, 1), "a and b must be positive, got a=0, b=1"),
        (lambda: stats.regularized_incomplete_beta(0.5, 1, 0), "a and b must be positive, got a=1, b=0"),
    ],
)
def test_each_domain_error_names_the_bad_value(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_the_continued_fraction_needs_few_terms_on_the_side_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With its term budget cut to 40, I_x(df/2, 1/2) for the t tails of 1..1e6 degrees of freedom is
    still exact: each side of the switch point uses the fraction where it converges fast (on the
    wrong side some need thousands of terms). References: I_x(a, 1) = x^a, I_x(1, b) = 1 - (1-x)^b,
    I_x(1/2, 1/2) = 2 asin(sqrt(x)) / pi, and the t tail of df = 2, P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2."""
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 40)
    for x in (1e-9, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-9):
        assert stats.regularized_incomplete_beta(x, 3.5, 1.0) == pytest.approx(x**3.5, rel=1e-12, abs=1e-300)
        assert stats.regularized_incomplete_beta(x, 1.0, 2.5) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
        arcsine = 2 * math.asin(math.sqrt(x)) / math.pi if x <= 0.5 else 1 - 2 * math.asin(math.sqrt(1 - x)) / math.pi
        assert stats.regularized_incomplete_beta(x, 0.5, 0.5) == pytest.approx(arcsine, rel=1e-12)
    for t in (0.001, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 1000.0):
        assert stats.t_upper_tail(t, 2) == pytest.approx((1 - t / math.sqrt(t * t + 2)) / 2, rel=1e-10), t
        assert stats.t_upper_tail(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10), t
        for df in (3, 10, 100, 1e4, 1e6):
            assert 0.0 <= stats.t_upper_tail(t, df) < 0.5  # no ArithmeticError: converged within the budget


def test_the_continued_fraction_gives_up_after_its_term_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # I_0.3(2, 3) = sum_{j=2..4} C(4, j) 0.3^j 0.7^(4-j) = 0.2646 + 0.0756 + 0.0081; the fraction
    # converges at its third term, so a budget of 3 terms suffices and one of 2 does not.
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 3)
    assert stats.regularized_incomplete_beta(0.3, 2.0, 3.0) == pytest.approx(0.3483, rel=1e-13)
    monkeypatch.setattr(stats, "_CF_MAX_ITER", 2)
    with pytest.raises(ArithmeticError, match=r"did not converge for x=0.3, a=2.0, b=3.0"):
        stats.regularized_incomplete_beta(0.3, 2.0, 3.0)


def test_the_continued_fraction_steps_over_a_zero_denominator() -> None:
    """Lentz's guard: at x = 1/2, a = 1, b = 3 the fraction's first denominator 1 - (a+b)x/(a+1) is
    exactly 0 (the public function never evaluates this side there, but the loop can meet such a
    zero later). Replaced by a tiny number, the fraction still converges to its closed form:
    I_x(1, 3) = 1 - (1-x)^3 = 7/8 = x (1-x)^3 / B(1, 3) * cf / 1, B(1, 3) = 1/3, so cf = 14/3."""
    assert stats._beta_continued_fraction(0.5, 1.0, 3.0) == pytest.approx(14 / 3, rel=1e-14)
