"""Every process of a DDP run takes the same decision at every step: a non-finite loss on one rank
is skipped by all (no hang in the gradient all-reduce), and the skipped step leaves every norm's
running statistics and CBN's history as they were; a signal on one rank checkpoints all of them at
the same step; per-rank checkpoints of different steps are refused; the logged loss is the global
batch's. One 2-process gloo spawn serves the unit-level checks, and ``processes=2`` runs of the
entrypoint the signal-and-resume one."""

from __future__ import annotations

import copy
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cbn_detect.engine.checkpoint import TrainState, save_checkpoint
from cbn_detect.engine.hooks import MetricsWriter
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.signals import SignalWatch, TrainingInterrupted
from cbn_detect.engine.trainer import Hooks, Loop, LoopSettings, run_epoch
from cbn_detect.norm import convert_norm
from cbn_detect.norm.rollback import NormRollback
from cbn_detect.runtime import DistInfo
from cbn_detect.runtime.errors import CheckpointError
from tests.conftest import REPO, TINY_RUN

STEPS = 6
POISONED_STEP = 3  # 0-based; by then CBN (burn-in 1, window 3) has a full history to overwrite
POISONED_RANK = 1
SIGNAL_STEP = 2
CPU = torch.device("cpu")


class Toy(nn.Module):
    """A 'detector' of every stateful norm: BN, CBN (with its producer conv), SyncBN and BRN. Its loss
    dict has two terms; a target's ``scale`` of NaN makes one of them non-finite. It records the
    loss each forward gave, computed as the trainer sums it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))  # noqa: E731
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.cbn = convert_norm(block(), "cbn", window=3, burnin=1)
        self.sync = convert_norm(block(), "syncbn")
        self.brn = convert_norm(block(), "brn", ramp_start=0, ramp_end=2)
        self.local_losses: list[dict[str, float]] = []

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        y = self.brn(self.sync(self.cbn(self.stem(torch.stack(images)))))
        scale = torch.stack([t["scale"] for t in targets]).mean()
        terms = {"fit": (y - 0.5).square().mean(), "shift": y.mean().square() * scale}
        self.local_losses.append({"loss": sum(terms.values()).item(), **{k: v.item() for k, v in terms.items()}})
        return terms


def norm_state(net: nn.Module) -> dict[str, Any]:
    """Every norm's running statistics and CBN's history and counters (and the weights), copied."""
    return copy.deepcopy({k: v for k, v in net.state_dict().items()})


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:  # CBN's extra state: counters and history
            assert (x["num_steps"], x["count"], x["next"]) == (y["num_steps"], y["count"], y["next"]), key
            for field in x["history"]:
                assert torch.equal(x["history"][field], y["history"][field]), f"{key} history {field}"


class Batches:
    """The loader: fixed batches per rank; before yielding each (that is, after the previous step
    is done) it snapshots the model's state, and optionally sends this process a signal."""

    def __init__(self, net: nn.Module, rank: int, poison: tuple[int, int] | None, signal_at: int | None) -> None:
        self.net, self.rank, self.poison, self.signal_at = net, rank, poison, signal_at
        self.states: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return STEPS

    def __iter__(self):
        for step in range(STEPS):
            self.states.append(norm_state(self.net))
            if step == self.signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            g = torch.Generator().manual_seed(1000 * step + self.rank)
            images = [torch.randn(3, 6, 6, generator=g) * 2 + 1 for _ in range(2)]
            scale = float("nan") if self.poison == (step, self.rank) else 1.0
            yield images, [{"scale": torch.tensor(scale)} for _ in images]
        self.states.append(norm_state(self.net))


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records.append((step, dict(metrics)))

    def close(self) -> None:
        pass


def train_toy(world: int, rank: int, poison: tuple[int, int] | None, signal_at: int | None = None) -> dict[str, Any]:
    """One epoch of ``run_epoch`` on the toy model, as the trainer's ``fit`` runs it, with the
    metrics hook recording every step."""
    net = Toy()
    model = DistributedDataParallel(net) if world > 1 else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches, sink, state = Batches(net, rank, poison, signal_at), Recorder(), TrainState()
    checkpoints: list[int] = []
    settings = LoopSettings(
        epochs=1, max_grad_norm=None, log_every=1, progress=False, max_nonfinite=5, diagnostics="off"
    )
    loop = Loop(
        model,
        batches,
        optimizer,
        scheduler,
        CPU,
        settings,
        [sink],
        lambda: checkpoints.append(state.step),
        Precision("off", CPU),
    )
    interrupted = None
    with SignalWatch() as watch:
        try:
            run_epoch(loop, state, watch, NormRollback(net), Hooks([MetricsWriter([sink], 1, CPU, optimizer)]))
        except TrainingInterrupted as err:
            interrupted = err.signum
    return {
        "states": batches.states,
        "records": sink.records,
        "local": net.local_losses,
        "state": state,
        "checkpoints": checkpoints,
        "interrupted": interrupted,
    }


