"""`make mutate`: mutation testing of the numerical core with mutmut, one module at a time.

Each module is mutated in a snapshot of the tree of its own (``.cache/mutate/<module>/``, rebuilt
on every run, so edits made meanwhile never mix into a run and a run never touches the work tree),
against only the fast test files listed for it below; mutmut then runs, for each mutant, only the
tests of that list that call the mutated function. Prints every surviving mutant (``mutmut show``
diffs with ``--diffs``) and a per-module summary table, also written to
``.cache/mutate/summary.md``.

    python tools/mutate.py                     # every module, in the order below
    python tools/mutate.py stats voc_ap        # some of them (names from MODULES)
    python tools/mutate.py --diffs loss_stats  # with the diff of every surviving mutant
    python tools/mutate.py --again voc_ap      # only the mutants the last run did not kill

``--again`` re-runs just the last run's survivors (after new tests were written for them) and
updates that run's counts; it refuses when the mutated file changed since (its mutants would be
numbered differently), so a full run is needed then.

Why mutmut (3.x): it forks each mutant's test run from a process that has already imported torch
and collected the tests, and runs only the tests that reach the mutated function, so a mutant
costs a fraction of a second instead of the ~3 s of a fresh ``pytest`` (cosmic-ray's model); it
also never edits the checked-out files. Its limits: functions under a decorator other than
``@staticmethod`` / ``@classmethod`` (``@torch.no_grad()``, ``@property``) and module-level
constants are not mutated, and code that runs only in a child process counts as untested.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mutate"

# module name -> (file to mutate, the fast test files that cover it). Keep each list to tests of a
# few seconds: mutmut runs them once to map tests to functions, then the covering ones per mutant.
_CBN_TESTS = [  # test_norm_cbn.py without its two torch.compile tests (20-40 s of compilation each)
    f"tests/norm/test_norm_cbn.py::{name}"
    for name in (
        "test_window_one_equals_bn",
        "test_zero_lr_statistics_are_bn_over_union_of_last_k_batches",
        "test_compensated_mean_of_first_conv_is_exact_mean_under_current_weights",
        "test_analytic_derivatives_match_autograd",
        "test_state_dict_round_trip_mid_training_continues_identically",
        "test_checkpoint_with_other_window_is_refused_with_layer_name",
        "test_negative_compensated_variance_is_dropped",
        "test_non_finite_slot_that_is_not_kept_leaves_gradient_finite",
        "test_burnin_is_plain_bn_then_window_grows",
        "test_eval_uses_running_statistics_of_current_batches",
        "test_bf16_autocast_keeps_statistics_in_fp32",
        "test_unwired_cbn_is_an_error_naming_the_layer",
        "test_naive_cbn_needs_no_conv_and_ignores_weight_changes",
        "test_diagnostics_report_dropped_entries_and_window",
    )
]
_CBN_EXTRA_TESTS = [  # test_norm_precision.py's CBN tests without the 23 s fp16 stem, and the rollback of a slot
    *[
        f"tests/norm/test_norm_precision.py::{name}"
        for name in (
            "test_cbn_window_forward_gradcheck_with_taylor_compensation",
            "test_cbn_float64_model_trains_and_matches_float32",
            "test_cbn_float64_checkpoint_resumes_in_float64",
            "test_cbn_history_holds_no_weight_copies",
            "test_stored_offsets_equal_the_contraction_with_the_weight_of_then",
            "test_under_bf16_autocast_offsets_are_contracted_with_the_fp32_weight",
        )
    ],
    "tests/engine/test_ddp_agreement.py::test_rollback_restores_a_cbn_slot_after_its_history_moved_dtype",
]
_SSD_TESTS = [  # tests/models/test_ssd.py without its tiny training run (12 s)
    f"tests/models/test_ssd.py::{name}"
    for name in (
        "test_vgg_ssd_has_the_papers_maps_and_default_boxes",
        "test_resnet_ssd300_gives_ssd300_maps_with_one_extra_layer_fewer",
        "test_every_ssd_config_builds_with_a_norm_after_every_conv_but_the_predictors",
        "test_norm_where_backbone_leaves_the_head_without_norms_and_gives_its_convs_biases",
        "test_inference_returns_labelled_boxes_in_the_original_image_frame",
        "test_mismatched_aspect_ratios_name_the_setting",
        "test_the_resnet50_ssd300_has_ssd300s_maps_and_default_boxes",
        "test_ssd_with_no_norm_detects_exactly_as_torchvisions_ssd",
        "test_ssd_with_no_norm_has_torchvisions_training_losses",
        "test_build_ssd_passes_every_setting_to_torchvisions_ssd",
        "test_ssd_settings_that_do_not_fit_are_named",
        "test_resnet_feature_maps_defaults_and_stage_checks",
    )
]
# tests/cli/test_voc_eval_cli.py without its one subprocess run (2 s, and no mutant is seen in a child)
_VOC_EVAL_TESTS = [
    f"tests/cli/test_voc_eval_cli.py::{name}"
    for name in (
        "test_ground_truth_written_as_results_scores_full_marks",
        "test_default_classes_are_voc_and_allow_missing_scores_missing_files_as_no_detections",
        "test_malformed_line_is_one_error_line_naming_file_and_line",
        "test_missing_results_dir_and_unknown_metric",
        "test_synthetic_detections_scored_without_classes_from_the_dataset_metadata",
        "test_classes_come_from_the_result_files_when_they_are_not_voc",
        "test_no_result_file_to_score_is_one_error_line",
    )
]

_RESULTS_TESTS = [  # the results.json tests of tests/runtime/test_formats.py, without its training runs
    f"tests/runtime/test_formats.py::{name}"
    for name in (
        "test_results_text_is_the_original_studys_file_line_by_line",
        "test_results_text_of_a_failed_run_names_the_error_and_defaults_the_ap_metric",
        "test_results_round_trip_keeps_unknown_keys_and_leaves_out_what_does_not_apply",
        "test_results_written_before_the_schema_had_a_version_read_as_version_0",
        "test_only_a_completed_run_counts_as_completed",
        "test_an_unreadable_results_json_is_named_with_its_error_type",
        "test_results_json_is_read_as_utf8_whatever_the_locale",
    )
]
_ANNOTATION_TESTS = [  # the annotation parser and box tests of tests/data/test_voc_dataset.py
    f"tests/data/test_voc_dataset.py::{name}"
    for name in (
        "test_an_annotation_reads_as_written_with_the_voc_quirks",
        "test_an_annotation_without_filename_names_the_jpeg_after_itself",
        "test_a_malformed_annotation_names_the_file_and_what_is_missing",
        "test_an_image_size_must_be_positive_integers",
        "test_a_one_pixel_image_is_a_valid_size",
        "test_a_missing_annotation_file_is_its_own_kind_of_problem",
        "test_an_image_without_objects_has_empty_ground_truth_of_the_documented_dtypes",
        "test_a_box_below_the_image_has_no_height_left_and_is_dropped",
        "test_box_conversions_return_float64_whatever_they_are_given",
    )
]

# module name -> (file to mutate, the fast test files that cover it). Keep each list to tests of a
# few seconds: mutmut runs them once to map tests to functions, then the covering ones per mutant.
# Left out on purpose: tests that compile (minutes per mutant), whole training runs, and
# tests/norm/test_norm_distributed.py (its SyncBN runs in child processes, where no mutant is seen; the
# threaded two-rank tests of tests/norm/test_norm_layer_details.py cover the same code in-process).
MODULES: dict[str, tuple[str, list[str]]] = {
    "loss_stats": ("cbn_detect/engine/loss_stats.py", ["tests/engine/test_loss_stats.py"]),
    "boxes": (
        "cbn_detect/voc/boxes.py",
        [
            "tests/evaluation/test_voc_ap.py",
            "tests/evaluation/test_devkit_io.py",
            "tests/data/test_voc_dataset.py::test_box_conversions_return_float64_whatever_they_are_given",
        ],
    ),
    "stats": ("cbn_detect/stats.py", ["tests/report/test_stats.py"]),
    "results": (
        "cbn_detect/results.py",
        [
            "tests/cli/test_errors.py::test_an_unreadable_results_json_names_the_file",
            "tests/cli/test_errors.py::test_results_and_metrics_write_non_finite_numbers_as_null_by_one_rule",
            "tests/cli/test_errors.py::test_results_written_with_nan_by_earlier_versions_still_read",
            *_RESULTS_TESTS,
        ],
    ),
    "voc_ap": ("cbn_detect/evaluation/voc_ap.py", ["tests/evaluation/test_voc_ap.py"]),
    "devkit_io": ("cbn_detect/evaluation/devkit_io.py", ["tests/evaluation/test_devkit_io.py", *_VOC_EVAL_TESTS]),
    "annotations": (
        "cbn_detect/voc/annotations.py",
        [
            "tests/data/test_voc_ground_truth.py",
            "tests/evaluation/test_devkit_io.py",
            "tests/data/test_data_errors.py",
            *_ANNOTATION_TESTS,
        ],
    ),
    "brn": ("cbn_detect/norm/brn.py", ["tests/norm/test_norm_brn.py", "tests/norm/test_norm_layer_details.py"]),
    "syncbn": ("cbn_detect/norm/syncbn.py", ["tests/norm/test_norm_layer_details.py"]),
    "ssd": ("cbn_detect/models/ssd.py", _SSD_TESTS),
    "cbn_math": ("cbn_detect/norm/cbn_math.py", [*_CBN_TESTS, "tests/norm/test_norm_layer_details.py"]),
    "cbn": ("cbn_detect/norm/cbn.py", [*_CBN_TESTS, *_CBN_EXTRA_TESTS, "tests/norm/test_norm_layer_details.py"]),
    "retinanet": (
        "cbn_detect/models/retinanet.py",
        ["tests/models/test_models.py", "tests/models/test_retinanet_batched.py"],
    ),
    "retinanet_batched": (
        "cbn_detect/models/retinanet_batched.py",
        ["tests/models/test_retinanet_batched.py", "tests/models/test_models.py"],
    ),
}

# Beyond the defaults (tests/, pyproject.toml), what the tests read: the Hydra configs.
ALSO_COPY = ["conf"]
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "skipped", "not checked")


def _setup_cfg(target: str, tests: list[str]) -> str:
    lines = [
        "[mutmut]",
        "source_paths = cbn_detect",
        f"only_mutate = {target}",
        "also_copy =",
        *[f"    {path}" for path in ALSO_COPY],
        "pytest_add_cli_args_test_selection =",
        *[f"    {test}" for test in tests],
        "pytest_add_cli_args =",
        "    -p",
        "    no:cacheprovider",
        # torch is not fork-safe once it has run ops: fork each mutant from a clean server process
        "process_isolation = forkserver",
        "use_git_change_detection = false",
        # a mutant that hangs is killed after ~4x its tests' normal CPU time (mutmut's default: 15x)
        "timeout_multiplier = 4",
    ]
    return "\n".join(lines) + "\n"


def _snapshot(name: str, target: str, tests: list[str]) -> Path:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "cbn_detect", work / "cbn_detect", ignore=ignore)
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    for path in ALSO_COPY:
        shutil.copytree(REPO / path, work / path, ignore=ignore)
    # the project's pytest settings (filterwarnings, addopts); mutmut's own come from setup.cfg
    text = (REPO / "pyproject.toml").read_text()
    assert "[tool.mutmut]" not in text, "mutmut settings live in tools/mutate.py's setup.cfg"
    (work / "pyproject.toml").write_text(text)
    (work / "setup.cfg").write_text(_setup_cfg(target, tests))
    # A failing example kills the mutant: hypothesis's shrinking of it (seconds per mutant) is skipped.
    with (work / "tests" / "conftest.py").open("a") as conftest:
        conftest.write(
            "\n\n# added by tools/mutate.py in its snapshot only\n"
            "from hypothesis import Phase as _Phase, settings as _settings\n"
            "_settings.register_profile('mutate', phases=[_Phase.explicit, _Phase.reuse, _Phase.generate])\n"
            "_settings.load_profile('mutate')\n"
        )
    return work


def _counts(work: Path, target: str, only: set[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Mutants per status and the "name: status" lines of those not killed (of ``only``, if given)."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / (target + ".meta")).read_text())
    counts = dict.fromkeys(STATUSES, 0)
    not_killed = []
    for key, code in sorted(meta["exit_code_by_key"].items()):
        if only is not None and key not in only:
            continue
        status = status_by_exit_code[code]
        counts[status] = counts.get(status, 0) + 1
        if status != "killed":
            not_killed.append(f"{key}: {status}")
    return counts, not_killed


def _sha(target: str) -> str:
    return hashlib.sha256((REPO / target).read_bytes()).hexdigest()


def run_module(name: str, diffs: bool, previous: dict | None = None) -> dict[str, object]:
    """Mutate one module; with ``previous`` (its last full run's record), only that run's survivors."""
    target, tests = MODULES[name]
    present = [t for t in tests if (REPO / t.split("::")[0]).exists()]
    again: list[str] = []
    if previous is not None:
        if "error" in previous or previous.get("sha256", _sha(target)) != _sha(target):
            print(
                f"== {name}: {target} changed since its last run (or that run failed); not re-run: run it in full",
                flush=True,
            )
            return previous
        again = [line.split(":")[0] for line in previous["not_killed"]]
        if not again:
            print(f"== {name}: the last run left no survivor", flush=True)
            return previous
    work = _snapshot(name, target, present)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    mutmut = [sys.executable, "-m", "mutmut"]
    print(
        f"== {name}: {target} against {' '.join(present) or '(no tests)'}"
        + (f" ({len(again)} mutants again)" if again else ""),
        flush=True,
    )
    started = datetime.datetime.now()
    if present:
        log = work / "mutmut-run.log"
        with log.open("w") as out:
            code = subprocess.call(
                [*mutmut, "run", "--max-children", "1", *again], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        if code != 0 or not (work / "mutants" / (target + ".meta")).exists():
            print(log.read_text()[-4000:])
            return {"module": name, "file": target, "error": f"mutmut exited {code}; log: {log}"}
        counts, not_killed = _counts(work, target, set(again) if again else None)
        if again:  # the previous counts, with the re-run mutants' old statuses replaced by the new ones
            rerun = counts
            counts = {status: previous.get(status, 0) for status in STATUSES}
            for line in previous["not_killed"]:
                counts[line.split(": ", 1)[1]] -= 1
            counts = {status: counts[status] + rerun.get(status, 0) for status in STATUSES}
    else:
        counts, not_killed = dict.fromkeys(STATUSES, 0), []
    seconds = (datetime.datetime.now() - started).total_seconds()
    for line in not_killed:
        print("   ", line)
        if diffs:
            show = subprocess.run(
                [*mutmut, "show", line.split(":")[0]], cwd=work, env=env, capture_output=True, text=True
            )
            print("\n".join("      " + s for s in show.stdout.splitlines()[1:]))
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    print(f"   {name}: {shown or 'no mutants'} ({seconds:.0f} s)", flush=True)
    record = {
        "module": name,
        "file": target,
        "sha256": _sha(target),
        "tests": present,
        "seconds": round(seconds),
        **counts,
        "not_killed": not_killed,
    }
    if previous is not None:
        record["first_run"] = previous.get("first_run", {k: previous[k] for k in ("date", *STATUSES) if k in previous})
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--diffs", action="store_true", help="print the diff of every surviving mutant")
    parser.add_argument(
        "--again", action="store_true", help="re-run only the mutants the last run of each module did not kill"
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; valid: {', '.join(MODULES)}")
    date = datetime.date.today().isoformat()
    # the summary keeps the last result of every module, so runs of a few modules add up
    summary_json = WORK / "summary.json"
    last = json.loads(summary_json.read_text()) if summary_json.exists() else {}
    for name in args.modules or MODULES:
        previous = last.get(name) if args.again else None
        if args.again and previous is None:
            parser.error(f"--again {name}: no earlier run recorded in {summary_json}")
        last[name] = {"date": date, **run_module(name, args.diffs, previous)}
    rows = [last[name] for name in MODULES if name in last]
    table = [
        "mutmut summary (mutants per status and module; the first run's counts, before tests were added for its "
        "survivors; the date of each module's last run)",
        "",
    ]
    table += [
        "| module | killed | survived | no tests | timeout | other | first run: killed / survived | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            table.append(f"| {row['module']} | error: {row['error']} | | | | | | {row['date']} |")
            continue
        other = sum(row[s] for s in ("suspicious", "segfault", "skipped", "not checked"))
        first = row.get("first_run", row)
        table.append(
            f"| {row['module']} | {row['killed']} | {row['survived']} | {row['no tests']} | {row['timeout']} | {other} "
            f"| {first['killed']} / {first['survived']} | {row['date']} |"
        )
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.md").write_text("\n".join(table) + "\n")
    summary_json.write_text(json.dumps(last, indent=1))
    print("\n".join(table))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
