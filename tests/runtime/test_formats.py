"""Versioned file formats: a checkpoint records its payload layout (``format``) and torch records
each module's state layout (``_version``; CBN's history is version 3), ``results.json`` its
``schema_version``. Older layouts are converted by their version and still resume and evaluate;
a layout newer than the code is refused in one line naming the file and both versions."""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from cbn_detect.engine.checkpoint import FORMAT, TrainState, load_checkpoint, read_checkpoint, save_checkpoint
from cbn_detect.engine.precision import Precision
from cbn_detect.evaluate import main as evaluate_main
from cbn_detect.norm import CrossIterationBatchNorm2d, convert_norm
from cbn_detect.results import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    NewerResults,
    Results,
    UnreadableResults,
    completed_results,
    read_results,
    results_text,
    write_results,
)
from cbn_detect.runtime.errors import CheckpointError
from cbn_detect.train import run
from tests.conftest import CONF_DIR, TINY_RUN

CPU = torch.device("cpu")


def unversioned(payload: dict, *, keep: tuple[str, ...] = ("scaler", "config")) -> dict:
    """``payload`` (as :func:`save_checkpoint` writes it) in the layout of before versioning: no
    ``format``, only the optional keys in ``keep``, CBN's state recorded as version 2 (BatchNorm's,
    which CBN carried then)."""
    model = OrderedDict(payload["model"])
    model._metadata = {k: dict(v) for k, v in payload["model"]._metadata.items()}
    for key in model:
        if key.endswith("_extra_state"):
            model._metadata[key.removesuffix("_extra_state").removesuffix(".")]["version"] = 2
    base = ("model", "optimizer", "scheduler", "state", "rng")
    return {k: model if k == "model" else v for k, v in payload.items() if k in base or k in keep}


def cbn_model() -> nn.Sequential:
    torch.manual_seed(0)
    convs = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
    )
    return convert_norm(convs, "cbn", window=3, burnin=1)


def trainer(model: nn.Module) -> tuple[Optimizer, LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, LambdaLR(optimizer, lambda step: 1 / (1 + step))


def step(model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, x: torch.Tensor) -> torch.Tensor:
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.detach()


def saved_cbn_model(path: Path, steps: int) -> tuple[nn.Module, Optimizer, LRScheduler, list[torch.Tensor]]:
    """A CBN model trained ``steps`` steps and checkpointed at ``path``; the inputs of 3 more steps."""
    xs = [torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(steps + 3)]
    model = cbn_model()
    optimizer, scheduler = trainer(model)
    for x in xs[:steps]:
        step(model, optimizer, scheduler, x)
    save_checkpoint(path, model, optimizer, scheduler, TrainState(epoch=1, step=steps), Precision("off", CPU))
    return model, optimizer, scheduler, xs[steps:]


# --- what is written -------------------------------------------------------------------------------


def test_a_checkpoint_records_its_format_and_cbns_state_version(tmp_path: Path) -> None:
    saved_cbn_model(tmp_path / "last.pt", steps=2)
    payload = torch.load(tmp_path / "last.pt", weights_only=False)
    assert payload["format"] == FORMAT == 2 and payload["config"] is None  # every key written, config or not
    assert CrossIterationBatchNorm2d._version == 3
    assert payload["model"]._metadata["1"]["version"] == payload["model"]._metadata["4"]["version"] == 3


# --- older layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [("scaler", "config"), ()], ids=["before versioning", "before amp and config"])
def test_a_checkpoint_of_an_older_layout_resumes_bit_for_bit(tmp_path: Path, keep: tuple[str, ...]) -> None:
    model, optimizer, scheduler, xs = saved_cbn_model(tmp_path / "last.pt", steps=3)
    old = tmp_path / "old.pt"
    torch.save(unversioned(torch.load(tmp_path / "last.pt", weights_only=False), keep=keep), old)
    assert "format" not in torch.load(old, weights_only=False)
    resumed = cbn_model()
    resumed_optimizer, resumed_scheduler = trainer(resumed)
    state = load_checkpoint(old, resumed, resumed_optimizer, resumed_scheduler, Precision("off", CPU))
    assert (state.epoch, state.step) == (1, 3) and resumed[1].num_steps == 3
    for x in xs:
        assert torch.equal(step(resumed, resumed_optimizer, resumed_scheduler, x), step(model, optimizer, scheduler, x))
    payload = read_checkpoint(old)  # evaluation's reader: the current layout, an absent config as None
    assert payload["format"] == FORMAT and payload["config"] is None and payload["scaler"] == {}


def test_cbns_history_is_converted_by_the_version_it_was_saved_as() -> None:
    """A history with weight copies is version 2's older layout: loaded as version 2 it is
    converted; the same history recorded as version 3 does not fit (nothing is guessed from
    its fields), nor does it given to set_extra_state, which takes version 3's layout only."""
    model = cbn_model()
    for i in range(2):
        model(torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(i)))
    state = model.state_dict()
    extra = state["1._extra_state"]
    history = {k: v for k, v in extra["history"].items() if k not in ("wpatch", "wdsq")}
    weights = model[0].weight.detach().expand(2, 3, 2, 3, 3).clone()  # one copy per slot
    copies = {**extra, "history": {**history, "weight": weights}}
    state["1._extra_state"] = copies
    state._metadata["1"]["version"] = 2
    fresh = cbn_model()
    fresh.load_state_dict(state)
    loaded = fresh[1].get_extra_state()["history"]
    assert "weight" not in loaded and torch.equal(loaded["mean"], history["mean"])
    torch.testing.assert_close(loaded["wpatch"], extra["history"]["wpatch"], rtol=1e-5, atol=1e-6)
    state._metadata["1"]["version"] = 3
    with pytest.raises(ValueError, match="does not fit this layer"):
        cbn_model().load_state_dict(state)
    with pytest.raises(ValueError, match="does not fit this layer"):
        cbn_model()[1].set_extra_state(copies)


