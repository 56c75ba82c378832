"""Read an offline W&B run back from its ``.wandb`` file, without a server or an account.

W&B offers no public API for offline runs, yet the tests must check that what a run logged reached
W&B intact. The ``.wandb`` file is a LevelDB-style log (unchanged since 2020): a 7-byte file header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32
of type + payload as u32, payload length u16, chunk type u8). A record too long for the rest of a
block is split into first / middle / last chunks; fewer than 7 bytes left in a block are padding.
Every record is a ``wandb_internal_pb2.Record`` protobuf.

A run that was resumed (a requeue, a rerun into the same directory) has one ``.wandb`` file per
process that logged to it: offline, W&B 0.31 starts a new ``offline-run-<time>-<id>`` folder on every
``wandb.init``, even with the same id and ``resume="allow"`` (``-<id>-1``, ``-2``... within one
second). ``read_run`` and ``wait_for_run`` put those parts back together in order.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class CorruptRunFile(ValueError):
    """The file is not a W&B transaction log, or a chunk's checksum or framing is wrong."""


@dataclass
class OfflineRun:
    """What an offline run recorded: enough to compare with ``metrics.jsonl`` and ``results.json``."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    """None until the run's final record is written: the run is still going, or was killed."""
    files: list[Path] = field(default_factory=list)
    """The ``.wandb`` files read, oldest first: one per process that logged to the run."""
    part_exit_codes: list[int | None] = field(default_factory=list)
    """Each file's exit code (a part that ended by a signal has ``128 + signum``)."""


