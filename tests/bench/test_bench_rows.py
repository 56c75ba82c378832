"""The train, infer and data benchmark rows, run tiny on CPU: each table's shape, and the fast
inference path's detections against torchvision's (never timings, which depend on the machine)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cbn_detect.bench import data as data_bench
from cbn_detect.bench import infer as infer_bench
from cbn_detect.bench import train as train_bench

pytestmark = pytest.mark.usefixtures("single_thread")


def table(out: str, columns: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header comment lines, data rows split into fields, footnote lines) of a printed table,
    checking the column line and that every number in a row parses as a positive float."""
    lines = out.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert lines[at].split() == columns
    rows = [line.split() for line in lines[at + 1 :] if not line.startswith("#")]
    assert all(len(r) == len(columns) and all(float(x) > 0 for x in r[1:]) for r in rows)
    return lines[:at], rows, [line for line in lines[at + 1 :] if line.startswith("#")]


def test_train_row_compares_ours_with_torchvision(capsys):
    assert train_bench.run(["--tiny", "--iters", "1", "--warmup", "1", "--size", "64"]) == 0
    header, rows, notes = table(
        capsys.readouterr().out, ["model", "params_M", "step_ms", "images_per_s", "ratio_to_torchvision"]
    )
    assert header[0].startswith("# train: RetinaNet resnet10w16-FPN64 from scratch, batch 2 x 64px, fp32")
    assert [r[0] for r in rows] == ["torchvision", "ours", "ours_tv_norms"]
    assert rows[0][4] == "1.00"
    assert rows[2][1] == rows[0][1]  # torchvision's network: the same parameters
    assert notes == [train_bench.CAVEAT]


def test_train_row_runs_at_the_thread_count_asked_and_restores_it(capsys):
    threads = torch.get_num_threads()
    assert train_bench.run(["--tiny", "--iters", "1", "--warmup", "0", "--threads", "2"]) == 0
    assert ", 2 CPU threads," in capsys.readouterr().out.splitlines()[0]
    assert torch.get_num_threads() == threads


def test_tiny_torchvision_model_differs_from_ours_only_outside_the_trunk():
    ours = train_bench.ours_retinanet(train_bench.TINY_ARCH, 64)
    theirs = train_bench.torchvision_retinanet(train_bench.TINY_ARCH, 64)
    trunk = {k: v.shape for k, v in ours.backbone.body.state_dict().items()}
    assert trunk == {k: v.shape for k, v in theirs.backbone.body.state_dict().items()}

    def norms(model: nn.Module, prefix: str) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for n, m in model.named_modules() if n.startswith(prefix))

    assert norms(theirs, "backbone.fpn") == norms(theirs, "head") == 0
    assert norms(ours, "backbone.fpn") > 0 and norms(ours, "head") > 0


@pytest.mark.parametrize("arch", [train_bench.TINY_ARCH, train_bench.R50], ids=lambda a: a.name)
def test_ours_with_torchvisions_norms_has_torchvisions_parameters(arch):
    """The ours_tv_norms row: norms in the trunk only, conv biases where ours has norms."""
    ours = train_bench.ours_retinanet(arch, 64, where=("backbone",))
    theirs = train_bench.torchvision_retinanet(arch, 64)

    def shapes(model: nn.Module, prefix: str = "") -> list[tuple[int, ...]]:
        return sorted(tuple(p.shape) for n, p in model.named_parameters() if n.startswith(prefix))

    assert shapes(ours) == shapes(theirs)
    for part in ("backbone.fpn", "head"):
        assert shapes(ours, part) == shapes(theirs, part)
        assert not any(isinstance(m, nn.BatchNorm2d) for n, m in ours.named_modules() if n.startswith(part))


def test_infer_row_times_both_paths_and_checks_detections(capsys):
    assert infer_bench.run(["--tiny", "--images", "2", "--channels-last"]) == 0
    header, rows, notes = table(capsys.readouterr().out, ["path", "ms_per_image", "fps", "ratio_to_torchvision"])
    assert header[0].startswith("# infer: torchvision RetinaNet resnet10w16-FPN64")
    assert [r[0] for r in rows] == ["torchvision", "fast"]
    assert rows[0][3] == "1.00"
    assert "channels_last" in notes[0]
    matched, total = notes[1].split("found ")[1].split()[0].split("/")
    assert matched == total and int(total) > 0


def randomise_norm_statistics(model: nn.Module) -> None:
    """Untrained BN holds (mean 0, var 1, weight 1, bias 0), which folds into nearly nothing;
    random statistics make a wrong fold visible."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            module.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(c, generator=gen))


def test_fast_path_finds_the_same_detections_in_fp32():
    torch.manual_seed(0)
    model = train_bench.torchvision_retinanet(train_bench.TINY_ARCH, 64).eval()
    randomise_norm_statistics(model)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    infer_bench.spread_scores(model, images[0])
    fast = infer_bench.fast_path(model, torch.device("cpu"), "fp32", channels_last=True, compile_mode=None)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.backbone.modules())
    matched, total = infer_bench.check(model, fast, images, atol=0.01)
    assert total == 2 * model.detections_per_img
    assert matched == total


def test_a_wrong_fold_is_caught_by_the_detection_check():
    torch.manual_seed(0)
    model = train_bench.torchvision_retinanet(train_bench.TINY_ARCH, 64).eval()
    randomise_norm_statistics(model)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    infer_bench.spread_scores(model, image)
    broken = copy.deepcopy(model)
    broken.backbone.body.layer2[0].bn1.running_var.mul_(4.0)  # as if folded with the wrong variance
    fast = infer_bench.fast_path(broken, torch.device("cpu"), "fp32", channels_last=False, compile_mode=None)
    matched, total = infer_bench.check(model, fast, [image], atol=0.01)
    assert matched < total


def test_fast_path_folds_our_per_level_head_norms_too():
    """Our head shares each conv across levels with a norm per level: the fast path unshares the
    conv, one folded copy per level, so no norm is left anywhere."""
    model = train_bench.ours_retinanet(train_bench.TINY_ARCH, 64).eval()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.head.modules()) > 0
    fast = infer_bench.fast_path(model, torch.device("cpu"), "fp32", channels_last=False, compile_mode=None)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the original is untouched


def test_data_row_reports_each_worker_count(capsys):
    assert data_bench.run(["--tiny", "--workers", "0", "1"]) == 0
    header, rows, notes = table(capsys.readouterr().out, ["workers", "images_per_s", "per_worker", "ratio_to_target"])
    assert header[0].startswith("# data: train_loader over synthetic 64px (16 images), batch 4")
    assert [r[0] for r in rows] == ["0", "1"]
    assert rows[0][1] == rows[0][2]  # at 0 workers the main process is the one worker
    assert notes[0].startswith("# the train row needs 167 images/s; 8 workers at the ")


@pytest.mark.parametrize(("target", "verdict"), [(700.0, "NOT enough"), (500.0, "enough")])
def test_data_verdict_projects_the_most_loaded_per_worker_rate(target, verdict):
    args = data_bench.parse_args(["--target", str(target)])
    rows = [(0, 100.0, 100.0, 100.0 / target), (2, 150.0, 75.0, 150.0 / target)]
    note = data_bench.format_table(rows, "test data", args).splitlines()[-1]
    assert note.endswith(f"75.0 images/s each measured with 2 would give 600: {verdict}")