QUIET_CBN = ["wandb.mode=disabled", "diagnostics.level=off", "eval.coco=false", "norm=cbn", "norm.burnin=2"]


def tiny_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY_RUN, *QUIET_CBN, *overrides])


def test_a_run_resumes_and_evaluates_from_a_checkpoint_of_the_layout_before_versioning(tmp_path: Path) -> None:
    """One epoch of a CBN run, its checkpoint rewritten in the unversioned layout: evaluated, it
    scores what the run recorded; resumed for a second epoch, it ends as the current layout does."""
    trained = tmp_path / "trained"
    run(tiny_cfg("train.epochs=1"), trained)
    (trained / ".hydra").mkdir()
    OmegaConf.save(tiny_cfg("train.epochs=1"), trained / ".hydra" / "config.yaml")  # as Hydra does
    old, current = shutil.copytree(trained, tmp_path / "old"), shutil.copytree(trained, tmp_path / "current")
    checkpoint = old / "checkpoints" / "last.pt"
    torch.save(unversioned(torch.load(checkpoint, weights_only=False), keep=("scaler",)), checkpoint)

    assert evaluate_main([str(old), "eval.fps_images=0"]) == 0
    scored, recorded = (json.loads((old / name).read_text()) for name in ("eval_test.json", RESULTS_FILE))
    assert recorded["map_voc07"] is not None
    assert {k: scored[k] for k in ("map_voc07", "map_area", "ap_per_class")} == {
        k: recorded[k] for k in ("map_voc07", "map_area", "ap_per_class")
    }

    for run_dir in (old, current):  # as if interrupted after the first epoch's checkpoint
        (run_dir / RESULTS_FILE).unlink()
    ends = [run(tiny_cfg("train.epochs=2"), run_dir).to_dict() for run_dir in (old, current)]
    assert ends[0]["status"] == "completed" and ends[0]["steps"] == 8
    for key in ("map_voc07", "map_area", "ap_per_class", "loss_variance", "final_loss", "steps", "epochs"):
        assert ends[0][key] == ends[1][key], key
    assert torch.load(checkpoint, weights_only=False)["format"] == FORMAT  # rewritten in the current layout


# --- newer layouts -----------------------------------------------------------------------------------


def test_a_newer_checkpoint_is_refused_in_one_line_naming_it_and_both_formats(tmp_path: Path, capsys) -> None:
    model, optimizer, scheduler, _ = saved_cbn_model(tmp_path / "last.pt", steps=1)
    payload = torch.load(tmp_path / "last.pt", weights_only=False)
    newer = tmp_path / "newer.pt"
    torch.save({**payload, "format": FORMAT + 1}, newer)
    expected = (
        f"checkpoint {newer} is format {FORMAT + 1}, which this cbn_detect does not know (it reads formats 1 to "
        f"{FORMAT}): read it with the cbn_detect that wrote it, or move it away to start over"
    )
    with pytest.raises(CheckpointError) as read:
        read_checkpoint(newer)
    with pytest.raises(CheckpointError) as resumed:
        load_checkpoint(newer, model, optimizer, scheduler, Precision("off", CPU))
    assert str(read.value) == str(resumed.value) == expected
    assert evaluate_main([str(newer)]) == 2
    assert capsys.readouterr().err == f"evaluate: error: {expected}\n"


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, "2"])
def test_a_newer_results_file_is_refused_in_one_line_naming_it(tmp_path: Path, caplog, version) -> None:
    path = tmp_path / RESULTS_FILE
    path.write_text(json.dumps({"status": "completed", "schema_version": version, "map_voc07": 0.5}))
    with pytest.raises(NewerResults) as refused:
        read_results(tmp_path)
    assert str(refused.value) == (
        f"{path} has schema_version {version!r}, which this cbn_detect does not know (it reads versions 0 to "
        f"{SCHEMA_VERSION}): read it with the cbn_detect that wrote it"
    )
    assert isinstance(refused.value, UnreadableResults)  # the report lists it as unreadable, naming it
    caplog.set_level(logging.WARNING, logger="cbn_detect.results")
    assert completed_results(tmp_path) is None
    assert [r.getMessage() for r in caplog.records] == [f"{refused.value}; counting the job as not completed"]


