"""`python -m cbn_detect.data.check`: exit status and report on clean, broken and missing data."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbn_detect.data.check import main
from tests.helpers.voc_fixture import write_standard_voc

DATA_KEYS = """
year: "2007"
classes: null
batch: 2
workers: 0
keep_difficult_train: false
on_error: skip
hflip: 0.5
"""


@pytest.fixture()
def config_dir(tmp_path: Path) -> Path:
    """A stand-in for conf/: only the `data` group matters to the check."""
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  - data: voc07\n  - _self_\nseed: 0\n")
    (conf / "data" / "voc07.yaml").write_text(
        "name: voc07\nroot: ???\ntrain_split: trainval\ntest_split: test\n"
        + DATA_KEYS
        + "source:\n  _target_: cbn_detect.data.sources.devkit_source\n  root: ${..root}\n"
    )
    (conf / "data" / "synthetic.yaml").write_text(
        f"name: synthetic\nroot: {tmp_path / 'cache'}\ntrain_split: train\ntest_split: test\n"
        + DATA_KEYS
        + "source:\n  _target_: cbn_detect.data.synthetic.synthetic_source\n  cache_dir: ${..root}\n"
        + "  num_train: 3\n  num_val: 1\n  num_test: 2\n  image_size: 64\n  seed: 0\n"
    )
    return conf


def test_clean_dataset_exits_zero(tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture) -> None:
    voc = write_standard_voc(tmp_path)
    assert main([f"data.root={voc.parent}"], config_dir=config_dir) == 0
    out = capsys.readouterr().out
    assert "VOC2007/trainval: 3 images kept, 0 excluded" in out
    assert "VOC2007/test: 3 images kept, 0 excluded, 1 without objects" in out
    assert out.rstrip().endswith("clean")


def test_broken_dataset_exits_one_listing_every_bad_file(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    voc = write_standard_voc(tmp_path)
    truncated = voc / "JPEGImages" / "000001.jpg"  # in both splits
    truncated.write_bytes(truncated.read_bytes()[:300])
    unknown = voc / "Annotations" / "000003.xml"
    unknown.write_text(unknown.read_text().replace("bottle", "unicorn"))
    assert main([f"data.root={voc.parent}"], config_dir=config_dir) == 1
    out = capsys.readouterr().out
    assert out.count(f"{truncated}: corrupt image") == 2
    assert f"{unknown}: unknown class 'unicorn'" in out
    assert out.rstrip().endswith("problems found")


def test_unusable_split_is_reported_as_a_problem(
    tmp_path: Path, config_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    voc = write_standard_voc(tmp_path)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("")
    assert main([f"data.root={voc.parent}"], config_dir=config_dir) == 1
    assert "test: unusable: " in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.root=/no/such/VOCdevkit"], "/no/such/VOCdevkit/VOC2007"),
        (["data=imagenet"], "configuration error"),
        ([], "configuration error"),  # data.root is ??? in the stand-in config
    ],
)
def test_usage_errors_exit_two_with_one_line(
    config_dir: Path, capsys: pytest.CaptureFixture, overrides: list[str], expected: str
) -> None:
    assert main(overrides, config_dir=config_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_synthetic_data_is_generated_and_checked(config_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data=synthetic"], config_dir=config_dir) == 0
    out = capsys.readouterr().out
    assert "VOC2007/train: 3 images kept" in out and "VOC2007/test: 2 images kept" in out
