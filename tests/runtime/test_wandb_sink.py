"""The W&B sink against real offline W&B runs, read back from their ``.wandb`` files; the fallbacks
against a closed port on loopback, in subprocesses because W&B caches its environment per process."""

from __future__ import annotations

import contextlib
import math
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbn_detect.tracking.wandb_reader import (
    CorruptRunFile,
    find_run_files,
    logged_images,
    read_offline_run,
    wait_for_run,
)
from cbn_detect.tracking.wandb_sink import DetectionPicture, build_wandb_sink, flatten
from tests.conftest import REPO

OFFLINE = {
    "mode": "offline",
    "project": "cbn_detect_tests",
    "entity": None,
    "group": None,
    "tags": ["t"],
    "init_timeout": 5,
}
UNREACHABLE = "http://127.0.0.1:9"  # the discard port on loopback: refused at once, never leaves the machine


def test_flatten_joins_nested_keys_and_blanks_non_finite_numbers() -> None:
    flat = flatten(
        {"coco": {"AP": 0.1, "AP50": 0.2}, "fps": {"fps_model": 3.0}, "loss_variance": math.nan, "status": "completed"}
    )
    assert flat == {
        "coco/AP": 0.1,
        "coco/AP50": 0.2,
        "fps/fps_model": 3.0,
        "loss_variance": None,
        "status": "completed",
    }


def test_offline_run_holds_our_steps_config_and_final_summary(tmp_path: Path) -> None:
    config = {"model": {"name": "retinanet_tiny"}, "norm": {"name": "cbn"}, "data": {"batch": 4}, "seed": 1}
    sink = build_wandb_sink(OFFLINE, config, "retinanet_tiny-cbn-b4-s1", "sweep-a", tmp_path)
    assert sink is not None and sink.mode == "offline"
    for step in (2, 4, 6):
        sink.log({"epoch": 1, "loss": 1.0 / step, "lr": 0.01 * step}, step)
    sink.log({"epoch": 1, "eval/map_voc07": 0.25}, 6)
    sink.summary({"status": "completed", "map_voc07": 0.3, "coco": {"AP50": 0.4}, "loss_variance": math.nan})
    sink.close()
    sink.log({"loss": 9.0}, 8)  # after close: ignored, not raised

    run = wait_for_run(tmp_path)
    assert run.exit_code == 0
    assert (run.name, run.group, run.project, run.tags) == (
        "retinanet_tiny-cbn-b4-s1",
        "sweep-a",
        "cbn_detect_tests",
        ["t"],
    )
    assert {k: v for k, v in run.config.items() if k != "_wandb"} == config
    assert [row["_step"] for row in run.history] == [2, 4, 6]
    assert [row["loss"] for row in run.history] == pytest.approx([0.5, 0.25, 1 / 6])
    assert run.history[-1]["eval/map_voc07"] == 0.25 and "eval/map_voc07" not in run.history[0]
    assert run.summary["map_voc07"] == 0.3 and run.summary["coco/AP50"] == 0.4
    assert run.summary["status"] == "completed" and run.summary["loss_variance"] is None


def test_a_failing_w_and_b_call_warns_once_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
    assert sink is not None
    sink.log({"loss": 1.0}, 1)
    sink.run.finish()  # what another wandb.init in the same process does to this run
    for step in (2, 3):
        sink.log({"loss": 0.5}, step)
    sink.summary({"map_voc07": 0.1})
    sink.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "W&B log failed" in r.getMessage()]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0].getMessage()
    assert [row["_step"] for row in wait_for_run(tmp_path).history] == [1]


def test_histograms_land_in_the_same_step_as_the_metrics(tmp_path: Path) -> None:
    sink = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
    assert sink is not None
    sink.log_histograms({"weights/conv": torch.arange(100.0), "grads/conv": torch.zeros(3)}, 5)
    sink.log({"loss": 1.0}, 5)
    sink.close()
    (row,) = wait_for_run(tmp_path).history
    assert row["_step"] == 5 and row["loss"] == 1.0
    assert row["weights/conv"]["_type"] == "histogram" and sum(row["weights/conv"]["values"]) == 100
    assert row["grads/conv"]["_type"] == "histogram"


