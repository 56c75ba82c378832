"""Mixed precision for the training step: ``train.amp=off|bf16|fp16``.

bf16 needs no loss scaling; fp16 goes through ``torch.amp.GradScaler``, whose scale is part of
the checkpoint. Norm statistics stay in fp32 either way: autocast leaves batch norm's statistics
in fp32, and CBN keeps its history and window statistics in fp32 itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from cbn_detect.runtime.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in ("off", *DTYPES):
            raise ConfigError(f"train.amp={mode!r} must be one of off, bf16, fp16")
        self.mode = mode
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=DTYPES.get(self.mode, torch.bfloat16), enabled=self.mode != "off")

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring fp16 gradients back to their true size before clipping and the finiteness check."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self) -> None:
        """A skipped step still lowers an fp16 loss scale that overflowed."""
        if self.scaler.is_enabled():
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
