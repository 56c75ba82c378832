"""Errors and the problem summary of reading a VOC folder.

A training run on 10k images should not die at hour three on one corrupt JPEG, nor silently learn
from broken labels; so loading either raises at once (naming the file) or skips and *counts*,
and the counts travel into results.json, where a reader of the numbers can see them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Problems that exclude an image under on_error="skip" and raise under on_error="raise".
MISSING_ANNOTATION = "missing_annotation"
MALFORMED_ANNOTATION = "malformed_annotation"
UNKNOWN_CLASS = "unknown_class"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
SIZE_MISMATCH = "size_mismatch"
BAD_SPLIT_LINE = "bad_split_line"
EXCLUDING_KINDS = (
    MISSING_ANNOTATION,
    MALFORMED_ANNOTATION,
    UNKNOWN_CLASS,
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    SIZE_MISMATCH,
    BAD_SPLIT_LINE,
)

# Problems repaired in both modes: the image stays, the box is clipped or dropped.
BOX_CLIPPED = "box_clipped"
BOX_DROPPED = "box_dropped"
REPAIRED_KINDS = (BOX_CLIPPED, BOX_DROPPED)

MAX_EXAMPLES = 5


class DatasetError(ValueError):
    """Bad dataset content; the message names the file (and the line, where there is one).

    `kind` (one of the constants above, or None) lets on_error="skip" count the problem without
    parsing the message; it is not pickled, so a DataLoader worker re-raises the message only.
    """

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class DatasetNotFoundError(DatasetError):
    """The dataset folder itself is missing; the message says where it was looked for."""


@dataclasses.dataclass
class DatasetProblems:
    """Counts of problems met while loading one split, with where each one was.

    Counts are per occurrence: per excluded image (or split-file line) for the excluding kinds,
    per box for the repaired ones. The log and to_dict() (results.json) show the first few places
    of each kind; the check command lists them all.
    """

    split: str
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    places: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    num_images: int = 0
    num_negatives: int = 0

    def add(self, kind: str, where: str) -> None:
        """Count one problem of `kind` found at `where` (a file, line or object)."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.places.setdefault(kind, []).append(where)

    @property
    def num_excluded(self) -> int:
        """Images (or split-file lines) left out; only non-zero under on_error="skip"."""
        return sum(self.counts.get(kind, 0) for kind in EXCLUDING_KINDS)

    def __bool__(self) -> bool:
        """True when anything was counted; images without objects are not a problem."""
        return any(self.counts.values())

    def summary(self, max_places: int | None = MAX_EXAMPLES) -> str:
        """A header line, then per problem kind its count and places (all when max_places=None)."""
        lines = [
            f"{self.split}: {self.num_images} images kept, {self.num_excluded} excluded, "
            f"{self.num_negatives} without objects"
        ]
        for kind in sorted(self.counts):
            lines.append(f"  {kind}: {self.counts[kind]}")
            lines += [f"    {where}" for where in self.places[kind][:max_places]]
            hidden = len(self.places[kind]) - len(self.places[kind][:max_places])
            if hidden:
                lines.append(f"    ... and {hidden} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy with the first MAX_EXAMPLES places of each kind."""
        return {
            "split": self.split,
            "num_images": self.num_images,
            "num_excluded": self.num_excluded,
            "num_negatives": self.num_negatives,
            "counts": dict(self.counts),
            "examples": {kind: places[:MAX_EXAMPLES] for kind, places in self.places.items()},
        }