def test_detection_images_hold_prediction_and_ground_truth_boxes_in_w_and_b_format(tmp_path: Path) -> None:
    classes = ("circle", "square")
    image = np.zeros((40, 60, 3), np.uint8)
    image[5:25, 10:30] = 200
    pictures = [
        DetectionPicture(
            image=image,
            caption="000007",
            gt_boxes=np.array([[10.0, 5.0, 30.0, 25.0], [40.0, 1.0, 50.0, 9.0]]),
            gt_labels=np.array([2, 1]),
            gt_difficult=np.array([False, True]),
            boxes=np.array([[9.5, 5.25, 30.0, 24.0]]),
            scores=np.array([0.875]),
            labels=np.array([2]),
        ),
        DetectionPicture(
            image=image[::-1].copy(),
            caption="000009",
            gt_boxes=np.zeros((0, 4)),
            gt_labels=np.zeros(0, int),
            gt_difficult=np.zeros(0, bool),
            boxes=np.zeros((0, 4)),
            scores=np.zeros(0),
            labels=np.zeros(0, int),
        ),
    ]
    sink = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
    assert sink is not None
    sink.log({"eval/map_voc07": 0.5}, 12)
    sink.log_detections("eval/examples", pictures, classes, 12)
    sink.close()
    run = wait_for_run(tmp_path)
    (row,) = run.history
    assert row["_step"] == 12 and row["eval/map_voc07"] == 0.5
    first, second = logged_images(run, row["eval/examples"])
    assert (first.caption, second.caption) == ("000007", "000009")
    assert first.path.is_relative_to(run.files[0].parent / "files" / "media" / "images")
    assert np.asarray(Image.open(first.path).convert("RGB")).tolist() == image.tolist()
    assert (first.width, first.height) == (60, 40)
    labels = {"1": "circle", "2": "square"}
    assert first.boxes["predictions"] == {
        "box_data": [
            {
                "position": {"minX": 9.5, "minY": 5.25, "maxX": 30.0, "maxY": 24.0},
                "domain": "pixel",
                "class_id": 2,
                "scores": {"score": 0.875},
                "box_caption": "square 0.88",
            }
        ],
        "class_labels": labels,
    }
    assert first.boxes["ground_truth"]["box_data"] == [
        {
            "position": {"minX": 10.0, "minY": 5.0, "maxX": 30.0, "maxY": 25.0},
            "domain": "pixel",
            "class_id": 2,
            "box_caption": "square",
        },
        {
            "position": {"minX": 40.0, "minY": 1.0, "maxX": 50.0, "maxY": 9.0},
            "domain": "pixel",
            "class_id": 1,
            "box_caption": "circle (difficult)",
        },
    ]
    assert second.boxes["predictions"]["box_data"] == [] and second.boxes["ground_truth"]["class_labels"] == labels


def test_config_group_wins_over_the_sweep_and_disabled_builds_nothing(tmp_path: Path) -> None:
    sink = build_wandb_sink({**OFFLINE, "group": "mine"}, {}, "n", "sweep-a", tmp_path / "a")
    assert sink is not None
    sink.close()
    assert wait_for_run(tmp_path / "a").group == "mine"
    assert build_wandb_sink({**OFFLINE, "mode": "disabled"}, {}, "n", None, tmp_path / "b") is None
    assert not (tmp_path / "b" / "wandb").exists()
    with pytest.raises(ValueError, match="online, offline, disabled"):
        build_wandb_sink({**OFFLINE, "mode": "onlin"}, {}, "n", None, tmp_path / "c")


def test_reader_joins_records_split_across_blocks_and_rejects_a_damaged_file(tmp_path: Path) -> None:
    big = "x" * 100_000  # three 32 KiB blocks: first, middle and last chunks
    sink = build_wandb_sink(OFFLINE, {"big": big}, "n", None, tmp_path)
    assert sink is not None
    sink.close()
    assert wait_for_run(tmp_path).config["big"] == big
    (run_file,) = find_run_files(tmp_path)
    data = bytearray(run_file.read_bytes())
    data[40_000] ^= 0xFF
    run_file.write_bytes(bytes(data))
    with pytest.raises(CorruptRunFile, match="bad chunk"):
        read_offline_run(run_file)


def test_a_resumed_job_continues_its_run_id_and_a_fresh_start_gets_a_new_one(tmp_path: Path) -> None:
    """Offline, each part is its own offline-run folder (W&B 0.31 ignores resume there); the reader
    puts the parts of one id back together, oldest first."""
    first = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
    first.log({"loss": 1.0}, 1)
    first.close(exit_code=143)
    kept = (tmp_path / "wandb" / "run_id").read_text().strip()
    second = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path, resume=True)
    assert second.run.id == kept and not second.run.resumed
    second.log({"loss": 0.5}, 2)
    second.close()
    run = wait_for_run(tmp_path)
    assert run.run_id == kept and [row["_step"] for row in run.history] == [1, 2]
    assert run.part_exit_codes == [143, 0] and len({f.parent for f in run.files}) == 2

    fresh = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path, resume=False)
    fresh.close()
    assert fresh.run.id != kept == run.run_id
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == fresh.run.id
    with pytest.raises(ValueError, match="offline runs of 2 ids"):
        wait_for_run(tmp_path)
    assert [row["_step"] for row in wait_for_run(tmp_path, run_id=kept).history] == [1, 2]


