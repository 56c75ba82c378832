"""Scan a configured dataset for every bad file without training: `python -m cbn_detect.data.check`.

Takes the same overrides as training (`data=voc07 data.root=/datasets/VOCdevkit`), decodes every
image of the train and test splits, and lists every problem found. Training only checks image
headers (see cbn_detect.data.voc); running this once per dataset covers the rest.
Exit status: 0 clean, 1 problems found, 2 usage or configuration error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from cbn_detect.data.build import class_names, dataset_source
from cbn_detect.data.voc import VOCDataset
from cbn_detect.voc import DatasetError, DatasetNotFoundError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

HELP = """\
usage: python -m cbn_detect.data.check [key=value | group=option ...]

Scan a configured dataset for bad files without training: decodes every image and reads every
annotation of the train and test splits, and lists each problem (file and reason).

Takes the same overrides as python -m cbn_detect.train, e.g.
  python -m cbn_detect.data.check data=voc07 data.root=/data/VOCdevkit
  python -m cbn_detect.data.check data=voc0712 data.root=/data/VOCdevkit data.test_split=val

Exit status: 0 clean, 1 problems found, 2 usage or configuration error."""


def main(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> int:
    """Check the train and test splits of the composed `data` config; returns the exit status."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(HELP)
        return 0
    try:
        data_cfg = _compose_data(overrides, Path(config_dir or CONFIG_DIR))
        source = dataset_source(data_cfg)
        root = source.root
        classes = class_names(data_cfg, source)
        splits = list(dict.fromkeys([str(data_cfg.train_split), str(data_cfg.test_split)]))
        year = None if data_cfg.year is None else str(data_cfg.year)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as err:
        _fail(f"configuration error: {err}")
        return 2

    print(f"checking {data_cfg.name} at {root}, splits {', '.join(splits)} (decoding every image)")
    found = False
    for split in splits:
        try:
            dataset = VOCDataset(root, split, classes=classes, on_error="skip", year=year, verify_images="full")
        except DatasetNotFoundError as err:
            _fail(str(err))
            return 2
        except DatasetError as err:
            print(f"{split}: unusable: {err}")
            found = True
            continue
        print(dataset.problems.summary(max_places=None))
        found = found or bool(dataset.problems)
    print("problems found" if found else "clean")
    return 1 if found else 0


def _compose_data(overrides: list[str], config_dir: Path) -> DictConfig:
    if not config_dir.is_dir():
        raise ValueError(f"config folder {config_dir} not found")
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg.data


def _fail(message: str) -> None:
    """One line on stderr: a usage error needs no traceback."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
