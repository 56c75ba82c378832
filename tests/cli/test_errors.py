"""Errors that help: a problem the user can act on ends a job in one final line naming the file or
setting and the fix (exit 2, no traceback), anything else keeps its traceback (exit 1); a corrupt
checkpoint, a full disk, an unreadable results.json and a signal during the final evaluation each
end with a status in results.json; every sink is closed however a run ends; files are written with
the user's umask and as strict JSON."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException

from cbn_detect import jobs, train
from cbn_detect.data.build import class_names
from cbn_detect.engine.build import build_model
from cbn_detect.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
from cbn_detect.engine.optim import WarmupSchedule, build_optimizer, build_scheduler
from cbn_detect.engine.precision import Precision
from cbn_detect.engine.signals import TrainingInterrupted
from cbn_detect.engine.trainer import TrainingDiverged
from cbn_detect.evaluation.voc_ap import evaluate_voc
from cbn_detect.jobs import USER_ERRORS, launches_processes, record_ending, run_job, user_error
from cbn_detect.models import build_detector
from cbn_detect.norm import build_norm, resolve_burnin
from cbn_detect.report import collect_runs
from cbn_detect.report import main as report_main
from cbn_detect.results import Results, UnreadableResults, completed_results, read_results, write_results
from cbn_detect.runtime import io
from cbn_detect.runtime.device import resolve_device
from cbn_detect.runtime.errors import CheckpointError, ConfigError, DiskFullError, ReportedError
from cbn_detect.tracking import JsonlSink
from cbn_detect.tracking.wandb_reader import wait_for_run
from cbn_detect.tracking.wandb_sink import build_wandb_sink
from cbn_detect.voc import DatasetError
from tests.conftest import CONF_DIR, REPO, TINY_RUN

QUIET = ["wandb.mode=disabled"]
"""W&B's start-up costs seconds and proves nothing here (test_wandb_offline covers it)."""


def tiny_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY_RUN, *overrides])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _train(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cbn_detect.train", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=lambda: os.umask(0o022),
    )


def _last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


# --- the hierarchy ------------------------------------------------------------------------------


def test_the_hierarchy_keeps_library_callers_working() -> None:
    assert USER_ERRORS == (ReportedError, DatasetError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, ReportedError)
    assert issubclass(DiskFullError, OSError) and issubclass(CheckpointError, ReportedError)
    assert issubclass(CheckpointError, RuntimeError)  # as load_checkpoint raised before
    assert ReportedError.exit_code == 2
    assert not issubclass(ValueError, USER_ERRORS)  # a ValueError from inside torch is a bug


@pytest.mark.parametrize(
    "call, setting",
    [
        (lambda: Precision("fp8", torch.device("cpu")), "train.amp"),
        (lambda: build_norm("cbn", 8, window=0), "norm.window"),
        (lambda: build_norm("cbn", 8, fused="sometimes"), "norm.fused"),
        (lambda: build_norm("brn", 8, r_max=0.5), "norm.r_max"),
        (lambda: build_norm("bn", 8, windw=3), "valid options"),
        (lambda: resolve_burnin(-1, 10), "norm.burnin"),
        (lambda: WarmupSchedule(10, 0, 1.0, "linear", [], 0.1), "optim.schedule.name"),
        (lambda: evaluate_voc(None, None, [], metric="voc12"), "unknown VOC metric"),
        (lambda: build_wandb_sink({"mode": "sometimes"}, {}, "x", None, Path(".")), "wandb.mode"),
        (lambda: launches_processes(SimpleNamespace(processes=0)), "processes=0"),
        (lambda: resolve_device("gpu"), "device='gpu'"),
    ],
)
def test_configuration_mistakes_are_config_errors_naming_the_setting(call, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        call()


def test_a_model_setting_wrapped_by_hydra_instantiate_is_still_a_user_error() -> None:
    with pytest.raises(InstantiationException) as caught:
        build_detector(tiny_cfg("model.extra_levels=p9").model, num_classes=3)
    assert user_error(caught.value) == "model.extra_levels='p9' must be 'p6p7' or 'none'"


def test_only_user_errors_and_full_disks_are_reported_in_one_line() -> None:
    assert user_error(ValueError("from inside torch")) is None
    assert user_error(RuntimeError("a bug")) is None
    assert user_error(DatasetError("a.xml: bad box")) == "a.xml: bad box"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")  # noqa: B904 - torch.save raises it over the OSError
    except RuntimeError as err:
        assert user_error(err) == "No space left on device; free space and rerun to resume"


# --- run_job: one status, one exit code, one line ---------------------------------------------


def _raising(exc: BaseException):
    def run(cfg, run_dir, wandb_group):
        raise exc

    return run


def _ending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, run
) -> tuple[jobs.Outcome, dict, list[logging.LogRecord]]:
    caplog.set_level(logging.INFO)
    outcome = run_job(run, tiny_cfg(), tmp_path, None)
    return outcome, json.loads((tmp_path / "results.json").read_text()), caplog.records


