"""Benchmarks that print ratios measured side by side in one run: ``python -m cbn_detect.bench <row>``.

One module per row of the benchmark table (docs/benchmarks.md) (``norm``, ``train``, ``infer``, ``eval``,
``data``), each with a ``run(argv) -> exit code``; ``common`` holds what the rows share (the
interleaved runner, the synchronised timer, the ``--tiny`` preset). Nothing else in the package
imports this one: a benchmark measures the code, the code never needs a benchmark.
"""
