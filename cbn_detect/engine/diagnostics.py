"""Training diagnostics that replace the original study's print-statement debugging guide:
which parameters got no gradient, gradient norm and mean per module group, the update ratio
||delta w|| / ||w|| per group, parameters a step left unchanged, and non-finite losses/gradients
named by loss term and parameter."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from cbn_detect.norm.convert import match_prefix

log = logging.getLogger(__name__)

LEVELS = ("off", "basic", "full")


def module_group(param_name: str, groups: Mapping[str, str] | None) -> str:
    """A readable coarse group for a parameter, from the model's ``parameter_groups`` (module-path
    prefix -> name, e.g. ``backbone.body.layer3`` -> ``backbone.layer3``); a model that declares
    none, or a parameter outside them, is grouped by its top-level module."""
    return (match_prefix(param_name, groups) if groups else None) or param_name.split(".")[0]


def nonfinite_gradients(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


class GradientMonitor:
    """Computes the per-group statistics on the steps it is asked to, and warns once about
    parameters that require a gradient but never receive one (a detached branch, an unused head)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.groups: Mapping[str, str] | None = getattr(model, "parameter_groups", None)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._warned_missing = False
        self._before: dict[str, Tensor] = {}

    def missing_gradients(self) -> list[str]:
        missing = [n for n, p in self.named if p.grad is None]
        if missing and not self._warned_missing:
            self._warned_missing = True
            log.warning("%d parameters require grad but received none: %s", len(missing), ", ".join(missing[:20]))
        return missing

    @torch.no_grad()
    def gradient_stats(self) -> dict[str, float]:
        """Per group: L2 norm and mean of the gradients (after clipping: what the optimizer sees)."""
        sq: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        total: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        count: dict[str, int] = defaultdict(int)
        for name, p in self.named:
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            group = module_group(name, self.groups)
            sq[group] = sq[group].to(g.device) + g.pow(2).sum()
            total[group] = total[group].to(g.device) + g.sum()
            count[group] += g.numel()
        out = {}
        for group in sq:
            out[f"grad_norm/{group}"] = sq[group].sqrt().item()
            out[f"grad_mean/{group}"] = (total[group] / max(1, count[group])).item()
        return out

    @torch.no_grad()
    def snapshot(self) -> None:
        self._before = {n: p.detach().clone() for n, p in self.named}

    @torch.no_grad()
    def update_stats(self) -> dict[str, float]:
        """After ``optimizer.step()``: ||delta w|| / ||w|| per group and how many tensors did not move."""
        delta_sq: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        weight_sq: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        unchanged = []
        for name, p in self.named:
            before = self._before.get(name)
            if before is None:
                continue
            delta = (p.detach() - before).float()
            group = module_group(name, self.groups)
            delta_sq[group] = delta_sq[group].to(p.device) + delta.pow(2).sum()
            weight_sq[group] = weight_sq[group].to(p.device) + before.float().pow(2).sum()
            if not delta.any():
                unchanged.append(name)
        self._before = {}
        out = {
            f"update_ratio/{g}": (delta_sq[g].sqrt() / weight_sq[g].sqrt().clamp_min(1e-12)).item() for g in delta_sq
        }
        out["params_unchanged"] = float(len(unchanged))
        if unchanged:
            log.debug("parameters unchanged by this step: %s", ", ".join(unchanged[:20]))
        return out

    def histograms(self) -> dict[str, Tensor]:
        """Per-parameter weight and gradient tensors for the W&B histogram panels (level ``full``)."""
        out = {}
        for name, p in self.named:
            out[f"weights/{name}"] = p.detach().float().cpu()
            if p.grad is not None:
                out[f"grads/{name}"] = p.grad.detach().float().cpu()
        return out


def first_names(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
