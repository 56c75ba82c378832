"""The evaluation's fast path (``cbn_detect.models.fold``): norms folded into their convs, anchors
cached, inference mode. Detection by detection it finds what the model itself finds, on the tiny
RetinaNet and SSD with BN and CBN after a few training steps and with hand-set running statistics
(untrained BN folds into nearly nothing), and it never changes the model it copies."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from cbn_detect.bench.infer import spread_scores
from cbn_detect.engine.build import build_model
from cbn_detect.models.fold import (
    CachedAnchors,
    FoldedPerLevelTower,
    InferenceModel,
    count_norms,
    fold_norms,
    foldable,
    inference_copy,
)
from cbn_detect.norm import NORM_NAMES, build_norm, use_native_sync_batchnorm
from tests.conftest import CONF_DIR, TINY_RUN

# What the fold may change. Measured on these models at 64 px (fp32, CPU): boxes moved by at most
# 4.4e-4 px, scores by at most 8e-6 (the SSD's head outputs reach a few hundred, and the fold
# changes them in the 7th digit). The tolerances leave a margin of more than 10.
BOX_ATOL_PX = 0.01
SCORE_ATOL = 1e-4
SIZE = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(model: str, norm: str) -> nn.Module:
    """The model as ``train.py`` builds it (CBN wired to its convs, burn-in of one step)."""
    overrides = [o for o in TINY_RUN if not o.startswith("model.")]
    overrides += [f"model={model}", f"norm={norm}", "cbn_burnin=1", "model.score_thresh=0.001"]
    if model == "retinanet_tiny":
        overrides += [f"model.min_size={SIZE}", f"model.max_size={SIZE}"]
    else:
        overrides += [f"model.size={SIZE}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(0)
    return build_model(cfg, 20, torch.device("cpu"), total_steps=10)


def images(count: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=gen) for _ in range(count)]


TARGET = {"boxes": torch.tensor([[5.0, 6.0, 40.0, 52.0], [30.0, 10.0, 60.0, 30.0]]), "labels": torch.tensor([3, 7])}


def train_steps(model: nn.Module, steps: int) -> None:
    """A few SGD steps: CBN leaves its burn-in and fills its window; statistics move."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps):
        loss = sum(model(images(2, seed=100 + step), [TARGET, TARGET]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def randomise_statistics(model: nn.Module, seed: int = 1) -> None:
    """Hand-set running statistics and affine parameters far from (0, 1, 1, 0)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.3 + 2 * torch.rand(c, generator=gen))
            module.weight.copy_(0.5 + torch.rand(c, generator=gen))
            module.bias.copy_(0.2 * torch.randn(c, generator=gen))


@torch.no_grad()
def realistic_statistics(model: nn.Module, batch: list[Tensor], seed: int = 1) -> None:
    """Affine parameters set by hand (weights in [0.5, 1.5], biases ~0.2), then running statistics
    of the network's own activations on ``batch`` (one training-mode pass at momentum 1): far from
    BN's initial (0, 1, 1, 0) and different per channel, so the fold is far from trivial, while
    the activations on ``batch`` stay of order 1 all the way through (random statistics, or those
    of other images on SSD's 1-pixel maps, blow them up layer after layer)."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
        m.momentum = 1.0
    model.train()
    model(batch, [TARGET] * len(batch))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    assert max(float(m.running_var.max()) for m in norms) > 2 and min(float(m.running_var.min()) for m in norms) < 0.5


def same(a: object, b: object) -> bool:
    """Equal state: tensors bit for bit, and CBN's extra state (dicts, lists, numbers) alike."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def detections_agree(reference: list[dict[str, Tensor]], fast: list[dict[str, Tensor]]) -> tuple[float, float]:
    """(largest box difference in px, largest score difference) between each detection and its
    counterpart: as many detections per image, and each one of either side has a counterpart of
    the same class on the other within the tolerances (matched by position, not by rank, since
    rounding may swap two near-equal scores)."""
    box = score = 0.0
    for ref, got in zip(reference, fast, strict=True):
        assert len(ref["boxes"]) == len(got["boxes"]) > 0
        same_class = ref["labels"][:, None] == got["labels"][None, :]
        box_gap = (ref["boxes"][:, None, :] - got["boxes"][None, :, :]).abs().amax(dim=-1)
        score_gap = (ref["scores"][:, None] - got["scores"][None, :]).abs()
        close = same_class & (box_gap <= BOX_ATOL_PX) & (score_gap <= SCORE_ATOL)
        assert close.any(dim=1).all() and close.any(dim=0).all()
        gap = torch.where(close, box_gap, torch.inf).amin(dim=1)
        box = max(box, float(gap.max()))
        score = max(score, float(torch.where(close, score_gap, torch.inf).amin(dim=1).max()))
    return box, score


@pytest.mark.parametrize("norm", ["bn", "cbn"])
@pytest.mark.parametrize("model_name", ["retinanet_tiny", "ssd_tiny"])
def test_folded_copy_finds_the_models_detections(model_name: str, norm: str) -> None:
    model = tiny_model(model_name, norm)
    train_steps(model, 4)
    if norm == "cbn":  # past the burn-in, with a filled window
        assert all(m._count > 0 for m in model.modules() if hasattr(m, "_count"))
    batch = images(3, seed=3)
    realistic_statistics(model, batch)
    if model_name == "retinanet_tiny":  # untrained scores all sit at the prior: spread them
        spread_scores(model, batch[0])
    model.train()
    before = copy.deepcopy(model.state_dict())
    fast = inference_copy(model)
    assert model.training and same(model.state_dict(), before)
    assert count_norms(model) > 0 and count_norms(fast) == 0
    assert not fast.training and isinstance(fast, InferenceModel)

    model.eval()
    with torch.no_grad():
        expected = model(batch)
    found = fast(batch)
    assert found[0]["boxes"].is_inference()
    box, score = detections_agree(expected, found)
    print(f"fold error {model_name} {norm}: box {box:.3g} px, score {score:.3g}")
    # Batch 1 as the FPS measurement runs it, twice (the second call takes the cached anchors).
    for _ in range(2):
        detections_agree(expected[:1], fast(batch[:1]))


def test_the_head_towers_are_unshared_per_level_and_folded() -> None:
    model = tiny_model("retinanet_tiny", "bn").eval()
    randomise_statistics(model)
    fast = inference_copy(model).model
    tower = fast.head.classification_head.conv
    assert isinstance(tower, FoldedPerLevelTower)
    levels = len(model.head.classification_head.conv.norms[0])
    assert [len(convs) for convs in tower.convs] == [levels] * len(model.head.classification_head.conv.conv)
    features = [torch.randn(1, 48, 8, 8) for _ in range(levels)]
    with torch.no_grad():
        for level, x in enumerate(features):
            torch.testing.assert_close(
                tower(x, level), model.head.classification_head.conv(x, level), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_norm_in_eval_mode_folds_or_stays(name: str) -> None:
    """The caller's guarantee of the fold, checked for each norm of the study: a foldable layer in
    eval mode is its running-statistics affine map (so folding it changes nothing); GroupNorm and
    no norm stay as they are."""
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    norm = build_norm(name, 8)
    block = nn.Sequential(conv, norm, nn.ReLU())
    randomise_statistics(block, seed=2)
    if isinstance(norm, FrozenBatchNorm2d):
        norm.running_mean.normal_(0, 0.3)
        norm.running_var.uniform_(0.3, 2.3)
        norm.weight.uniform_(0.5, 1.5)
    block.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = block(x)
    folded = fold_norms(block)
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    should_fold = name not in ("gn", "none")
    assert folded == int(should_fold)
    assert (block[1] is norm) != should_fold


def test_torchs_sync_batchnorm_folds_too() -> None:
    """On CUDA the composition root swaps our SyncBN for ``nn.SyncBatchNorm`` (no BatchNorm2d)."""
    block = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), build_norm("syncbn", 8))
    randomise_statistics(block)
    block = use_native_sync_batchnorm(block).eval()
    assert isinstance(block[1], nn.SyncBatchNorm)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = block(x)
    assert fold_norms(block) == 1
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_training_mode_norms_are_not_folded() -> None:
    conv, norm = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
    assert not foldable(conv, norm)
    assert foldable(conv.eval(), norm.eval())
    assert not foldable(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    assert not foldable(conv, nn.GroupNorm(2, 4).eval())


def test_the_copy_never_runs_the_originals_compiled_forward() -> None:
    """``Module.compile`` keeps a compiled bound method of the original; a deep copy would share it."""
    model = tiny_model("ssd_tiny", "bn").eval()

    def refuse(*args, **kwargs):
        raise AssertionError("the copy called the original's compiled forward")

    model.backbone._compiled_call_impl = refuse
    fast = inference_copy(model)
    fast(images(1, seed=0))


def test_cached_anchors_equal_fresh_ones_and_the_cache_is_bounded() -> None:
    model = tiny_model("retinanet_tiny", "bn").eval()
    cached = CachedAnchors(model.anchor_generator, size=2)
    for side in (64, 96, 64, 128, 96):
        image_list, _ = model.transform([torch.rand(3, side, side)])
        image_list.tensors = torch.zeros(1, 3, side, side)
        features = [torch.zeros(1, 1, side // s, side // s) for s in (8, 16, 32)]
        fresh = model.anchor_generator(image_list, features)
        got = cached(image_list, features)
        assert all(torch.equal(a, b) for a, b in zip(fresh, got, strict=True))
        assert len(cached._cache) <= 2