def resume_check(rank: int, run_dir: Path, steps: tuple[int | None, int | None]) -> str | int:
    """train.resume on per-rank checkpoints at ``steps`` (None: no file): the step, or the error."""
    from cbn_detect.train import checkpoint_path, resume

    info = DistInfo(2, rank, rank)
    net = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    precision = Precision("off", CPU)
    if steps[rank] is not None:
        save_checkpoint(
            checkpoint_path(run_dir, info), net, optimizer, scheduler, TrainState(step=steps[rank]), precision
        )
    dist.barrier()
    try:
        return resume(SimpleNamespace(resume="auto"), run_dir, info, net, optimizer, scheduler, precision).step
    except CheckpointError as err:
        return str(err)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )  # a hang fails instead of waiting forever
    torch.set_num_threads(1)
    try:
        out = Path(out_dir)
        result = {
            "poisoned": train_toy(world, rank, poison=(POISONED_STEP, POISONED_RANK)),
            "signal": train_toy(world, rank, poison=None, signal_at=SIGNAL_STEP if rank == 1 else None),
            "resume_equal": resume_check(rank, out / "equal", (4, 4)),
            "resume_different": resume_check(rank, out / "different", (4, 6)),
            "resume_missing": resume_check(rank, out / "missing", (4, None)),
        }
        torch.save(result, out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("agreement")
    context = mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes hung")
    return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(2)]


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_both_and_undone(ranks) -> None:
    for rank, got in enumerate(r["poisoned"] for r in ranks):
        states, state = got["states"], got["state"]
        assert len(states) == STEPS + 1 and state.step == STEPS
        assert (state.nonfinite_total, state.nonfinite_consecutive) == (1, 0)
        # the skipped step changed nothing: weights, running statistics, num_batches_tracked, CBN's
        # history (the slot its forward overwrote) and counters
        assert_same_state(states[POISONED_STEP], states[POISONED_STEP + 1])
        cbn_before = states[POISONED_STEP]["cbn.1._extra_state"]
        assert cbn_before["count"] == 2 and cbn_before["history"]["mean"].abs().sum() > 0  # a full history
        # ...while every other step moved them (training went on after the skip)
        for step in (POISONED_STEP - 1, POISONED_STEP + 1):
            before, after = states[step], states[step + 1]
            for key in (
                "stem.1.running_var",
                "cbn.1.running_mean",
                "sync.1.running_var",
                "brn.1.num_batches_tracked",
                "stem.0.weight",
            ):
                assert not torch.equal(before[key], after[key]), (rank, step, key)
            assert after["cbn.1._extra_state"]["num_steps"] == before["cbn.1._extra_state"]["num_steps"] + 1
    poisoned = [r["poisoned"]["local"][POISONED_STEP] for r in ranks]
    assert torch.isfinite(torch.tensor(poisoned[0]["loss"]))  # rank 0 alone would have stepped
    assert not torch.isfinite(torch.tensor(poisoned[POISONED_RANK]["loss"]))
    # both ranks ended with the same weights
    final = [r["poisoned"]["states"][-1] for r in ranks]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0] if k.endswith("weight"))


def test_the_logged_loss_is_the_mean_over_the_ranks_and_identical_on_both(ranks) -> None:
    got = [r["poisoned"] for r in ranks]
    same = [[(step, {k: v for k, v in r.items() if k != "images_per_s"}) for step, r in g["records"]] for g in got]
    assert json.dumps(same[0]) == json.dumps(same[1])  # NaN included; the timing is each rank's own
    logged = {step: record for step, record in got[0]["records"] if "loss" in record}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step in range(STEPS):
        local = [g["local"][step] for g in got]
        record = logged[step + 1]
        for key, name in (("loss", "loss"), ("fit", "loss/fit"), ("shift", "loss/shift")):
            want = (local[0][key] + local[1][key]) / 2
            if step == POISONED_STEP and key != "fit":
                assert record[name] != record[name]  # NaN: the global batch's loss is not finite
            else:
                assert record[name] == want, (step, name)
    # the loss variance's inputs: the global losses of the finite steps, the same on both ranks
    want = [(got[0]["local"][s]["loss"] + got[1]["local"][s]["loss"]) / 2 for s in range(STEPS) if s != POISONED_STEP]
    assert got[0]["state"].epoch_losses == got[1]["state"].epoch_losses == want
    assert got[0]["state"].recent_losses == got[1]["state"].recent_losses == want
    nonfinite = [[r["nonfinite_total"] for _, r in g["records"] if "nonfinite_total" in r] for g in got]
    assert nonfinite[0] == [1]  # rank 0 logs it although its own loss was finite


