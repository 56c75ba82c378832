"""A default is written where each kind of caller reads it: the constructors and builders (Python
code), the conf/ YAML (the command line, composed by Hydra) and, for norms, the registry (the keys a
norm takes, the overrides check). These tests read all of them, for every norm and every model, and
hold them to one value."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import OmegaConf

from cbn_detect.norm import NORM_NAMES, resolve_burnin
from cbn_detect.norm.convert import REGIONS
from cbn_detect.norm.registry import BURNIN_FRACTION, NORMS, norm_defaults
from tests.conftest import CONF_DIR

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
FAMILIES = sorted(p.stem for p in (CONF_DIR / "model" / "base").glob("*.yaml"))


def composed(config_name: str, *overrides: str) -> dict[str, Any]:
    """The config as Hydra composes it from conf/, interpolations resolved."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name, overrides=list(overrides)), resolve=True)


def signature_defaults(build: Callable[..., Any]) -> dict[str, Any]:
    """The keyword defaults of a constructor or builder, as ``inspect`` reads them."""
    return {
        key: param.default
        for key, param in inspect.signature(build).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


def plain(value: Any) -> Any:
    """Tuples (Python defaults) as the lists YAML gives."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


@pytest.mark.parametrize("norm", NORM_NAMES)
def test_a_norms_defaults_agree_in_its_constructor_its_yaml_and_the_registry(norm: str) -> None:
    from_yaml = composed("config", f"norm={norm}")["norm"]
    assert from_yaml.pop("name") == norm
    assert from_yaml.pop("where") == list(REGIONS)  # every part of the detector, as convert_norm's where=None
    registry = norm_defaults(norm)
    assert from_yaml == registry
    constructor = signature_defaults(NORMS[norm].build)
    assert set(registry) <= set(constructor), "every option the registry lists has a constructor default"
    # CBN's burn-in is the one default a constructor cannot hold: the registry's and the YAML's is a
    # fraction of the run, the layer's a number of iterations (registry.BURNIN_FRACTION says why).
    if NORMS[norm].burnin:
        assert registry.pop("burnin") == BURNIN_FRACTION
        assert isinstance(constructor.pop("burnin"), int)
        assert resolve_burnin(BURNIN_FRACTION, total_steps=1200) == 800  # the CBN authors' 8 of 12 epochs
    assert registry == {key: constructor[key] for key in registry}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_familys_base_yaml_states_its_builders_defaults(family: str) -> None:
    base = composed(f"model/base/{family}")["model"]
    build = get_object(base.pop("_target_"))
    defaults = signature_defaults(build)
    assert set(base) <= set(defaults), f"model/base/{family} sets what {build.__name__} has no default for"
    assert {key: plain(defaults[key]) for key in base} == base


@pytest.mark.parametrize("model", MODELS)
def test_what_a_model_file_leaves_to_its_family_is_the_builders_default(model: str) -> None:
    """Composed with Hydra as a run composes it: each key the model's own file does not set (read
    with yaml) holds its builder's default."""
    node = composed("config", f"model={model}")["model"]
    own: Mapping[str, Any] = yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text())
    defaults = signature_defaults(get_object(node["_target_"]))
    inherited = {key: value for key, value in node.items() if key not in own and key != "_target_"}
    assert inherited, f"{model} extends no family base"
    assert {key: plain(defaults[key]) for key in inherited} == inherited
