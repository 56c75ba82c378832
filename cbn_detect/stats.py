"""Small-sample statistics for the sweep report: a handful of seeds per cell, so intervals use Student's t.

Pure functions on plain numbers (numpy and ``math`` only); ``report/`` reads runs and draws, this
module decides what a mean, a spread and an interval are.

The Student-t quantile is implemented here instead of taken from scipy: scipy is not a dependency
of the project, and one function does not justify adding it. The quantile inverts the t CDF by
bisection; the CDF goes through the regularized incomplete beta function, evaluated by its
continued fraction (modified Lentz) with ``math.lgamma``, as in Numerical Recipes section 6.4.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

CONFIDENCE = 0.95

_CF_EPS = 1e-15
_CF_TINY = 1e-300
_CF_MAX_ITER = 10_000


def finite(values: Iterable[Any]) -> list[float]:
    """The usable numbers of ``values``: None (metric not recorded) and NaN/inf (a diverged run) dropped,
    since averaging them in would either crash or silently poison the mean."""
    kept = []
    for value in values:
        if value is None:
            continue
        number = float(value)
        if math.isfinite(number):
            kept.append(number)
    return kept


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with their sample standard deviation (ddof = 1) and the half-width of the
    t-interval of the mean. ``None`` where undefined (no value; spread and interval need n >= 2), so a
    missing number can never be printed or plotted as a real one."""

    n: int
    mean: float | None
    std: float | None
    half_width: float | None
    confidence: float = CONFIDENCE

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width


def estimate(values: Iterable[Any], confidence: float = CONFIDENCE) -> Estimate:
    """Mean, std and t-interval half-width ``t_{(1+c)/2, n-1} * std / sqrt(n)`` of the finite ``values``."""
    kept = np.asarray(finite(values), dtype=np.float64)
    n = int(kept.size)
    if n == 0:
        return Estimate(0, None, None, None, confidence)
    mean = float(kept.mean())
    if n == 1:
        return Estimate(1, mean, None, None, confidence)
    std = float(kept.std(ddof=1))
    half_width = t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)
    return Estimate(n, mean, std, half_width, confidence)


def paired_differences(treatment: Mapping[K, Any], baseline: Mapping[K, Any]) -> dict[K, float]:
    """``treatment[k] - baseline[k]`` for every key (a seed, say) with a finite value on both sides.

    Pairing removes what a seed shares between the two runs (data order, initialisation), so the
    spread left is the one the comparison is about; a key present on one side only has no partner
    and is left out rather than compared with some other seed.
    """
    differences = {}
    for key, value in treatment.items():
        if key not in baseline:
            continue
        pair = finite([value, baseline[key]])
        if len(pair) == 2:
            differences[key] = pair[0] - pair[1]
    return differences


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got a={a}, b={b}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only below this point; above it, use I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""

    def guarded(value: float) -> float:
        return value if abs(value) >= _CF_TINY else _CF_TINY

    c = 1.0
    d = 1.0 / guarded(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, _CF_MAX_ITER + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        for coefficient in (even, odd):
            d = 1.0 / guarded(1.0 + coefficient * d)
            c = guarded(1.0 + coefficient / c)
            fraction *= d * c
        if abs(d * c - 1.0) < _CF_EPS:
            return fraction
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for x={x}, a={a}, b={b}")


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom and t >= 0, computed directly (not as
    1 - CDF) so that small tails keep their precision."""
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    return 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = t_upper_tail(abs(t), df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 and df > 0 (non-integer df allowed).

    Bisection on the upper tail: the tail is monotone in t, so the search cannot fail or oscillate,
    and 200 halvings of a bracket reach float resolution for any df.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be positive, got {df}")
    if p == 0.5:
        return 0.0  # the median exactly, not the bisection's 1e-60
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if t_upper_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
