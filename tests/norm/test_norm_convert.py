"""convert_norm / build_norm on the model shapes the detector uses, and the conf/norm group."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from cbn_detect.norm import (
    NORM_NAMES,
    CrossIterationBatchNorm2d,
    build_norm,
    convert_norm,
    norm_diagnostics,
    norm_options,
    resolve_burnin,
)
from cbn_detect.norm.registry import gn_groups, norm_defaults

CONF = Path(__file__).resolve().parents[2] / "conf" / "norm"
BN_LIKE = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


class ToyHead(nn.Module):
    """RetinaNet-style head: convs shared across levels, one norm per (conv, level)."""

    def __init__(self, channels: int = 8, levels: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(depth))
        self.norms = nn.ModuleList(nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(levels)) for _ in range(depth))

    def norm_producers(self) -> dict[str, nn.Conv2d]:
        return {f"norms.{i}.{level}": conv for i, conv in enumerate(self.conv) for level in range(len(self.norms[i]))}

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for level, f in enumerate(features):
            for conv, norms in zip(self.conv, self.norms):
                f = torch.relu(norms[level](conv(f)))
            outs.append(f)
        return outs


class ToyBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        a = torch.relu(self.bn1(self.conv1(x)))
        return OrderedDict(p1=a, p2=self.down(a))


class ToyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = ToyBody()
        self.fpn = FeaturePyramidNetwork([8, 8], 8, norm_layer=nn.BatchNorm2d)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fpn(self.body(x)).values())


class ToyDetector(nn.Module):
    """Module paths as in the detector: backbone.body.*, backbone.fpn.*, head.*."""

    norm_regions = {"backbone.fpn": "fpn", "backbone": "backbone", "head": "head"}

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ToyBackbone()
        self.head = ToyHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(o.square().mean() for o in self.head(self.backbone(x)))


def train(model: nn.Module, steps: int, shape=(2, 3, 16, 16)) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(shape, generator=g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def norm_layers(model: nn.Module, kind) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def cbn_resnet(arch: str) -> tuple[nn.Module, dict[str, CrossIterationBatchNorm2d]]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    n_bn = len(norm_layers(model, nn.BatchNorm2d))
    model = convert_norm(model, "cbn", burnin=0, window=2)
    cbns = norm_layers(model, CrossIterationBatchNorm2d)
    assert len(cbns) == n_bn and not norm_layers(model, nn.BatchNorm2d).keys() - cbns.keys()
    return model, cbns


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_cbn_is_wired_to_the_right_convs(arch):
    model, cbns = cbn_resnet(arch)
    block = model.layer2[0]
    assert model.bn1._link.conv is model.conv1
    assert block.bn2._link.conv is block.conv2
    assert block.downsample[1]._link.conv is block.downsample[0]
    for cbn in cbns.values():
        cbn.burnin = 1  # plain BN this once: a full CBN step of ResNet-50 is slow on 2 CPUs...
    model(torch.randn(2, 3, 32, 32))  # ...but every CBN still checks it got its own conv's output
    assert all(cbn.num_steps == 1 for cbn in cbns.values())


def test_torchvision_resnet18_trains_with_a_full_cbn_window():
    model, cbns = cbn_resnet("resnet18")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    diag = norm_diagnostics(model)
    for name in cbns:  # window 2: one stored entry, dropped in some channels when var < 0
        assert diag[f"norm/{name}/effective_window"] + diag[f"norm/{name}/dropped"] == pytest.approx(2)


def test_fpn_with_batchnorm_converts_and_trains():
    fpn = FeaturePyramidNetwork([4, 8], 8, norm_layer=nn.BatchNorm2d)
    fpn = convert_norm(fpn, "cbn", burnin=0, window=2)
    cbns = norm_layers(fpn, CrossIterationBatchNorm2d)
    assert len(cbns) == 4 and not norm_layers(fpn, nn.BatchNorm2d).keys() - cbns.keys()
    assert all(isinstance(m._link.conv, nn.Conv2d) for m in cbns.values())
    opt = torch.optim.SGD(fpn.parameters(), lr=0.05)
    for _ in range(3):
        feats = OrderedDict(a=torch.randn(2, 4, 8, 8), b=torch.randn(2, 8, 4, 4))
        loss = sum(v.square().mean() for v in fpn(feats).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)


def test_shared_conv_gets_per_level_norms_compensated_with_their_own_inputs():
    torch.manual_seed(0)
    head = convert_norm(ToyHead(levels=2, depth=1), "cbn", burnin=0, window=3)
    conv, norms = head.conv[0], head.norms[0]
    g = torch.Generator().manual_seed(0)
    inputs = [
        [torch.randn(2, 8, 6 - 2 * lvl, 6 - 2 * lvl, generator=g) * (lvl + 1) for lvl in range(2)] for _ in range(4)
    ]
    opt = torch.optim.SGD(head.parameters(), lr=0.3)
    for t, feats in enumerate(inputs):
        sum(o.square().mean() for o in head(feats)).backward()
        if t < len(inputs) - 1:
            opt.step()
            opt.zero_grad()
    # After steps 0..3 with 2 slots: slot 0 holds step 2, slot 1 holds step 1 (step 3 is current).
    with torch.no_grad():
        for level in range(2):
            for slot, step in ((0, 2), (1, 1)):
                exact = conv(inputs[step][level]).mean((0, 2, 3))
                got = norms[level].last_window.comp_mean[slot]
                torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-4)
    assert not torch.equal(norms[0].last_window.comp_mean, norms[1].last_window.comp_mean)


def test_where_restricts_the_norm_and_strips_the_rest_to_biased_convs():
    model = convert_norm(ToyDetector(), "gn", where=["backbone"])
    assert isinstance(model.backbone.body.bn1, nn.GroupNorm)
    assert isinstance(model.backbone.body.down[1], nn.GroupNorm)
    assert not norm_layers(model.backbone.fpn, (nn.GroupNorm, *BN_LIKE))
    assert not norm_layers(model.head, (nn.GroupNorm, *BN_LIKE))
    assert all(c.bias is not None for c in model.head.conv)
    assert all(c.bias is not None for c in model.backbone.fpn.modules() if isinstance(c, nn.Conv2d))
    assert model.backbone.body.conv1.bias is None
    assert all(torch.isfinite(torch.tensor(train(model, 2))))


def test_where_on_a_model_that_is_not_a_detector_is_an_error():
    with pytest.raises(ValueError, match="where=None"):
        convert_norm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "bn", where=["head"])
    with pytest.raises(ValueError, match="backbone"):
        convert_norm(ToyDetector(), "bn", where=["neck"])


def test_none_removes_norms_and_adds_zero_bias_once_per_conv():
    model = convert_norm(ToyDetector(), "none")
    assert not norm_layers(model, BN_LIKE)
    convs = [c for c in model.modules() if isinstance(c, nn.Conv2d)]
    assert all(torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert sum(1 for n, _ in model.head.named_parameters() if n.endswith("bias")) == len(model.head.conv)


@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_norm_trains_a_small_detector_like_model(name):
    torch.manual_seed(0)
    cfg = {"burnin": 1} if name.startswith("cbn") else {}
    model = convert_norm(ToyDetector(), name, **cfg)
    before = [p.detach().clone() for p in model.parameters()]
    losses = train(model, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 16, 16)))


def test_bn_conversion_applies_options_and_keeps_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(2.0)
    model = convert_norm(model, "bn", eps=1e-3, momentum=0.3)
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.3)
    assert torch.equal(model[1].running_mean, torch.full((4,), 2.0))


def test_unknown_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="cbn_naive"):
        build_norm("layernorm", 8)
    with pytest.raises(ValueError, match="window"):
        build_norm("cbn", 8, windw=3)
    with pytest.raises(ValueError, match="valid options"):
        convert_norm(ToyDetector(), "bn", window=4)


@pytest.mark.parametrize("channels,groups", [(256, 32), (48, 24), (10, 10), (7, 7), (96, 32)])
def test_gn_groups_is_the_largest_divisor_up_to_32(channels, groups):
    assert gn_groups(channels) == groups
    assert build_norm("gn", channels).num_groups == groups


def test_config_group_has_one_valid_file_per_norm():
    stems = {p.stem for p in CONF.glob("*.yaml")}
    assert stems == set(NORM_NAMES)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF.parent)):
        files = {
            stem: OmegaConf.to_container(compose("config", overrides=[f"norm={stem}"]).norm, resolve=True)
            for stem in stems
        }
    for stem, cfg in files.items():
        assert cfg.pop("name") == stem
        assert cfg.pop("where") == ["backbone", "fpn", "head"]
        assert set(cfg) == set(norm_options(stem)), stem
        # the yaml repeats the registry's defaults for the command line (CBN's burn-in included:
        # a fraction of the run, registry.BURNIN_FRACTION)
        differ = {k for k, v in norm_defaults(stem).items() if cfg[k] != v}
        assert differ == set(), stem
        if "burnin" in cfg:
            cfg["burnin"] = resolve_burnin(cfg["burnin"], total_steps=300)
            assert cfg["burnin"] == 200  # int(0.6667 x 300): the CBN authors' 8 of 12 epochs
        build_norm(stem, 16, **cfg)
    assert files["cbn"]["window"] == 4 and files["cbn"]["rho"] == 1.0


@pytest.mark.parametrize("name", ["cbn", "none"])
def test_composed_norm_config_drives_convert_norm_as_the_trainer_calls_it(name):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF.parent)):
        cfg = compose("config", overrides=[f"norm={name}"]).norm
    options = {k: v for k, v in cfg.items() if k != "name"}  # where arrives as a ListConfig
    model = convert_norm(ToyDetector(), cfg.name, **options)
    assert isinstance(model.head.norms[0][1], CrossIterationBatchNorm2d if name == "cbn" else nn.Identity)


class ReorderedHead(ToyHead):
    """Runs the shared conv on every level before any norm: the stored input is the wrong level's."""

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        convolved = [self.conv[0](f) for f in features]
        return [norms(y) for norms, y in zip(self.norms[0], convolved)]


def test_cbn_applied_to_something_else_than_its_convs_latest_output_is_an_error():
    head = convert_norm(ReorderedHead(levels=2, depth=1), "cbn", burnin=0)
    with pytest.raises(RuntimeError, match="'norms.0.0'"):
        head([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)])


def test_frozen_batchnorm_layers_are_converted_too():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), FrozenBatchNorm2d(4))
    model[1].running_var.fill_(4.0)
    model = convert_norm(model, "cbn", burnin=0)
    assert isinstance(model[1], CrossIterationBatchNorm2d)
    assert torch.equal(model[1].running_var, torch.full((4,), 4.0))
    assert torch.isfinite(model(torch.randn(2, 3, 4, 4))).all()
