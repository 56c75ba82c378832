"""Read an offline W&B run back from its ``.wandb`` file, without a server or an account.

W&B offers no public API for offline runs, yet the tests must check that what a run logged reached
W&B intact. The ``.wandb`` file is a LevelDB-style log (unchanged since 2020): a 7-byte file header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32
of type + payload as u32, payload length u16, chunk type u8). A record too long for the rest of a
block is split into first / middle / last chunks; fewer than 7 bytes left in a block are padding.
Every record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
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
    run = OfflineRun()
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
    return run


def find_run_files(root: Path) -> list[Path]:
    """The ``.wandb`` files of the offline runs under ``root`` (a run directory), oldest first."""
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def wait_for_run(root: Path, timeout_s: float = 30.0) -> OfflineRun:
    """The one offline run under ``root``, once it is complete.

    ``run.finish()`` can return before W&B's service process has written the file (seen with several
    runs in one process), so a reader right after it polls for the final ``exit`` record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        files = find_run_files(root)
        if len(files) > 1:
            raise ValueError(f"{root} holds {len(files)} offline runs: {[str(f) for f in files]}")
        if files:
            try:
                run = read_offline_run(files[0])
                if run.exit_code is not None:
                    return run
            except CorruptRunFile:
                pass  # the last chunk is still being written
        if time.monotonic() > deadline:
            raise TimeoutError(f"no finished offline W&B run under {root} after {timeout_s} s")
        time.sleep(0.2)