def test_a_sink_closed_while_an_exception_propagates_records_its_exit_code(tmp_path: Path) -> None:
    class Interrupted(Exception):
        signum = 15

    sink = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
    with pytest.raises(Interrupted):
        try:
            raise Interrupted
        finally:
            sink.close()
    assert wait_for_run(tmp_path).exit_code == 128 + 15


def test_the_run_is_finished_before_a_requeue_handler_ends_the_process(tmp_path: Path) -> None:
    """As submitit's SIGUSR2 handler (scontrol requeue, then exit): W&B's service dies with the job,
    so the sink finishes its run first, last step included."""
    calls = []

    def requeue(signum, frame) -> None:
        calls.append((signum, wait_for_run(tmp_path, timeout_s=10)))

    previous = signal.signal(signal.SIGUSR1, requeue)
    try:
        sink = build_wandb_sink(OFFLINE, {}, "n", None, tmp_path)
        sink.log({"loss": 1.0}, 1)
        sink.log({"loss": 0.5}, 2)
        signal.raise_signal(signal.SIGUSR1)
        ((signum, run),) = calls
        assert signum == signal.SIGUSR1 and run.exit_code == 128 + signal.SIGUSR1
        assert [row["_step"] for row in run.history] == [1, 2]
        assert signal.getsignal(signal.SIGUSR1) is requeue  # the sink's wrapper is gone with the run
        sink.close()  # the end of run(): nothing left to do
    finally:
        signal.signal(signal.SIGUSR1, previous)


FALLBACK_SCRIPT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from cbn_detect.tracking.wandb_sink import build_wandb_sink
cfg = {"mode": "online", "project": "p", "entity": None, "group": None, "tags": [], "init_timeout": 3}
for job in ("a", "b"):
    sink = build_wandb_sink(cfg, {"seed": 0}, "job-" + job, None, Path(sys.argv[1]) / job)
    sink.log({"loss": 1.5}, step=1)
    sink.summary({"map_voc07": 0.5})
    sink.close()
print("TRAINING WENT ON", sink.mode)
"""


def _fallback_env(tmp_path: Path, api_key: str | None) -> dict[str, str]:
    """No credentials anywhere (environment, ~/.netrc) and the server on a closed loopback port."""
    keep = ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") or k in keep}
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        PYTHONPATH=str(REPO),
        HOME=str(home),
        NETRC=str(home / ".netrc"),
        WANDB_BASE_URL=UNREACHABLE,
        WANDB_DIR=str(tmp_path),
    )
    if api_key:
        env["WANDB_API_KEY"] = api_key
    return env


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pseudo-terminal until the child closes it, so the child never blocks on a full buffer."""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)


def _run_fallback(tmp_path: Path, api_key: str | None, terminal: bool) -> tuple[str, float]:
    """Two jobs in one process, as in a local multirun; on a pseudo-terminal if asked, where W&B would prompt."""
    command = [sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path)]
    env = _fallback_env(tmp_path, api_key)
    start = time.monotonic()
    if not terminal:
        proc = subprocess.run(
            command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        return proc.stdout + proc.stderr, time.monotonic() - start
    primary, secondary = pty.openpty()
    chunks: list[bytes] = []
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    reader = threading.Thread(target=_drain, args=(primary, chunks))
    reader.start()
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
        reader.join(timeout=5)
        os.close(primary)
    return b"".join(chunks).decode(errors="replace"), time.monotonic() - start


@pytest.mark.parametrize(
    "api_key, terminal",
    [(None, False), (None, True), ("0123456789abcdef0123456789abcdef01234567", False)],
    ids=["no-key", "no-key-on-a-terminal", "unreachable-server"],
)
def test_online_without_key_or_server_warns_once_and_logs_offline(
    tmp_path: Path, api_key: str | None, terminal: bool
) -> None:
    output, seconds = _run_fallback(tmp_path, api_key, terminal)
    assert "TRAINING WENT ON offline" in output, output[-3000:]
    assert output.count("W&B online could not start") == 1, output[-3000:]
    assert "wandb sync" in output and "WANDB_API_KEY" in output
    # init_timeout=3 bounds the wait for the server; the second job does not wait again.
    assert seconds < 45, seconds
    for job in ("a", "b"):
        run = wait_for_run(tmp_path / job)
        assert run.history[0]["loss"] == 1.5 and run.summary["map_voc07"] == 0.5 and run.config["seed"] == 0