def test_a_config_error_is_one_final_line_without_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outcome, results, records = _ending(tmp_path, caplog, _raising(ConfigError("data.batch=0 must be at least 1")))
    assert (outcome.status, outcome.exit_code) == ("failed", 2)
    assert results["status"] == "failed" and results["error"] == "data.batch=0 must be at least 1"
    shown = [r for r in records if r.levelno >= logging.INFO]
    assert shown[-1].getMessage() == "data.batch=0 must be at least 1" and shown[-1].exc_info is None


def test_a_value_error_from_inside_torch_keeps_its_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def run(cfg, run_dir, wandb_group):
        torch.optim.SGD([], lr=0.1)  # torch's own ValueError: "optimizer got an empty parameter list"

    outcome, results, records = _ending(tmp_path, caplog, run)
    assert (outcome.status, outcome.exit_code) == ("failed", 1)
    assert results["error"].startswith("ValueError: optimizer got an empty parameter list")
    assert records[-1].exc_info is not None and records[-1].exc_info[0] is ValueError


def test_ctrl_c_records_interrupted_and_exits_as_sigint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outcome, results, _ = _ending(tmp_path, caplog, _raising(KeyboardInterrupt()))
    assert (outcome.status, outcome.exit_code) == ("interrupted", 128 + signal.SIGINT)
    assert results["status"] == "interrupted" and "rerun the same command" in results["error"]


def test_a_failure_records_the_world_size_its_launcher_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before init_distributed exports RANK / WORLD_SIZE, a submitit task knows them by its own names."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "2")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "1")
    record_ending(tiny_cfg(), tmp_path, "data.batch=0 must be at least 1")
    assert not (tmp_path / "results.json").exists()  # rank 1 leaves the file to rank 0
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    record_ending(tiny_cfg(), tmp_path, "data.batch=0 must be at least 1")
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["world_size"], results["total_batch"]) == (2, 8)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's names win
    record_ending(tiny_cfg(), tmp_path, "x")
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 3


# --- every sink closed on every exit path -------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.closed, self.summaries = False, []

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, results: dict) -> None:
        self.summaries.append(results)

    def close(self) -> None:
        self.closed = True


DIVERGED = Results(status="diverged", model="m", norm="n", batch=1, world_size=1, total_batch=1, seed=0, data="d")


@pytest.mark.parametrize(
    "ending",
    [RuntimeError("a bug"), TrainingInterrupted(signal.SIGTERM, 3), KeyboardInterrupt(), "diverged", "completed"],
)
def test_run_closes_every_sink_however_it_ends(ending, monkeypatch: pytest.MonkeyPatch) -> None:
    sinks = [RecordingSink(), RecordingSink()]
    monkeypatch.setattr(
        train, "setup", lambda cfg, run_dir, group, several_jobs=False: SimpleNamespace(sinks=sinks, lock=None)
    )
    monkeypatch.setattr(train, "finish_diverged", lambda job, err: DIVERGED)
    monkeypatch.setattr(train, "finish", lambda job: DIVERGED)

    def fit(job):
        if ending == "diverged":
            raise TrainingDiverged("loss is nan")
        if isinstance(ending, BaseException):
            raise ending

    monkeypatch.setattr(train, "train", fit)
    if isinstance(ending, BaseException):
        with pytest.raises(type(ending)):
            train.run(None, Path("."))
    else:
        assert train.run(None, Path(".")) is DIVERGED
    assert all(sink.closed for sink in sinks)
    assert all(len(sink.summaries) == (0 if isinstance(ending, BaseException) else 1) for sink in sinks)


