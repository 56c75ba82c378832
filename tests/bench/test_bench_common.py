"""The helpers every benchmark row shares: the interleaved runner's order and medians, and the
``--tiny`` preset yielding to explicit options."""

from __future__ import annotations

import argparse

import torch

from cbn_detect.bench.common import device_name, interleaved_medians, parse_with_tiny, timed_ms


def test_runner_rotates_the_order_and_keeps_medians_after_warmup():
    calls: list[tuple[str, int]] = []

    def measure(variant: str, round_: int) -> float:
        calls.append((variant, round_))
        return 100.0 if round_ == 0 else {"a": 1.0, "b": 2.0, "c": 3.0}[variant] * round_

    assert interleaved_medians(["a", "b", "c"], 1, 3, measure) == [2.0, 4.0, 6.0]
    assert [v for v, _ in calls] == list("abcbcacababc")
    assert [r for _, r in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


def test_tiny_preset_changes_defaults_only():
    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--size", type=int, default=512)
        p.add_argument("--iters", type=int, default=20)
        return p

    preset = dict(size=64, iters=3)
    assert vars(parse_with_tiny(parser(), [], preset)) == dict(size=512, iters=20, tiny=False)
    assert vars(parse_with_tiny(parser(), ["--tiny", "--size", "32"], preset)) == dict(size=32, iters=3, tiny=True)


def test_timer_and_device_name_on_cpu():
    assert timed_ms(lambda: None, torch.device("cpu")) >= 0
    assert device_name(torch.device("cpu")) == "cpu"
