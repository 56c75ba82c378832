"""Compare the runs of a sweep: ``python -m cbn_detect.report [<sweep_dir>]``.

Reads every job's ``results.json`` (and notices job directories without one), prints a table of
model x norm x batch (images per process) with n and mean +- std over seeds, then each norm's
paired difference to BN in VOC07 mAP with a 95% t-interval over seeds, and writes both into
``report.md`` (and every job into ``results.csv``) in the sweep directory, with the study's figures
and a picture of each norm's detections per model and batch. Failed, diverged, skipped, unfinished
and running jobs are listed as such, never dropped.

One module per job, each importing only those above it:

- :mod:`~cbn_detect.report.collect`: the sweep's jobs as typed rows (:class:`JobResult`), read
  through :mod:`cbn_detect.results`, and each job's loss curve and schedule;
- :mod:`~cbn_detect.report.tables`: the summary, the paired differences, ``results.csv``, ``report.md``
  (the statistics themselves live in :mod:`cbn_detect.stats`);
- :mod:`~cbn_detect.report.figures`: mAP against batch, loss curves, loss variance;
- :mod:`~cbn_detect.report.pictures`: the detection grids;
- :mod:`~cbn_detect.report.cli`: the command line, which writes them all.
"""

from cbn_detect.report.cli import main
from cbn_detect.report.collect import JobResult, collect_runs

__all__ = ["JobResult", "collect_runs", "main"]
