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
MODULES: dict[str, tuple[str, list[str]]] = {
    "loss_stats": ("cbn_detect/engine/loss_stats.py", ["tests/test_mutants_core.py"]),
    "boxes": ("cbn_detect/voc/boxes.py", ["tests/test_voc_ap.py", "tests/test_devkit_io.py"]),
    "stats": ("cbn_detect/stats.py", ["tests/test_stats.py", "tests/test_mutants_core.py"]),
    "results": (
        "cbn_detect/results.py",
        [
            "tests/test_errors.py::test_an_unreadable_results_json_names_the_file",
            "tests/test_errors.py::test_results_and_metrics_write_non_finite_numbers_as_null_by_one_rule",
            "tests/test_errors.py::test_results_written_with_nan_by_earlier_versions_still_read",
            "tests/test_mutants_core.py",
        ],
    ),
    "voc_ap": ("cbn_detect/evaluation/voc_ap.py", ["tests/test_voc_ap.py", "tests/test_mutants_core.py"]),
    "devkit_io": ("cbn_detect/evaluation/devkit_io.py", ["tests/test_devkit_io.py", "tests/test_mutants_core.py"]),
    "annotations": (
        "cbn_detect/voc/annotations.py",
        ["tests/test_voc_ground_truth.py", "tests/test_devkit_io.py", "tests/test_mutants_core.py"],
    ),
    "brn": ("cbn_detect/norm/brn.py", ["tests/test_norm_brn.py", "tests/test_mutants_norm.py"]),
    "syncbn": ("cbn_detect/norm/syncbn.py", ["tests/test_norm_distributed.py", "tests/test_mutants_norm.py"]),
    "ssd": ("cbn_detect/models/ssd.py", ["tests/test_ssd.py", "tests/test_mutants_models.py"]),
    "cbn_math": ("cbn_detect/norm/cbn_math.py", ["tests/test_norm_cbn.py", "tests/test_mutants_norm.py"]),
    "cbn": ("cbn_detect/norm/cbn.py", ["tests/test_norm_cbn.py", "tests/test_mutants_norm.py"]),
    "retinanet": ("cbn_detect/models/retinanet.py", ["tests/test_mutants_models.py"]),
    "retinanet_batched": (
        "cbn_detect/models/retinanet_batched.py",
        ["tests/test_retinanet_batched.py", "tests/test_mutants_models.py"],
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
    return work


def _counts(work: Path, target: str) -> tuple[dict[str, int], list[str]]:
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / (target + ".meta")).read_text())
    counts = dict.fromkeys(STATUSES, 0)
    not_killed = []
    for key, code in sorted(meta["exit_code_by_key"].items()):
        status = status_by_exit_code[code]
        counts[status] = counts.get(status, 0) + 1
        if status != "killed":
            not_killed.append(f"{key}: {status}")
    return counts, not_killed


def run_module(name: str, diffs: bool) -> dict[str, object]:
    target, tests = MODULES[name]
    present = [t for t in tests if (REPO / t.split("::")[0]).exists()]
    work = _snapshot(name, target, present)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"== {name}: {target} against {' '.join(present) or '(no tests)'}", flush=True)
    started = datetime.datetime.now()
    if present:
        log = work / "mutmut-run.log"
        with log.open("w") as out:
            code = subprocess.call([*mutmut, "run", "--max-children", "1"], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        if code != 0 or not (work / "mutants" / (target + ".meta")).exists():
            print(log.read_text()[-4000:])
            return {"module": name, "file": target, "error": f"mutmut exited {code}; log: {log}"}
        counts, not_killed = _counts(work, target)
    else:
        counts, not_killed = dict.fromkeys(STATUSES, 0), []
    seconds = (datetime.datetime.now() - started).total_seconds()
    for line in not_killed:
        print("   ", line)
        if diffs:
            show = subprocess.run([*mutmut, "show", line.split(":")[0]], cwd=work, env=env, capture_output=True, text=True)
            print("\n".join("      " + s for s in show.stdout.splitlines()[1:]))
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    print(f"   {name}: {shown or 'no mutants'} ({seconds:.0f} s)", flush=True)
    return {"module": name, "file": target, "tests": present, "seconds": round(seconds), **counts, "not_killed": not_killed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--diffs", action="store_true", help="print the diff of every surviving mutant")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; valid: {', '.join(MODULES)}")
    date = datetime.date.today().isoformat()
    # the summary keeps the last result of every module, so runs of a few modules add up
    summary_json = WORK / "summary.json"
    last = json.loads(summary_json.read_text()) if summary_json.exists() else {}
    for name in args.modules or MODULES:
        last[name] = {"date": date, **run_module(name, args.diffs)}
    rows = [last[name] for name in MODULES if name in last]
    table = ["mutmut summary (killed / survived / no tests / timeout per module; date of each module's run)", ""]
    table += ["| module | killed | survived | no tests | timeout | other | date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row:
            table.append(f"| {row['module']} | error: {row['error']} | | | | | {row['date']} |")
            continue
        other = sum(row[s] for s in ("suspicious", "segfault", "skipped", "not checked"))
        table.append(f"| {row['module']} | {row['killed']} | {row['survived']} | {row['no tests']} | {row['timeout']} | {other} | {row['date']} |")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.md").write_text("\n".join(table) + "\n")
    summary_json.write_text(json.dumps(last, indent=1))
    print("\n".join(table))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