def test_a_signal_on_one_rank_checkpoints_both_at_the_same_step(ranks) -> None:
    got = [r["signal"] for r in ranks]
    assert [g["interrupted"] for g in got] == [signal.SIGUSR1, signal.SIGUSR1]
    # the signal arrived before step SIGNAL_STEP's agreement; both checkpoint at the end of that step
    assert [g["checkpoints"] for g in got] == [[SIGNAL_STEP + 1], [SIGNAL_STEP + 1]]
    assert [g["state"].step for g in got] == [SIGNAL_STEP + 1, SIGNAL_STEP + 1]


def test_per_rank_checkpoints_of_different_steps_are_refused_in_one_line(ranks) -> None:
    assert [r["resume_equal"] for r in ranks] == [4, 4]
    for case, second in (("resume_different", "last.rank1.pt at step 6"), ("resume_missing", "last.rank1.pt missing")):
        messages = [r[case] for r in ranks]
        assert messages[0] == messages[1], case  # every rank raises the same error
        message = messages[0]
        assert isinstance(message, str) and "\n" not in message
        assert "last.pt at step 4" in message and second in message and "train.resume=never" in message


def test_a_skipped_step_in_one_process_leaves_bn_and_cbn_state_unchanged() -> None:
    got = train_toy(1, 0, poison=(POISONED_STEP, 0))
    states = got["states"]
    assert got["state"].nonfinite_total == 1 and got["state"].step == STEPS
    assert_same_state(states[POISONED_STEP], states[POISONED_STEP + 1])
    assert states[POISONED_STEP]["cbn.1._extra_state"]["count"] == 2
    for step in (POISONED_STEP - 1, POISONED_STEP + 1):
        assert not torch.equal(states[step]["stem.1.running_var"], states[step + 1]["stem.1.running_var"])
        assert not torch.equal(
            states[step]["cbn.1._extra_state"]["history"]["dsq"],
            states[step + 1]["cbn.1._extra_state"]["history"]["dsq"],
        )
    logged = [r["loss"] for s, r in got["records"] if "loss" in r]
    assert logged[:POISONED_STEP] == [x["loss"] for x in got["local"][:POISONED_STEP]]  # one process: its own loss


def test_rollback_restores_a_cbn_slot_after_its_history_moved_dtype() -> None:
    """The saved slot goes back into the history as the forward left it (moved to float64 here)."""
    net = convert_norm(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)), "cbn", window=3, burnin=0
    )
    x = torch.randn(2, 2, 5, 5)
    net(x)
    net.double()
    net(x.double())  # the history follows the input to float64
    before = norm_state(net)
    rollback = NormRollback(net)
    rollback.save()
    net(x.double() * 3)
    rollback.restore()
    assert_same_state(before, norm_state(net))


# ---- the entrypoint: processes=2, a SIGTERM to one rank, and the rerun ---------------------------

# 128 px images and 2 images per process: 4 steps per epoch, 16 in all, slow enough for the signal
# to land inside training. No data workers: the resumed run is then bit-exact.
SIGNAL_RUN = [
    *TINY_RUN,
    "data.source.image_size=128",
    "model.min_size=128",
    "model.max_size=128",
    "train.epochs=4",
    "data.batch=2",
    "data.workers=0",
    "processes=2",
    "eval.coco=false",
    "diagnostics.level=off",
    "eval.fps_images=1",
]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _workers(pid: int) -> list[int]:
    """The launcher's worker processes (spawned children), in the order they started: rank 0 first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append((int(fields[19]), int(entry.name)))
    return [p for _, p in sorted(found)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_rank_checkpoints_both_at_one_step_and_the_rerun_resumes_exactly(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    proc = _start([f"hydra.run.dir={straight}", *SIGNAL_RUN], tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]

    proc = _start([f"hydra.run.dir={interrupted}", *SIGNAL_RUN], tmp_path)
    checkpoints = interrupted / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "last.rank1.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # rank 1 alone
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, output[-3000:]
    assert "[rank 1]" in next(line for line in output.splitlines() if "received SIGTERM" in line)
    assert json.loads((interrupted / "results.json").read_text())["status"] == "interrupted", output[-3000:]
    steps = [
        torch.load(checkpoints / name, weights_only=False)["state"]["step"] for name in ("last.pt", "last.rank1.pt")
    ]
    assert steps[0] == steps[1] and 4 <= steps[0] < 16, (steps, output[-3000:])

    proc = _start([f"hydra.run.dir={interrupted}", *SIGNAL_RUN], tmp_path)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((interrupted / "results.json").read_text())
    for key in ("status", "steps", "epochs", "loss_variance", "final_loss", "map_voc07", "ap_per_class"):
        assert a[key] == b[key], key
    for name in ("last.pt", "last.rank1.pt"):
        weights_a, weights_b = _weights(straight / "checkpoints" / name), _weights(checkpoints / name)
        assert weights_a.keys() == weights_b.keys()
        assert all(
            torch.equal(weights_a[k], weights_b[k]) for k in weights_a if isinstance(weights_a[k], torch.Tensor)
        ), name
