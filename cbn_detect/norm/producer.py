"""The link between a norm layer and the convolution whose output it normalizes.

CBN needs the producing conv's input and weight at every training step. Shared convs (a RetinaNet
head's conv runs once per FPN level, each level with its own norm) rule out remembering "the" input
at wiring time, so the link is a forward hook that keeps the input and output of the conv's most
recent call; the norm that runs right after takes the input, after checking that what it normalizes
is that very output (so a mis-wired or reordered model fails loudly instead of compensating with
the wrong level's input). One link per conv, shared by all norms wired to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ProducerLink:
    """Forward hook on a conv holding the input and output of its latest training-mode call."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        self._latest: tuple[Tensor, Tensor] | None = None
        conv.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        # Only training steps use them; not keeping eval tensors avoids pinning activations.
        self._latest = (args[0], output) if module.training else None

    def take(self, normalized: Tensor) -> Tensor | None:
        """The input of the call that produced ``normalized``, or None if that is not the latest
        call (the norm did not run right after its conv). Handed over once, never reused."""
        latest, self._latest = self._latest, None
        if latest is None or latest[1] is not normalized:
            return None
        return latest[0]


def enable_bias(conv: nn.Conv2d) -> None:
    """Give a conv a zero bias when its norm is removed, since the norm's shift no longer exists."""
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device, dtype=conv.weight.dtype))
