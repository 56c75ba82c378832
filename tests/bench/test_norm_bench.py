"""The norm benchmark's table: one row per norm with a ratio to BN (timings are never checked)."""

from __future__ import annotations

from cbn_detect.bench.norm import parse_spec, run


def test_bench_prints_one_row_per_norm_with_ratio_to_bn(capsys):
    norms = ["none", "cbn:window=2,fused=off"]
    assert run(["--tiny", "--size", "32", "--iters", "1", "--warmup", "1", "--norms", " ".join(norms)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# resnet18 trunk, batch 2 x 32px, fp32")
    assert lines[1].split() == ["norm", "step_ms", "ratio_to_bn", "history_MiB"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["bn", *norms]
    assert all(float(ms) > 0 and float(ratio) > 0 for _, ms, ratio, _ in rows)
    assert rows[0][2] == "1.00"
    history = {r[0]: float(r[3]) for r in rows}
    assert history["bn"] == history["none"] == 0.0
    assert history["cbn:window=2,fused=off"] > 0.0


def test_norm_specs_parse_typed_options():
    assert parse_spec("cbn:fused=off,window=2,rho=0.5") == ("cbn", {"fused": "off", "window": 2, "rho": 0.5})
    assert parse_spec("bn") == ("bn", {})
