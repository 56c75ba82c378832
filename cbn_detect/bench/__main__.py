"""``python -m cbn_detect.bench <row> [options]``: run one benchmark row and exit with its code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from cbn_detect.bench import data, infer, norm, train
from cbn_detect.bench import eval as eval_row

ROWS: dict[str, Callable[[list[str]], int]] = {
    "norm": norm.run,
    "eval": eval_row.run,
    "train": train.run,
    "infer": infer.run,
    "data": data.run,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ROWS:
        print(f"usage: python -m cbn_detect.bench {{{','.join(ROWS)}}} [options]", file=sys.stderr)
        return 2
    return ROWS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
