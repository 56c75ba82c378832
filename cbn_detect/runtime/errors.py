"""Problems the user can act on, as opposed to bugs.

A :class:`ReportedError` ends a job in one final line that names the file or the setting and says
what to do, without a traceback, with exit code 2 (``cbn_detect.jobs``); everything else keeps its
traceback and exits 1. Raise one only where the message alone lets the user fix the problem:
a ``ValueError`` from inside torch is a bug (or a case nobody foresaw) and must keep its traceback,
which is why the configuration checks raise :class:`ConfigError` instead of a bare ``ValueError``.

``cbn_detect.voc.DatasetError`` (bad dataset content, naming the file) is the fourth kind; it lives
in ``voc``, which like this package imports nothing of ``cbn_detect``.
"""

from __future__ import annotations

import errno

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
"""A write that failed for lack of space: the device is full, or the user's quota is."""


class ReportedError(Exception):
    """A problem the message alone lets the user fix: reported in one line, exit code 2."""

    exit_code = 2


class ConfigError(ReportedError, ValueError):
    """A setting out of range or inconsistent with another; the message names the setting
    (``data.batch=0 must be at least 1``). Also a ``ValueError``, which library callers expect."""


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint that cannot be resumed from (truncated, foreign, of another model); the message
    names the file and how to start over. Also a ``RuntimeError``, as ``load_checkpoint`` raised."""


class DiskFullError(ReportedError, OSError):
    """A write that failed for lack of space (or quota); the message names the file. The file's
    previous version is intact, so freeing space and rerunning resumes."""


def disk_full_cause(err: BaseException) -> OSError | None:
    """The ``OSError`` with errno ENOSPC/EDQUOT behind ``err`` (itself, or anywhere in its chain of
    causes and contexts), or None. torch.save, for one, reports a full disk as a RuntimeError
    ("unexpected pos ...") raised while handling the OSError."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        todo += [current.__cause__, current.__context__]
    return None
