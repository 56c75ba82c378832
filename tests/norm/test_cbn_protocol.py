"""CBN's protocol as its authors released it: window 4 (buffer_num=3 + the current batch) and a
plain-BN burn-in given as a fraction of the run (8 of 12 epochs), resolved to iterations by the
composition root from the run's own length."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from cbn_detect.engine.build import build_model
from cbn_detect.norm import CrossIterationBatchNorm2d, resolve_burnin
from tests.conftest import CONF_DIR, TINY_RUN


@pytest.mark.parametrize(
    "burnin, total, expected",
    [(0, 100, 0), (250, 100, 250), (0.6667, 300, 200), (0.6667, 1200, 800), (0.5, 7, 3), (0.999, 10, 9)],
)
def test_burnin_is_iterations_or_a_truncated_fraction_of_the_run(burnin, total, expected):
    assert resolve_burnin(burnin, total) == expected


@pytest.mark.parametrize("burnin", [-1, 1.0, 1.5, 0.0, -0.2, "8", True])
def test_a_bad_burnin_names_the_setting(burnin):
    with pytest.raises(ValueError, match="norm.burnin"):
        resolve_burnin(burnin, 100)


def test_a_fractional_burnin_needs_the_length_of_the_run():
    with pytest.raises(ValueError, match="norm.burnin=0.5 is a fraction"):
        resolve_burnin(0.5, None)


@pytest.mark.parametrize("norm", ["cbn", "cbn_naive"])
def test_default_cbn_follows_the_released_configs(norm):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY_RUN, f"norm={norm}"])
        override = compose("config", overrides=[*TINY_RUN, f"norm={norm}", "cbn_burnin=40"])
    assert (cfg.norm.window, cfg.norm.burnin) == (4, 0.6667)
    layers = [
        m
        for m in build_model(cfg, 6, torch.device("cpu"), total_steps=120).modules()
        if isinstance(m, CrossIterationBatchNorm2d)
    ]
    assert layers and {(m.window, m.burnin, m.rho) for m in layers} == {(4, 80, 1.0 if norm == "cbn" else 0.0)}
    assert override.norm.burnin == 40  # what the experiment recipes set
