"""Per-layer norm diagnostics as flat scalars, for the trainer to log every N steps."""

from __future__ import annotations

import torch
from torch import nn

from cbn_detect.norm.brn import BatchRenorm2d
from cbn_detect.norm.cbn import CrossIterationBatchNorm2d, WindowDiag


@torch.no_grad()
def norm_diagnostics(model: nn.Module) -> dict[str, float]:
    """``{"norm/<layer path>/<quantity>": value}`` for every norm layer that tracks something.

    CBN: ``effective_window`` (entries averaged per channel, mean over channels), ``dropped``
    (fraction of stored entries rejected for a negative compensated variance) and
    ``taylor_rel`` (mean |Taylor term| over mean |stored mean|: how far the layer's *own* conv
    weight moved since the entries were stored, in units of the statistic) of its latest training
    step. It does not measure the entries' other staleness - the layers upstream changed the conv's
    *input* distribution since - which the method does not correct (neither the paper nor this
    code), so a small value does not mean the stored statistics are current. BN-like layers that
    learn statistics: ``running_var`` (channel mean of the running variance, whose drift flags
    exploding activations). BRN also reports its current ``r_max`` and ``d_max``. Everything is
    computed here from tensors the layers already hold, so training steps pay nothing; a call costs
    one device-to-host copy.
    """
    values: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        key = f"norm/{path}"
        if isinstance(module, CrossIterationBatchNorm2d) and module.last_window is not None:
            values.update(_cbn_values(key, module.last_window))
        if isinstance(module, BatchRenorm2d):
            values[f"{key}/r_max"], values[f"{key}/d_max"] = module.current_limits()
        # FrozenBatchNorm2d has a running_var too, but a constant one: not worth a log line.
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.running_var is not None:
            values[f"{key}/running_var"] = module.running_var.mean()
    return _to_floats(values)


def _cbn_values(key: str, diag: WindowDiag) -> dict[str, torch.Tensor]:
    stored = diag.valid[:, None].expand_as(diag.keep)  # (S, C): slots that held data
    n_stored = stored.sum().clamp_min(1)
    base = torch.where(stored, diag.comp_mean - diag.delta_mean, 0.0).abs().sum().clamp_min(1e-12)
    return {
        f"{key}/effective_window": diag.count.mean(),
        f"{key}/dropped": (stored & ~diag.keep).sum() / n_stored,
        f"{key}/taylor_rel": torch.where(stored, diag.delta_mean, 0.0).abs().sum() / base,
    }


def _to_floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One device-to-host copy per device instead of one sync per value."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in values.items():
        by_device.setdefault(value.device, []).append(key)
    out: dict[str, float] = {}
    for keys in by_device.values():
        numbers = torch.stack([values[k].float() for k in keys]).tolist()
        out.update(zip(keys, numbers))
    return {key: out[key] for key in values}
