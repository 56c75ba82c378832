"""The variance of a run's losses, the number the study compares norms by: checked against hand
computations and numpy on the same numbers."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from cbn_detect.engine.loss_stats import loss_variance

# --- loss variance -------------------------------------------------------------------------------


def test_loss_variance_is_the_population_variance_by_hand() -> None:
    # mean 1.5, squared deviations 0.25 + 2.25 + 0.25 + 2.25 = 5: 5 / 4 (the sample variance is 5 / 3)
    assert loss_variance([1.0, 3.0, 2.0, 0.0]) == 1.25
    assert loss_variance([5.0, 7.0]) == 1.0  # population: ((-1)^2 + 1^2) / 2; the sample one is 2
    assert loss_variance((2.5, 2.5, 2.5)) == 0.0  # a flat loss has variance 0, not NaN


def test_loss_variance_of_float32_losses_is_computed_in_float64() -> None:
    # float32 losses (a loss tensor's .item()s gathered in an array) are not summed in float32:
    # statistics.pvariance is exact (rational arithmetic) on the same float32 values.
    losses = np.float32([10000.1, 10000.2, 10000.35, 9999.9])
    exact = statistics.pvariance([float(v) for v in losses])
    assert loss_variance(losses) == pytest.approx(exact, rel=1e-12)
    assert abs(float(losses.var()) - exact) > 1e-8  # float32 arithmetic would be off by 2e-6 relative


@pytest.mark.parametrize("losses", [[], [0.7], [1.0, math.nan], [1.0, math.inf, 2.0], [-math.inf, 1.0]])
def test_loss_variance_is_nan_for_fewer_than_two_finite_losses(losses: list[float]) -> None:
    assert math.isnan(loss_variance(losses))
