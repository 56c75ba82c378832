"""Writes small VOC-layout folders for tests: the quirks of real VOC files, a few pixels each.

`write_voc` writes any set of images; `write_standard_voc` writes the fixture most tests share,
whose content is described by the STANDARD_* constants below so that tests can state expectations
without re-reading the files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]


@dataclasses.dataclass
class FixtureObject:
    """One <object>; difficult=None leaves the <difficult> tag out, as some VOC2012 files do."""

    name: str
    bbox: Box  # VOC 1-based inclusive, written as given (floats allowed)
    difficult: bool | None = False
    parts: Sequence[tuple[str, Box]] = ()  # person <part>s: (name, bbox)


@dataclasses.dataclass
class FixtureImage:
    image_id: str
    width: int = 64
    height: int = 48
    objects: Sequence[FixtureObject] = ()


def _coordinate(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bndbox(bbox: Box, indent: str) -> str:
    tags = ("xmin", "ymin", "xmax", "ymax")
    inner = "".join(f"{indent}\t<{t}>{_coordinate(v)}</{t}>\n" for t, v in zip(tags, bbox))
    return f"{indent}<bndbox>\n{inner}{indent}</bndbox>\n"


def annotation_xml(image: FixtureImage) -> str:
    """The VOC XML of one image, laid out like the devkit's files."""
    text = (
        "<annotation>\n"
        "\t<folder>VOC2007</folder>\n"
        f"\t<filename>{image.image_id}.jpg</filename>\n"
        f"\t<size>\n\t\t<width>{image.width}</width>\n\t\t<height>{image.height}</height>\n"
        "\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n"
    )
    for obj in image.objects:
        text += f"\t<object>\n\t\t<name>{obj.name}</name>\n\t\t<pose>Unspecified</pose>\n"
        text += "\t\t<truncated>0</truncated>\n"
        if obj.difficult is not None:
            text += f"\t\t<difficult>{int(obj.difficult)}</difficult>\n"
        # Parts come before the object's own box, so that a reader that searches nested boxes
        # (".//bndbox", iter) would find a part's box first and fail the tests.
        for part_name, part_box in obj.parts:
            text += f"\t\t<part>\n\t\t\t<name>{part_name}</name>\n{_bndbox(part_box, chr(9) * 3)}"
            text += "\t\t</part>\n"
        text += _bndbox(obj.bbox, "\t\t")
        text += "\t</object>\n"
    return text + "</annotation>\n"


def write_jpeg(path: Path, width: int, height: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_voc(root: Path, images: Sequence[FixtureImage], splits: Mapping[str, Sequence[str]]) -> Path:
    """Write `root/VOCdevkit/VOC2007` with these images and split files; returns that folder."""
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for seed, image in enumerate(images):
        (voc / "Annotations" / f"{image.image_id}.xml").write_text(annotation_xml(image))
        write_jpeg(voc / "JPEGImages" / f"{image.image_id}.jpg", image.width, image.height, seed)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return voc


PERSON = FixtureObject(
    "person",
    (10, 5, 40, 45),
    parts=[("head", (20, 6, 30, 16)), ("hand", (11, 25, 15, 30)), ("foot", (25, 40, 35, 45))],
)
STANDARD_IMAGES = (
    FixtureImage("000001", objects=[PERSON, FixtureObject("dog", (41, 20, 64, 48))]),
    FixtureImage(
        "000002",
        objects=[
            FixtureObject("car", (1, 1, 30, 20), difficult=None),
            FixtureObject("chair", (30, 20, 50, 40), difficult=True),
        ],
    ),
    FixtureImage("000003", objects=[FixtureObject("bottle", (5, 5, 15, 25), difficult=True)]),
    FixtureImage("2012_000004", width=80, height=60, objects=[FixtureObject("cat", (10.5, 20, 50.5, 55.25))]),
    FixtureImage("000005"),
)
STANDARD_SPLITS = {
    "trainval": ("000001", "000002", "000003"),
    "test": ("2012_000004", "000005", "000001"),
}


def write_standard_voc(root: Path) -> Path:
    """The shared fixture: part boxes, a missing <difficult>, an image of only difficult objects,
    VOC2012 float coordinates and an image without objects. Returns the VOC2007 folder."""
    return write_voc(root, STANDARD_IMAGES, STANDARD_SPLITS)
