"""One writer per job directory: ``job.lock``, held while a process trains or evaluates the job.

Two sweeps started into one ``hydra.sweep.dir`` (or a sweep started again while the first still
runs) would otherwise both train every job: each step twice in ``metrics.jsonl``, two processes
overwriting one checkpoint. The first process to create ``job.lock`` (``O_CREAT | O_EXCL``: atomic,
also on NFS v3+) holds the job; any other finds it held and skips the job.

The file says who holds it (pid, host, SLURM job, start time) and its modification time says when
the holder last showed progress: the holder touches it as training goes (a hook of the training
loop calls :meth:`JobLock.refresh_if_due` after every step). A lock whose holder is gone is taken
over rather than blocking the job forever. It is stale when:

- its process is gone: same host and the pid is no longer running (or now belongs to another process,
  told apart by its start time in ``/proc``), or it is this very process's (left by an earlier run of
  it that ended by an exception);
- it belongs to this same SLURM job on another host: the job was requeued and takes over its own lock
  (SLURM runs one instance of a job at a time; on the same host the dead pid says so already);
- on another host, it was not refreshed for longer than ``stale_after_s`` (``train.lock_stale_h``):
  we cannot see that host's processes, so a node that died is noticed by the silence.

Taking over a stale lock happens under ``flock`` on the job directory, so two processes finding the
same stale lock at once do not both win (where the file system has no ``flock`` for directories,
e.g. NFS, that short race remains). In a distributed job rank 0 alone decides and broadcasts the
decision, so no rank waits in a collective for one that skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cbn_detect.runtime.distributed import DistInfo, broadcast_object

log = logging.getLogger(__name__)

LOCK_FILE = "job.lock"
REFRESH_EVERY_S = 30.0
"""The least time between two refreshes from the training loop (a touch is one metadata write)."""
UNREADABLE_GRACE_S = 60.0
"""A lock file without its content (its writer died between creating and writing it) is stale after this."""


class JobLocked(RuntimeError):
    """Another process holds the job directory (or completed the job while this one was about to
    start it): this process leaves the job alone and writes nothing into it."""


def slurm_job() -> str | None:
    """This process's SLURM job as squeue shows it (``<array>_<task>`` for an array task), or None.
    It stays the same when SLURM requeues the job."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 (state) on; None where it cannot be read (no such pid, not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22): with the pid,
    it names one process, even after the pid is reused."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def pid_running(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host (a zombie does not), and is the process that started at
    ``start`` when that is known."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc to ask: trust kill(0)
    if fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says, and when it was last refreshed (its mtime)."""

    pid: int
    host: str
    slurm_job: str | None
    started: float
    """When the holder took the lock (seconds since the epoch)."""
    pid_start: int | None
    token: str
    """Unique per acquisition: tells this process's lock from a successor's."""
    refreshed: float = 0.0

    @classmethod
    def this_process(cls) -> Holder:
        now = time.time()
        pid = os.getpid()
        return cls(pid, socket.gethostname(), slurm_job(), now, process_start(pid), uuid.uuid4().hex, now)

    def content(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k != "refreshed"}
        return (json.dumps(fields) + "\n").encode()

    def describe(self, now: float | None = None) -> str:
        """``pid 123 on node7 (SLURM job 45_1) since 2026-11-29 18:30:01, refreshed 12 s ago``."""
        now = time.time() if now is None else now
        if not self.token:
            return f"an unknown process (the lock file has no content yet), refreshed {_ago(now - self.refreshed)}"
        since = datetime.datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S") if self.started else "?"
        slurm = f" (SLURM job {self.slurm_job})" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host}{slurm} since {since}, refreshed {_ago(now - self.refreshed)}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


UNKNOWN = Holder(pid=0, host="?", slurm_job=None, started=0.0, pid_start=None, token="")
"""The holder of a lock file that has no readable content yet."""


def read_holder(run_dir: Path) -> Holder | None:
    """Who holds ``run_dir``'s lock, or None when it is not locked. A file without readable content
    (being created, or its writer died at that instant) reads as ``UNKNOWN`` with its mtime."""
    path = Path(run_dir) / LOCK_FILE
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Holder(
            pid=int(raw["pid"]),
            host=str(raw["host"]),
            slurm_job=raw.get("slurm_job"),
            started=float(raw["started"]),
            pid_start=raw.get("pid_start"),
            token=str(raw["token"]),
            refreshed=mtime,
        )
    except FileNotFoundError:
        return None  # released between the two calls
    except (OSError, ValueError, KeyError, TypeError):
        return replace(UNKNOWN, refreshed=mtime)


def stale_reason(holder: Holder, stale_after_s: float, now: float | None = None) -> str | None:
    """Why ``holder``'s lock may be taken over, or None while it is alive (the rules in the module doc)."""
    now = time.time() if now is None else now
    age = now - holder.refreshed
    if not holder.token:
        return f"it has no content and is {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid():
            return "it is this process's own, left by an earlier run in it"
        if not pid_running(holder.pid, holder.pid_start):
            return f"its process (pid {holder.pid}) is gone"
        return None
    if holder.slurm_job and holder.slurm_job == slurm_job():
        return f"it belongs to this SLURM job ({holder.slurm_job}), requeued"
    if age > stale_after_s:
        return f"it was not refreshed for {age / 3600:.2f} h (more than {stale_after_s / 3600:g} h)"
    return None