def test_a_sink_that_fails_to_close_neither_stops_the_others_nor_hides_the_ending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(RecordingSink):
        def close(self) -> None:
            raise OSError("W&B service gone")

    sinks = [Broken(), RecordingSink()]
    train.close_sinks(sinks, None)
    assert sinks[1].closed and "W&B service gone" in caplog.text


def test_a_real_run_that_crashes_in_its_final_evaluation_closes_jsonl_and_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list = []
    real_build_sinks = train.build_sinks

    def build_sinks(*args, **kwargs):
        built.extend(real_build_sinks(*args, **kwargs))
        return built

    def broken_fps(*args, **kwargs):
        raise RuntimeError("FPS measurement crashed")

    monkeypatch.setattr(train, "build_sinks", build_sinks)
    monkeypatch.setattr(train, "measure_fps", broken_fps)
    with pytest.raises(RuntimeError, match="FPS measurement crashed"):
        train.run(tiny_cfg("train.epochs=1", "eval.coco=false", "wandb.mode=offline"), tmp_path)
    jsonl = next(s for s in built if isinstance(s, JsonlSink))
    assert jsonl._handle.closed
    wandb_sinks = [s for s in built if type(s).__name__ == "WandbSink"]
    assert wandb_sinks and all(s._closed for s in wandb_sinks)
    assert wait_for_run(tmp_path / "wandb").exit_code is not None  # the offline run was finished


# --- corrupt checkpoint -------------------------------------------------------------------------


