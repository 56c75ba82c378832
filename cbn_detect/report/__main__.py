"""``python -m cbn_detect.report``: see :mod:`cbn_detect.report.cli`."""

from cbn_detect.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
