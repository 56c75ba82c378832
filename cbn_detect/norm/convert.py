"""Swap every BatchNorm-like layer of a built model for the configured norm, and wire CBN."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cbn_detect.norm.cbn import CrossIterationBatchNorm2d
from cbn_detect.norm.producer import ProducerLink, enable_bias
from cbn_detect.norm.registry import build_norm
from cbn_detect.runtime.errors import ConfigError

log = logging.getLogger(__name__)

REGIONS = ("backbone", "fpn", "head")
_BN_LIKE = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)
_INHERITED = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def match_prefix(path: str, table: Mapping[str, str]) -> str | None:
    """The value of the longest key of ``table`` that is ``path`` or a module-path ancestor of it
    (None if none is): how a detector's ``norm_regions`` and ``parameter_groups`` are read."""
    matches = [prefix for prefix in table if path == prefix or path.startswith(prefix + ".")]
    return table[max(matches, key=len)] if matches else None


def convert_norm(module: nn.Module, name: str, where: Iterable[str] | None = None, **cfg: Any) -> nn.Module:
    """Replace every BatchNorm-like layer by ``build_norm(name, C, **cfg)``; return the module.

    ``where`` (a subset of backbone/fpn/head) restricts the norm to those parts of a detector, as
    its class declares them (``norm_regions``: module-path prefix -> region); layers elsewhere get
    no norm at all (``none``). ``where=None`` converts every layer, for models that are not
    detectors. Each replacement inherits the old layer's affine parameters and
    running statistics where it has them. ``frozenbn`` is by intent the one norm with nothing to
    train: torchvision's ``FrozenBatchNorm2d`` keeps scale, shift and statistics as buffers, so a
    converted layer is the fixed per-channel affine map of the old layer's values (for a model
    built from scratch the identity, up to ``1 / sqrt(1 + eps)``) and its conv stays bias-free -
    the study's "no adaptive normalization" baseline; ``none`` is the variant whose conv gets a
    trainable bias instead. The producing conv of a norm - needed by CBN and by
    ``none`` - is found, in order, from an ancestor's ``norm_producers()`` map, the preceding child
    in an ``nn.Sequential``, or a sibling ``conv<k>`` of a ``bn<k>``; not finding it is an error.
    """
    wanted = _check_where(where)
    regions = getattr(module, "norm_regions", None)
    if wanted is not None and not regions:
        raise ValueError(
            f"{type(module).__name__} declares no norm_regions (module-path prefix -> one of {REGIONS}); "
            "pass where=None to convert every layer of a model that is not a detector"
        )
    build_norm(name, 1, **cfg)  # fail on bad options before touching the model
    if isinstance(module, _BN_LIKE):
        raise ValueError("convert_norm needs a model containing norm layers, not a bare norm layer")
    explicit = _explicit_producers(module)
    links: dict[int, ProducerLink] = {}
    targets = [
        (f"{parent_path}.{child_name}" if parent_path else child_name, parent, child_name, child)
        for parent_path, parent in module.named_modules()
        for child_name, child in parent.named_children()
        if isinstance(child, _BN_LIKE)
    ]
    for path, parent, child_name, old in targets:
        chosen = name if _selected(path, wanted, regions) else "none"
        new = _replacement(chosen, old, cfg if chosen == name else {})
        if chosen == "none":
            enable_bias(_producer(path, parent, child_name, explicit))
        elif isinstance(new, CrossIterationBatchNorm2d):
            new.layer_name = path
            if new.needs_producer:
                conv = _producer(path, parent, child_name, explicit)
                if id(conv) not in links:
                    links[id(conv)] = ProducerLink(conv)
                new.attach(links[id(conv)], path)
        setattr(parent, child_name, new)
    log.info("convert_norm: %d layers -> %s (where=%s)", len(targets), name, where)
    return module


def _check_where(where: Iterable[str] | None) -> set[str] | None:
    if where is None:
        return None
    wanted = set(where)
    if not wanted <= set(REGIONS):
        raise ConfigError(f"norm.where must be drawn from {REGIONS}, got {sorted(wanted)}")
    return wanted


def _selected(path: str, wanted: set[str] | None, regions: Mapping[str, str] | None) -> bool:
    if wanted is None:
        return True
    region = match_prefix(path, regions)
    if region is None:
        raise ValueError(f"norm layer '{path}' lies in none of the model's norm_regions {dict(regions)}")
    return region in wanted


def _explicit_producers(module: nn.Module) -> dict[str, nn.Conv2d]:
    """Norm path -> conv, from every submodule that declares ``norm_producers()``."""
    found: dict[str, nn.Conv2d] = {}
    for prefix, sub in module.named_modules():
        producers = getattr(sub, "norm_producers", None)
        if not callable(producers):
            continue
        for rel, conv in producers().items():
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"{prefix or 'model'}.norm_producers()['{rel}'] is not an nn.Conv2d")
            found[f"{prefix}.{rel}" if prefix else rel] = conv
    return found


def _producer(path: str, parent: nn.Module, child_name: str, explicit: dict[str, nn.Conv2d]) -> nn.Conv2d:
    if path in explicit:
        return explicit[path]
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        index = names.index(child_name)
        previous = getattr(parent, names[index - 1]) if index > 0 else None
        if isinstance(previous, nn.Conv2d):
            return previous
    if child_name.startswith("bn"):
        sibling = getattr(parent, "conv" + child_name[2:], None)
        if isinstance(sibling, nn.Conv2d):
            return sibling
    raise ValueError(
        f"cannot find the conv that produces the input of norm layer '{path}': expected the "
        "preceding Conv2d in an nn.Sequential, a sibling conv<k> of bn<k>, or an entry in an "
        "ancestor's norm_producers()"
    )


def _reference_tensor(norm: nn.Module) -> torch.Tensor:
    """A per-channel tensor of a BN-like layer (affine or not, tracking or not; FrozenBatchNorm2d
    has no ``num_features``), which gives both the channel count and the device."""
    for attr in ("weight", "running_mean"):
        tensor = getattr(norm, attr, None)
        if isinstance(tensor, torch.Tensor):
            return tensor
    raise ValueError(f"{type(norm).__name__} has neither affine parameters nor running statistics")


@torch.no_grad()
def _replacement(name: str, old: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """The new layer, on the old one's device, carrying over its parameters and statistics
    (e.g. pretrained ones) where both layers have them."""
    reference = _reference_tensor(old)
    new = build_norm(name, reference.shape[0], **cfg).to(reference.device)
    for attr in _INHERITED:
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
            dst.copy_(src)
    return new
