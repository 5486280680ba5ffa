"""The local runtime: every expert runs in this process (``MoELayer.run_experts`` as defined)."""

from __future__ import annotations

import torch


class LocalRuntime:
    """Experts in process: attaching changes nothing, clipping is torch's."""

    name = "local"

    def attach(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, payload_bits: int | None = None
    ) -> torch.nn.Module:
        return model

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