def test_a_truncated_checkpoint_is_one_final_line_naming_it_and_the_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(10_000)}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])  # cut short, as by a kill before atomic writes
    proc = _train([f"hydra.run.dir={run_dir}", *TINY_RUN, *QUIET], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert output.count("cannot resume from checkpoint") == 1
    last = _last_line(output)
    assert str(checkpoint) in last and "move it away" in last and "train.resume=never" in last
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and str(checkpoint) in results["error"]


def test_load_checkpoint_raises_a_checkpoint_error_with_the_gist_of_torchs_message(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    path.write_bytes(b"not a checkpoint")
    model = torch.nn.Linear(3, 2)
    cfg = tiny_cfg()
    optimizer = build_optimizer(model, cfg.optim, 4)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, model, optimizer, scheduler, Precision("off", torch.device("cpu")))
    message = str(caught.value)
    assert str(path) in message and "train.resume=never" in message and "\n" not in message


# --- full disk ----------------------------------------------------------------------------------


def test_a_write_that_runs_out_of_space_is_a_disk_full_error_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anywhere (no tmpfs needed): the ENOSPC behind torch.save's RuntimeError is recognised."""
    path = tmp_path / "last.pt"
    io.write_bytes(path, b"previous")

    def torch_save_on_a_full_disk(handle) -> None:
        handle.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    with pytest.raises(DiskFullError) as caught:
        io._atomic_write(path, torch_save_on_a_full_disk)
    assert str(caught.value).startswith(f"no space left on device while writing {path}; free space and rerun")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the temporary file is gone

    def over_quota(handle) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(DiskFullError, match="disk quota exceeded while writing"):
        io._atomic_write(path, over_quota)

    def a_bug(handle) -> None:
        raise RuntimeError("not about space")

    with pytest.raises(RuntimeError, match="not about space"):
        io._atomic_write(path, a_bug)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """Mount a tmpfs of a given size (root only: this CI runs as root); skip, saying why, elsewhere."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs to fill needs root; the full-disk test did not run")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        size = -(-size // 4096) * 4096
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the full-disk test did not run")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_io_on_a_full_tmpfs_names_the_file_and_keeps_the_previous_one(small_tmpfs) -> None:
    disk = small_tmpfs(256 * 1024)
    path = disk / "last.pt"
    io.save_torch(path, {"w": torch.zeros(1000)})
    before = path.read_bytes()
    with pytest.raises(DiskFullError, match=f"no space left on device while writing {path}"):
        io.save_torch(path, {"w": torch.zeros(200_000)})  # 800 kB: torch's "unexpected pos" over ENOSPC
    with pytest.raises(DiskFullError, match=f"while writing {disk / 'big.bin'}"):
        io.write_bytes(disk / "big.bin", b"x" * 1_000_000)
    assert path.read_bytes() == before and sorted(p.name for p in disk.iterdir()) == ["last.pt"]


def _checkpoint_bytes(cfg, where: Path) -> int:
    """The size of this config's checkpoint, momentum buffers included, without training."""
    model = build_model(cfg, len(class_names(cfg.data)), torch.device("cpu"), total_steps=8)
    optimizer = build_optimizer(model, cfg.optim, 4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    scheduler = build_scheduler(optimizer, cfg.optim, 8)
    save_checkpoint(where, model, optimizer, scheduler, TrainState(), Precision("off", torch.device("cpu")))
    return where.stat().st_size


def test_a_run_on_a_full_disk_ends_in_one_line_and_keeps_what_it_wrote(tmp_path: Path, small_tmpfs) -> None:
    """Room for one checkpoint and a half: epoch 1's fits, epoch 2's temporary file fills the disk."""
    overrides = [*TINY_RUN, *QUIET, "eval.coco=false", "diagnostics.level=off"]
    size = _checkpoint_bytes(tiny_cfg(*overrides), tmp_path / "probe.pt")
    run_dir = small_tmpfs(int(1.5 * size)) / "run"
    proc = _train([f"hydra.run.dir={run_dir}", *overrides], tmp_path)
    output = proc.stdout + proc.stderr
    checkpoint = run_dir / "checkpoints" / "last.pt"
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "unexpected pos" not in output
    assert _last_line(output).endswith(
        f"no space left on device while writing {checkpoint}; free space and rerun to resume "
        "(its previous version, if any, is intact)"
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and f"while writing {checkpoint}" in results["error"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[:4] == [1, 2, 3, 4]  # the first epoch's history survives
    assert torch.load(checkpoint, weights_only=False)["state"]["epoch"] == 1  # and its checkpoint
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.pt"]  # no temporary file left


# --- unreadable results.json --------------------------------------------------------------------


def test_an_unreadable_results_json_names_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "results.json").write_text('{"status": "compl')
    with pytest.raises(UnreadableResults, match=str(tmp_path / "results.json")):
        read_results(tmp_path)
    assert completed_results(tmp_path) is None
    assert "counting the job as not completed" in caplog.text and str(tmp_path / "results.json") in caplog.text
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(UnreadableResults, match="JSON list"):
        read_results(tmp_path)


def test_a_sweep_reruns_a_job_whose_results_json_is_cut_short_and_goes_on(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cut, done = (sweep / "retinanet_tiny" / norm / "batch_4" / "seed_0" for norm in ("bn", "none"))
    cut.mkdir(parents=True)
    (cut / "results.json").write_text('{"status": "completed", "map_vo')  # a copy cut short
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"status": "completed", "map_voc07": 0.25}))
    proc = _train(
        ["-m", "norm=bn,none", f"hydra.sweep.dir={sweep}", *TINY_RUN, *QUIET, "train.epochs=1", "eval.coco=false"],
        tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"{cut / 'results.json'} cannot be read" in output and "counting the job as not completed" in output
    assert json.loads((cut / "results.json").read_text())["status"] == "completed"
    assert json.loads((done / "results.json").read_text()) == {"status": "completed", "map_voc07": 0.25}
    for name in ("results.json", "checkpoints/last.pt", "metrics.jsonl"):  # readable by colleagues
        assert (cut / name).stat().st_mode & 0o777 == 0o644, name
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (cut / "detections").iterdir())


def test_the_report_lists_an_unreadable_job_naming_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    for norm, content in (
        (
            "bn",
            json.dumps(
                {
                    "status": "completed",
                    "model": "retinanet_tiny",
                    "norm": "bn",
                    "batch": 2,
                    "world_size": 1,
                    "seed": 0,
                    "map_voc07": 0.3,
                    "loss_variance": None,
                }
            ),
        ),
        ("gn", '{"status": "comp'),
    ):
        job = sweep / "retinanet_tiny" / norm / "batch_2" / "seed_0"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(
            f"model:\n  name: retinanet_tiny\nnorm:\n  name: {norm}\ndata:\n  batch: 2\nseed: 0\n"
        )
        (job / "results.json").write_text(content)
    rows = {row.norm: row for row in collect_runs(sweep)}
    assert rows["gn"].status == "unreadable"
    assert str(sweep / "retinanet_tiny" / "gn" / "batch_2" / "seed_0" / "results.json") in rows["gn"].error
    assert rows["bn"].loss_variance is None  # null reads as missing
    assert report_main([str(sweep)]) == 0
    report = (sweep / "report.md").read_text()
    assert "`retinanet_tiny/gn/batch_2/seed_0`: unreadable (" in report
    assert "| retinanet_tiny | bn | 2 | 1 | 2 | 1 | 1 completed | 0.3 | - | - | - | - | - |" in report


# --- a signal during the final evaluation or FPS -------------------------------------------------


class Lines:
    """A subprocess's merged output, read line by line in a thread so a test can wait for one."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if line is None:
                return False
            self.seen.append(line)
            if marker in line:
                return True
        return False

    def rest(self) -> str:
        self._thread.join(timeout=300)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.mark.parametrize("phase, marker", [("evaluation", "final evaluation on"), ("fps", "eval/map_voc07=")])
def test_sigterm_during_the_final_evaluation_or_fps_records_interrupted(
    tmp_path: Path, phase: str, marker: str
) -> None:
    run_dir = tmp_path / "run"
    overrides = [*TINY_RUN, *QUIET, "train.epochs=1", "eval.coco=false", "eval.fps_images=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbn_detect.train", f"hydra.run.dir={run_dir}", *overrides],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = Lines(proc)
    try:
        assert lines.wait_for(marker, timeout=300), lines.rest()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = lines.rest()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "received SIGTERM during the final evaluation" in output
    assert "rerun the same command to resume" in _last_line(output)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and "SIGTERM" in results["error"]
    if phase == "evaluation":  # the rerun evaluates the trained weights without training again
        rerun = _train([f"hydra.run.dir={run_dir}", *overrides[:-1], "eval.fps_images=2"], tmp_path)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "completed" and results["steps"] == 4
        records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# --- files: the user's umask, strict JSON --------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_are_created_with_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        io.write_json(tmp_path / "results.json", {"a": 1})
        io.save_torch(tmp_path / "last.pt", {"w": torch.zeros(3)})
        io.write_text(tmp_path / "comp4_det_test_car.txt", "x\n")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == dict.fromkeys(
        ("results.json", "last.pt", "comp4_det_test_car.txt"), mode
    )


def _strict(text: str):
    def refuse(name: str):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_results_and_metrics_write_non_finite_numbers_as_null_by_one_rule(tmp_path: Path) -> None:
    nested = {"loss": math.nan, "coco": {"APl": math.inf}, "curve": [1.0, -math.inf], "n": 3}
    expected = {"loss": None, "coco": {"APl": None}, "curve": [1.0, None], "n": 3}
    assert io.jsonable(nested) == expected
    io.write_json(tmp_path / "x.json", nested)
    assert _strict((tmp_path / "x.json").read_text()) == expected
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log(nested, step=1)
    sink.close()
    assert _strict((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, **expected}
    results = Results(
        status="diverged",
        model="m",
        norm="n",
        batch=1,
        world_size=1,
        total_batch=1,
        seed=0,
        data="d",
        loss_variance=math.nan,
        final_loss=math.inf,
        map_voc07=0.0,
    )
    write_results(tmp_path, results)
    on_disk = _strict((tmp_path / "results.json").read_text())
    assert on_disk["loss_variance"] is None and on_disk["final_loss"] is None and on_disk["map_voc07"] == 0.0
    assert read_results(tmp_path).loss_variance is None


def test_results_written_with_nan_by_earlier_versions_still_read(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"status": "diverged", "loss_variance": NaN}')
    assert math.isnan(read_results(tmp_path).loss_variance)
