"""The run's settings (``cbn_detect.settings``) are read once from the composed config, typed, and a
value of the wrong kind is refused in one line naming its key, before anything runs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cbn_detect.runtime.errors import ConfigError
from cbn_detect.runtime.progress import ProgressSettings
from cbn_detect.settings import RunSettings, loop_settings
from tests.conftest import CONF_DIR


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_demo_config_reads_as_its_yaml_says() -> None:
    settings = RunSettings.from_config(composed())
    assert (settings.batch, settings.epochs, settings.seed, settings.threads) == (8, 12, 0, None)
    assert (settings.amp, settings.resume, settings.metrics, settings.coco) == ("off", "auto", ("voc07", "area"), True)
    assert settings.slow_warning_h == 1.0 and isinstance(settings.slow_warning_h, float)
    loop = loop_settings(composed(), ProgressSettings(), slow_warning_h=None)
    assert (loop.epochs, loop.max_grad_norm, loop.log_every, loop.diagnostics) == (12, 10.0, 10, "basic")


def test_whole_numbers_and_interpolated_strings_are_integers() -> None:
    settings = RunSettings.from_config(composed("data.batch=4.0", "threads='2'", "train.slow_warning_h=null"))
    assert (settings.batch, settings.threads, settings.slow_warning_h) == (4, 2, None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch=2.5", "data.batch=2.5 must be an integer"),
        ("train.epochs=twelve", "train.epochs='twelve' must be an integer"),
        ("seed=true", "seed=True must be an integer"),
        ("eval.image_score=high", "eval.image_score='high' must be a number"),
        ("eval.coco=1", "eval.coco=1 must be true or false"),
        ("eval.metrics=voc07", "eval.metrics='voc07' must be a list, e.g. [voc07]"),
        ("train.resume=always", "train.resume='always' must be one of auto, never"),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_line_naming_its_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config(composed(override))
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("diagnostics.level=all", "diagnostics.level='all' must be one of off, basic, full"),
        ("train.max_grad_norm=none", "train.max_grad_norm='none' must be a number"),
    ],
)
def test_the_loops_settings_are_checked_as_well(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        loop_settings(composed(override), ProgressSettings())
    assert str(err.value) == message
