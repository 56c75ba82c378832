"""Process plumbing under everything else (like DETR's ``util/misc.py``): one atomic writer,
process groups and gathers, the multi-process launcher, device, seeding and RNG state.

A leaf package: it imports nothing from ``cbn_detect`` outside itself, so the trainer, the
evaluation and the report all build on it without importing one another."""

from cbn_detect.runtime.device import resolve_device, set_cudnn_benchmark, synchronize
from cbn_detect.runtime.distributed import (
    DistInfo,
    broadcast_buffers,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown,
)
from cbn_detect.runtime.io import save_torch, write_bytes, write_json, write_text
from cbn_detect.runtime.launch import (
    ProcessesFailed,
    ProcessesInterrupted,
    configure_process_logging,
    run_processes,
    started_by_a_launcher,
)
from cbn_detect.runtime.seeding import rng_state, seed_everything, set_rng_state

__all__ = [
    "DistInfo",
    "ProcessesFailed",
    "ProcessesInterrupted",
    "broadcast_buffers",
    "broadcast_object",
    "configure_process_logging",
    "gather_objects",
    "init_distributed",
    "resolve_device",
    "rng_state",
    "run_processes",
    "save_torch",
    "seed_everything",
    "set_cudnn_benchmark",
    "set_rng_state",
    "shutdown",
    "started_by_a_launcher",
    "synchronize",
    "write_bytes",
    "write_json",
    "write_text",
]
