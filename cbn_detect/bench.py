"""Benchmarks that print ratios measured side by side in one run: ``python -m cbn_detect.bench <what>``.

Each subcommand lives beside the code it measures; this module only dispatches.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "norm": "cbn_detect.norm.bench",
    "eval": "cbn_detect.evaluation.bench",
    "train": "cbn_detect.engine.bench",
    "infer": "cbn_detect.evaluation.bench_infer",
    "data": "cbn_detect.data.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m cbn_detect.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).run(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
