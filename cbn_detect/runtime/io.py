"""Atomic file writes: a run interrupted at any instant leaves either the old file or the new one.

One writer, ``_atomic_write``: the content goes to a temporary file in the target's folder, is
flushed to disk, given the permissions of a file created the ordinary way (``0o666`` less the
umask: ``0644`` under the usual ``022``, so colleagues on a shared cluster can read results) and
renamed over the target; the temporary file is removed on any failure. A write that fails for
lack of space becomes a :class:`DiskFullError` naming the file. The entry points below only say how
their content becomes bytes.

JSON files are strict JSON: :func:`jsonable` turns non-finite floats into null, the one rule for
every JSON this package writes (``results.json``, ``metrics.jsonl``)."""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from cbn_detect.runtime.errors import DiskFullError, disk_full_cause


def jsonable(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples too) replaced by None:
    JSON has no NaN, and a reader must not choke on a diverged run. Readers take None as missing."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only
    set it, which would race with another thread creating a file)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _out_of_space(err: BaseException, folder: Path) -> int | None:
    """The errno (ENOSPC or EDQUOT) when ``err`` failed a write for lack of space, else None: an
    OSError saying so in the exception's chain, or a folder with no free block left (for writers
    that report a short write without the OSError). Called before the temporary file is removed."""
    cause = disk_full_cause(err)
    if cause is not None:
        return cause.errno
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    free = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail  # root may use the reserved blocks
    return errno.ENOSPC if free == 0 else None


def _disk_full_message(path: Path, code: int) -> str:
    what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
    return f"{what} while writing {path}; free space and rerun to resume (its previous version, if any, is intact)"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp creates it 0600
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        code = _out_of_space(err, path.parent) if isinstance(err, Exception) else None
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if code is not None and not isinstance(err, DiskFullError):
            raise DiskFullError(_disk_full_message(path, code)) from err
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite floats as null, see :func:`jsonable`)."""
    write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))
