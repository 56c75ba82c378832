"""Where a dataset's VOC-layout folder comes from, chosen by the data config's ``source._target_``:
an existing devkit (real VOC) or one generated into a cache (the synthetic set). Either way the
rest of the pipeline reads the folder with the same code, and takes the class list from here unless
``data.classes`` names one."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from cbn_detect.voc import VOC_CLASSES


class DatasetSource(NamedTuple):
    """A folder VOCDataset reads (a ``VOCdevkit`` or one of its ``VOC<year>`` folders) and the
    dataset's own classes, in label order."""

    root: Path
    classes: tuple[str, ...]


def devkit_source(root: str | Path) -> DatasetSource:
    """Real PASCAL VOC: the ``VOCdevkit`` folder at ``root`` (checked when a split is read, where a
    missing folder gets a message saying where it looked), with VOC's 20 classes."""
    return DatasetSource(Path(str(root)).expanduser(), tuple(VOC_CLASSES))