def _chunks(data: bytes, path: Path) -> Iterator[tuple[int, bytes]]:
    offset = len(FILE_HEADER)
    while offset + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:
            offset += left_in_block
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        start = offset + CHUNK_HEADER.size
        payload = data[start : start + length]
        if kind == 0 and length == 0:
            return  # zero fill after the last record (a file still being written)
        if len(payload) < length or zlib.crc32(bytes([kind]) + payload) != crc:
            raise CorruptRunFile(f"{path}: bad chunk at byte {offset}")
        yield kind, payload
        offset = start + length


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in the order the run wrote them."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(FILE_HEADER):
        raise CorruptRunFile(f"{path} does not start with the W&B log header {FILE_HEADER!r}")
    pending: list[bytes] = []
    for kind, payload in _chunks(data, path):
        if kind == FULL:
            pending = [payload]
        elif kind == FIRST:
            pending = [payload]
            continue
        elif kind == MIDDLE:
            pending.append(payload)
            continue
        elif kind == LAST:
            pending.append(payload)
        else:
            raise CorruptRunFile(f"{path}: unknown chunk type {kind}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(pending))
        pending = []
        yield record


def _path(item: Any) -> list[str]:
    """History and summary items carry either a flat ``key`` or a ``nested_key`` path (a histogram
    is ``["weights/conv", "values"]``: the ``/`` belongs to our metric's name, not to the nesting)."""
    return [item.key] if item.key else list(item.nested_key)


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        _set(out, _path(item), json.loads(item.value_json))
    return out


def read_offline_run(path: Path) -> OfflineRun:
    """Replay a ``.wandb`` file: the run's identity, final config, history rows and final summary."""
    run = OfflineRun(files=[Path(path)])
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.group = record.run.run_id, record.run.display_name, record.run.run_group
            run.project, run.tags = record.run.project, list(record.run.tags)
            for item in record.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
            for item in record.summary.remove:
                run.summary.pop(_path(item)[0], None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.part_exit_codes = [run.exit_code]
    return run


@dataclass
class LoggedImage:
    """An image a run logged: its media file (a PNG under the run's ``files/media/images/``), caption,
    size, and its box layers as W&B stored them (``{layer: {"box_data": [...], "class_labels": {...}}}``,
    read from the ``files/media/metadata/boxes2D/`` files the history entry points to)."""

    path: Path
    caption: str | None
    width: int | None
    height: int | None
    boxes: dict[str, dict[str, Any]] = field(default_factory=dict)


def media_file(run: OfflineRun, relative: str) -> Path:
    """A media file of the run (``media/images/...`` as the history names it), in whichever part's
    ``files/`` folder holds it."""
    for part in reversed(run.files):
        candidate = part.parent / "files" / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"media file {relative} not found beside {', '.join(map(str, run.files))}")


def logged_images(run: OfflineRun, value: dict[str, Any]) -> list[LoggedImage]:
    """The images of one history value: one ``wandb.Image`` (``_type: image-file``) or a list of them
    (``images/separated``: W&B writes one PNG per distinct image, a ``filenames`` list naming each
    entry's, and ``all_boxes`` with each entry's box layers)."""
    kind = value.get("_type")
    if kind == "image-file":
        entries = [(value["path"], value.get("caption"), value.get("boxes", {}))]
        width, height = value.get("width"), value.get("height")
    elif kind == "images/separated":
        count = int(value["count"])
        captions = value.get("captions") or [None] * count
        all_boxes = value.get("all_boxes") or [{}] * count
        entries = list(zip(value["filenames"], captions, all_boxes))
        width, height = value.get("width"), value.get("height")
    else:
        raise ValueError(f"not a logged image: _type {kind!r}")
    images = []
    for relative, caption, layers in entries:
        boxes = {
            layer: json.loads(media_file(run, ref["path"]).read_text(encoding="utf-8"))
            for layer, ref in (layers or {}).items()
        }
        images.append(LoggedImage(media_file(run, relative), caption, width, height, boxes))
    return images


def run_id_of(path: Path) -> str:
    """``.../offline-run-20261129_182621-abc123/run-abc123.wandb`` -> ``abc123``."""
    return Path(path).stem.removeprefix("run-")


def _age_key(path: Path) -> tuple[str, int]:
    """Folders sort by the time in their name, then by W&B's ``-N`` suffix for the same second."""
    match = re.fullmatch(r"offline-run-(\d{8}_\d{6})-(.*)", path.parent.name)
    if match is None:
        return path.parent.name, 0
    rest = match.group(2).removeprefix(run_id_of(path))
    return match.group(1), int(rest[1:]) if rest[1:].isdigit() else 0


def find_run_files(root: Path) -> list[Path]:
    """The ``.wandb`` files of the offline runs under ``root`` (a run directory), oldest first."""
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"), key=_age_key)


def combine(parts: list[OfflineRun]) -> OfflineRun:
    """The parts of one resumed run (oldest first) as one: identity, config and exit code as the last
    part has them, history rows in order (as logged: a step logged by two parts stays twice, for the
    reader to see), summaries updated in order."""
    emptied = {"config": {}, "history": [], "summary": {}, "files": [], "part_exit_codes": []}
    run = OfflineRun(**{**vars(parts[-1]), **emptied})
    for part in parts:
        run.config.update(part.config)
        run.history += part.history
        run.summary.update(part.summary)
        run.files += part.files
        run.part_exit_codes += part.part_exit_codes
    return run


def read_run(root: Path, run_id: str | None = None) -> OfflineRun:
    """The offline run ``run_id`` under ``root`` (the only one there when None), all its parts combined."""
    files = find_run_files(root)
    ids = sorted({run_id_of(f) for f in files})
    if run_id is None:
        if len(ids) != 1:
            raise ValueError(f"{root} holds offline runs of {len(ids)} ids ({', '.join(ids)}): name one")
        run_id = ids[0]
    parts = [read_offline_run(f) for f in files if run_id_of(f) == run_id]
    if not parts:
        raise FileNotFoundError(f"no offline W&B run {run_id} under {root}")
    return combine(parts)


def wait_for_run(root: Path, timeout_s: float = 30.0, run_id: str | None = None) -> OfflineRun:
    """The offline run under ``root`` (``run_id``, or the only one), once its last part is complete.

    ``run.finish()`` can return before W&B's service process has written the file (seen with several
    runs in one process), so a reader right after it polls for the final ``exit`` record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if find_run_files(root):
            try:
                run = read_run(root, run_id)
                if run.exit_code is not None:
                    return run
            except (CorruptRunFile, FileNotFoundError):
                pass  # the last chunk is still being written, or the run has not started yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished offline W&B run under {root} after {timeout_s} s")
        time.sleep(0.2)
