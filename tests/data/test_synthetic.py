"""The synthetic VOC generator: deterministic, atomic, and readable by VOCDataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cbn_detect.data import synthetic
from cbn_detect.data.synthetic import SYNTHETIC_CLASSES, ensure_synthetic_voc
from cbn_detect.data.voc import VOCDataset

TINY = {"num_train": 4, "num_val": 2, "num_test": 3, "image_size": 64}
# Large enough for difficult objects (~4% of objects) to appear with seed 0.
SMALL = {"num_train": 40, "num_val": 8, "num_test": 16, "image_size": 128}


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_voc(tmp_path_factory.mktemp("cache"), **SMALL)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    first = ensure_synthetic_voc(tmp_path / "a", seed=3, **TINY)
    second = ensure_synthetic_voc(tmp_path / "b", seed=3, **TINY)
    other = ensure_synthetic_voc(tmp_path / "c", seed=4, **TINY)
    hashes = _file_hashes(first)
    assert len(hashes) == 2 * 9 + 4  # an image and an annotation per id, four split files
    assert hashes == _file_hashes(second)
    other_hashes = _file_hashes(other)
    assert other_hashes.keys() == hashes.keys() and other_hashes != hashes
    assert first.relative_to(tmp_path / "a") != other.relative_to(tmp_path / "c")


def test_layout_is_voc2007(small_voc: Path) -> None:
    assert small_voc.parts[-2:] == ("VOCdevkit", "VOC2007")
    assert small_voc.parent.parent.name.startswith("synthetic-")
    main = small_voc / "ImageSets" / "Main"
    names = ("train", "val", "trainval", "test")
    splits = {s: (main / f"{s}.txt").read_text().split() for s in names}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 8, 16]
    assert splits["trainval"] == splits["train"] + splits["val"]
    assert not set(splits["trainval"]) & set(splits["test"])
    xml = (small_voc / "Annotations" / f"{splits['test'][0]}.xml").read_text()
    for tag in ("<size>", "<width>128</width>", "<pose>", "<truncated>", "<difficult>", "<bndbox>"):
        assert tag in xml


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_voc_dataset_reads_every_split(small_voc: Path, split: str) -> None:
    dataset = VOCDataset(small_voc, split, classes=SYNTHETIC_CLASSES)
    assert len(dataset) > 0 and not dataset.problems
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 128, 128)
    assert len(target["labels"]) >= 1


def test_objects_are_inside_varied_and_sometimes_difficult(small_voc: Path) -> None:
    truth = VOCDataset(small_voc, "trainval", classes=SYNTHETIC_CLASSES).ground_truth()
    boxes = np.concatenate(truth.boxes)
    labels = np.concatenate(truth.labels)
    difficult = np.concatenate(truth.difficult)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert set(labels.tolist()) == set(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert all(1 <= len(t) <= synthetic.MAX_OBJECTS for t in truth.labels)
    assert 0 < difficult.mean() < 0.15
    sides = (boxes[:, 2:] - boxes[:, :2]).max(axis=1) / 128
    assert sides.min() < 0.2 and sides.max() > 0.45


def test_boxes_are_tight_around_the_drawn_mask() -> None:
    rng = np.random.default_rng(0)
    for name in SYNTHETIC_CLASSES:
        mask = synthetic._shape_mask(rng, name, 64)
        x0, y0, x1, y1 = synthetic._tight_box(mask)
        assert mask[y0:y1, x0:x1].sum() == mask.sum()
        assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
        assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()


def test_existing_dataset_is_reused_without_generating(small_voc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("regenerated an existing dataset")

    monkeypatch.setattr(synthetic, "_write_dataset", fail)
    cache = small_voc.parents[2]
    assert ensure_synthetic_voc(cache, **SMALL) == small_voc


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = synthetic._write_dataset

    def interrupted(voc_dir: Path, *args: object) -> None:
        write(voc_dir, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_voc(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = synthetic._write_dataset

    def racing(voc_dir: Path, *args: object) -> None:
        write(voc_dir, *args)
        # Another process finishes first: its folder is in place before this one renames.
        staging = voc_dir.parents[1]
        winner = staging.parent / f"synthetic-{staging.name.split('-')[1]}"
        (winner / "VOCdevkit" / "VOC2007").mkdir(parents=True)
        (winner / "winner.txt").write_text("first")

    monkeypatch.setattr(synthetic, "_write_dataset", racing)
    result = ensure_synthetic_voc(tmp_path, **TINY)
    winner = result.parents[1]
    assert (winner / "winner.txt").read_text() == "first"
    assert list(tmp_path.iterdir()) == [winner]


@pytest.mark.parametrize(
    "kwargs",
    [{"classes": ("circle", "hexagon")}, {"classes": ()}, {"num_val": 0}, {"image_size": 16}],
)
def test_invalid_parameters_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ensure_synthetic_voc(tmp_path, **kwargs)
