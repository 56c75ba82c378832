"""``python -m cbn_detect.bench <row> [options]``: run one benchmark row and exit with its code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cbn_detect.bench import data, gpu, infer, norm, profile, train
from cbn_detect.bench import eval as eval_row

ROWS: dict[str, Callable[[list[str]], int]] = {
    "norm": norm.run,
    "eval": eval_row.run,
    "train": train.run,
    "infer": infer.run,
    "data": data.run,
    "gpu": gpu.run,
    "profile": profile.run,
}


USAGE = f"usage: python -m cbn_detect.bench {{{','.join(ROWS)}}} [options]"


def describe() -> str:
    """What the command does and one line per row (the first line of each row's docstring)."""
    lines = [
        USAGE,
        "",
        "Run one benchmark row and print its table; most rows time our code against a reference side",
        "by side in one process. `python -m cbn_detect.bench <row> --help` lists a row's options",
        "(every row has a --tiny CPU preset).",
        "",
    ]
    for name, row in ROWS.items():
        summary = (sys.modules[row.__module__].__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1]
        lines.append(f"  {name:<7} {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(describe())
        return 0
    if not argv or argv[0] not in ROWS:
        print(USAGE, file=sys.stderr)
        return 2
    return ROWS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