# --- results.json --------------------------------------------------------------------------------

IDENTITY = dict(model="retinanet_tiny", norm="cbn", batch=4, world_size=2, total_batch=8, seed=3, data="synthetic")


def full_results(**changes) -> Results:
    fields = dict(
        status="completed",
        **IDENTITY,
        map_voc07=0.123456,
        map_area=0.5,
        ap_per_class={"cat": 0.25, "dog": None},
        ap_metric="area",
        coco={"AP": 0.1, "AP50": 0.25},
        fps={"fps_model": 12.345, "fps_end_to_end": 9.87, "device": "cpu", "dtype": "float32"},
        loss_variance=0.03125,
        final_loss=1.5,
        train_time_s=100.0,
        epochs=2,
        steps=8,
    )
    return Results(**{**fields, **changes})


def test_results_text_is_the_original_studys_file_line_by_line() -> None:
    assert results_text(full_results()) == (
        "model: retinanet_tiny\n"
        "norm: cbn\n"
        "batch per process: 4  world size: 2  total batch: 8\n"
        "seed: 3\n"
        "status: completed\n"
        "map_voc07: 0.1235\n"
        "map_area: 0.5000\n"
        "loss_variance: 0.0312\n"
        "final_loss: 1.5000\n"
        "train_time_s: 100.0000\n"
        "epochs: 2\n"
        "steps: 8\n"
        "coco: AP 0.1000  AP50 0.2500\n"
        "fps (batch 1, cpu, float32): model 12.3  end-to-end 9.9\n"
        "AP per class (area):\n"
        "  cat            0.2500\n"
        "  dog            no positives\n"
    )


def test_results_text_of_a_failed_run_names_the_error_and_defaults_the_ap_metric() -> None:
    failed = Results(status="failed", **IDENTITY, error="boom", ap_per_class={"cat": 0.5})
    assert results_text(failed).splitlines()[4:] == [
        "status: failed",
        "error: boom",
        "AP per class (voc07):",
        "  cat            0.5000",
    ]
    skipped = Results(status="skipped", **IDENTITY, reason="batch 1", map_voc07=None)
    assert results_text(skipped).splitlines()[4:] == ["status: skipped", "reason: batch 1"]


def test_results_round_trip_keeps_unknown_keys_and_leaves_out_what_does_not_apply(tmp_path: Path) -> None:
    results = full_results()
    on_disk = results.to_dict()
    assert "extra" not in on_disk and "error" not in on_disk and "reason" not in on_disk
    assert on_disk["schema_version"] == 1 and on_disk["ap_per_class"] == {"cat": 0.25, "dog": None}
    newer = {**on_disk, "extra": [1], "added_later": {"x": 2}}  # a newer writer's keys, one named "extra"
    read = Results.from_dict(newer)
    assert read.extra == {"extra": [1], "added_later": {"x": 2}}
    assert read.map_voc07 == 0.123456 and read.to_dict() == newer


def test_results_written_before_the_schema_had_a_version_read_as_version_0(tmp_path: Path) -> None:
    old = Results.from_dict({"status": "completed", "map_voc07": 0.5})
    assert old.schema_version == 0 and old.model is None and old.extra == {}
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "model": "ssd300"}))
    assert read_results(tmp_path).schema_version == 0


def test_only_a_completed_run_counts_as_completed(tmp_path: Path) -> None:
    assert completed_results(tmp_path) is None  # no file yet
    for status in ("failed", "diverged", "interrupted", "skipped", "COMPLETED"):
        write_results(tmp_path, full_results(status=status))
        assert completed_results(tmp_path) is None, status
    write_results(tmp_path, full_results())
    found = completed_results(tmp_path)
    assert found is not None and found.status == "completed" and found.map_voc07 == 0.123456
    assert (tmp_path / "results_batch_4.txt").read_text() == results_text(found)


def test_an_unreadable_results_json_is_named_with_its_error_type(tmp_path: Path, caplog) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"status": ')
    caplog.set_level(logging.WARNING, logger="cbn_detect.results")
    assert completed_results(tmp_path) is None
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"{path} cannot be read (JSONDecodeError: ")
    assert message.endswith("; counting the job as not completed")
    caplog.clear()
    assert completed_results(tmp_path, warn=False) is None and not caplog.records
    path.write_bytes('{"status": "completed", "model": "r\u00e9tina"}'.encode("utf-8"))
    assert read_results(tmp_path).model == "r\u00e9tina"


def test_results_json_is_read_as_utf8_whatever_the_locale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JSON is UTF-8 (RFC 8259); a reader that left the encoding to the locale would turn "é"
    into "Ã©" under a Latin-1 locale. The locale's default is made Latin-1 here for the files
    pathlib opens without an explicit encoding."""
    import io

    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: encoding or "latin-1")
    (tmp_path / "results.json").write_bytes('{"status": "completed", "model": "r\u00e9tina"}'.encode("utf-8"))
    assert (tmp_path / "results.json").read_text() != (tmp_path / "results.json").read_text(
        encoding="utf-8"
    )  # the stand-in works
    assert read_results(tmp_path).model == "r\u00e9tina"
