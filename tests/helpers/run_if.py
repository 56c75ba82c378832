"""What a test needs of the machine, said in one decorator, in the manner of lightning-hydra-template's
``RunIf``::

    @RunIf(cuda=True)
    def test_on_the_gpu(): ...

Without it the test is skipped and the skip summary (``pytest -ra``, the default here) gives the
reason, e.g. "needs a CUDA device". The requirement is also a marker (``cuda``, registered in
pyproject.toml), so ``pytest -m cuda`` runs exactly those tests on a GPU machine. ``RunIf(...).marks``
goes where a decorator cannot, such as ``pytest.param(..., marks=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

Test = TypeVar("Test", bound=Callable[..., object])


class RunIf:
    def __init__(self, *, cuda: bool = False) -> None:
        self.marks: list[pytest.MarkDecorator] = []
        if cuda:
            self.marks += [
                pytest.mark.cuda,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ]

    def __call__(self, test: Test) -> Test:
        for mark in self.marks:
            test = mark(test)
        return test
