"""One job as several processes on this machine, started by torch's elastic launcher.

``processes=N`` gives a job N DDP processes (gloo on CPU, one GPU each on CUDA) without a
``torchrun`` line: the launcher torchrun itself runs (``torch.distributed.launcher.api``) starts
the workers, sets up their rendezvous on a free local port, forwards SIGTERM/SIGINT to them and
tears the whole group down when one fails, so a crashed rank never leaves the others waiting in a
collective. Jobs whose processes were already started by ``torchrun`` or by SLURM/submitit tasks
are one process of their world and never launch more.
"""

from __future__ import annotations

import logging
import logging.config
import os
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

log = logging.getLogger(__name__)

T = TypeVar("T")


class ProcessesFailed(RuntimeError):
    """At least one process of the job exited with an error; ``exit_codes`` maps rank -> code."""

    def __init__(self, exit_codes: dict[int, int]) -> None:
        self.exit_codes = exit_codes
        described = ", ".join(f"rank {rank} with exit code {code}" for rank, code in sorted(exit_codes.items()))
        super().__init__(f"a process of the job failed ({described}); its log lines above say why")


class ProcessesInterrupted(RuntimeError):
    """The launching process received a signal; it was forwarded to every process of the job."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"the job's processes were stopped by signal {signum}")


def started_by_a_launcher() -> bool:
    """Whether this process is already one of several (torchrun, or a multi-task SLURM/submitit job)."""
    if "WORLD_SIZE" in os.environ:
        return True
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or "1"
    return int(tasks) > 1


def configure_process_logging(config: dict[str, Any] | None, rank: int) -> None:
    """Logging in a spawned worker, which starts with none: rank 0 gets the launching process's
    configuration (Hydra's console and ``train.log`` handlers), the other ranks only warnings and
    errors on the console, prefixed with their rank, so a job's log is not written N times."""
    if rank == 0 and config:
        logging.config.dictConfig(config)
        return
    logging.basicConfig(
        level=logging.WARNING, format=f"[rank {rank}][%(name)s][%(levelname)s] - %(message)s", force=True
    )


def run_processes(count: int, entrypoint: Callable[..., T], *args: Any) -> dict[int, T]:
    """Run ``entrypoint(*args)`` in ``count`` fresh processes forming one world; rank -> return value.

    The workers are spawned (not forked: a forked copy of a process that already ran torch
    kernels can deadlock in OpenMP), so ``entrypoint`` and ``args`` must be picklable.
    """
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=count,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    # The agent's own error report is a traceback of its process-pool internals; the workers log
    # the real cause, and ProcessesFailed sums it up in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as err:
        raise ProcessesFailed({rank: failure.exitcode for rank, failure in err.failures.items()}) from None
    except SignalException as err:
        raise ProcessesInterrupted(int(err.sigval)) from None