@contextlib.contextmanager
def _directory_guard(run_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the directory for the check-and-take-over; a no-op where the file
    system cannot lock directories."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("no flock on %s (%s); taking over stale locks unguarded", run_dir, err)
        yield
    finally:
        os.close(fd)  # also drops the flock


_held: set[JobLock] = set()


class JobLock:
    """The lock this process holds on a job directory, from :func:`claim_job` until :meth:`release`."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._last_refresh = time.monotonic()
        _held.add(self)

    def refresh(self) -> None:
        """Touch the lock. If another process took it over meanwhile (it judged this one stale),
        raise :class:`JobLocked`: two writers must never go on."""
        current = read_holder(self.path.parent)
        if current is None:  # removed by hand: still ours to hold
            _create(self.path, self.holder)
        elif current.token != self.holder.token:
            _held.discard(self)
            raise JobLocked(
                f"{self.path.parent} was taken over by {current.describe()} while this process trained it "
                "(its lock looked stale: raise train.lock_stale_h); stopping here without writing results"
            )
        os.utime(self.path)
        self._last_refresh = time.monotonic()

    def release(self) -> None:
        """Remove the lock if it is still ours; later calls do nothing."""
        if self not in _held:
            return
        _held.discard(self)
        current = read_holder(self.path.parent)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)

    def refresh_if_due(self) -> None:
        """:meth:`refresh`, at most every ``REFRESH_EVERY_S``: the training loop calls this after every step."""
        if time.monotonic() - self._last_refresh >= REFRESH_EVERY_S:
            self.refresh()


def _create(path: Path, holder: Holder) -> bool:
    """Create the lock file with ``holder`` in it; False if it exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(holder.content())
        handle.flush()
        os.fsync(handle.fileno())
    return True


def try_acquire(run_dir: Path, stale_after_s: float) -> tuple[JobLock | None, Holder | None]:
    """``(lock, None)`` when this process now holds ``run_dir``, ``(None, holder)`` when another does."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    holder = Holder.this_process()
    if _create(path, holder):
        return JobLock(path, holder), None
    with _directory_guard(run_dir):
        current = read_holder(run_dir)
        if current is not None:
            why = stale_reason(current, stale_after_s)
            if why is None:
                return None, current
            log.warning("taking over the lock of %s from %s: %s", run_dir, current.describe(), why)
            path.unlink(missing_ok=True)
        if _create(path, holder):
            return JobLock(path, holder), None
    return None, read_holder(run_dir) or UNKNOWN


def claim_job(
    run_dir: Path, info: DistInfo, stale_after_h: float, finished: Callable[[], bool] = lambda: False
) -> JobLock | None:
    """Hold ``run_dir`` for this job: rank 0 takes the lock and broadcasts whether it may go on;
    the other ranks get None. Raises :class:`JobLocked` (on every rank) when another process holds
    the directory, or when ``finished()`` says the job was completed while this one started."""
    lock, refusal = None, None
    if info.is_main:
        lock, holder = try_acquire(run_dir, stale_after_h * 3600)
        if lock is None:
            assert holder is not None
            refusal = (
                f"skipping {run_dir}: it is being trained by {holder.describe()} (delete {run_dir / LOCK_FILE} "
                f"if that process is gone; a lock not refreshed for train.lock_stale_h={stale_after_h:g} h "
                "is taken over by itself)"
            )
        elif finished():
            lock.release()
            lock, refusal = None, f"skipping {run_dir}: another process completed it just now"
    refusal = broadcast_object(refusal, info)
    if refusal is not None:
        raise JobLocked(refusal)
    return lock


def release_held() -> None:
    """Release every lock this process still holds (the end of a job, whatever ended it)."""
    for lock in list(_held):
        if lock.holder.pid != os.getpid():
            continue  # a forked child (a data loader worker) must not release its parent's lock
        try:
            lock.release()
        except OSError as err:
            if err.errno != errno.ENOENT:
                log.warning("could not remove %s: %s", lock.path, err)


atexit.register(release_held)
