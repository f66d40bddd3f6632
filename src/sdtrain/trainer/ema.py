"""Exponential moving average of the UNet's weights, with the original ``LitEma`` warm-up.

After each optimiser step: ``n += 1``, ``decay = min(decay_max, (1 + n) / (10 + n))``,
``shadow -= (1 - decay) * (shadow - param)``, for every trainable parameter. The shadow weights
are kept in float32 whatever the training precision, keyed like the UNet's ``state_dict()``;
the checkpoint module writes them in the original flattened ``model_ema.*`` naming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite

FSDP_PREFIX = "_fsdp_wrapped_module."


@dataclass
class EMAConfig:
    """The EMA of the UNet used for sampling, validation and export. A text encoder that trains
    (``finetune.train_text_encoder``) is not averaged: it is used and exported as trained."""

    enabled: bool = True
    """Keep an EMA copy of the UNet."""
    decay: float = 0.9999
    """Upper bound of the per-update decay."""
    warmup: bool = True
    """The original warm-up ``min(decay, (1 + n) / (10 + n))``; off = constant ``decay``."""

    def __post_init__(self) -> None:
        require_finite(self)
        if not 0 <= self.decay < 1:
            raise ConfigError("must be in [0, 1)", key="decay")


class EMA:
    """Shadow copies of a module's trainable parameters."""

    def __init__(self, module: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        """The decay the next update uses (``num_updates`` already counting it)."""
        n = self.num_updates + 1
        return min(self.cfg.decay, (1 + n) / (10 + n)) if self.cfg.warmup else self.cfg.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards ``module``'s current parameters."""
        decay = self.current_decay()
        self.num_updates += 1
        # FSDP inserts "_fsdp_wrapped_module." into the names of the blocks it wraps
        params = {n.replace(FSDP_PREFIX, ""): p for n, p in module.named_parameters()}
        shadows = list(self.shadow.values())
        current = [
            params[name].detach().to(s.device, torch.float32) for name, s in self.shadow.items()
        ]
        # shadow -= (shadow - param) * (1 - decay), every tensor in one foreach call per op
        diffs = torch._foreach_sub(shadows, current)
        torch._foreach_mul_(diffs, 1.0 - decay)
        torch._foreach_sub_(shadows, diffs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.cfg.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))[:5]
            unexpected = sorted(set(shadow) - set(self.shadow))[:5]
            raise ValueError(f"EMA keys differ: missing {missing}, unexpected {unexpected}")
        for name, value in shadow.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name} has shape {list(value.shape)}, "
                                 f"expected {list(self.shadow[name].shape)}")  # fmt: skip
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights into ``module`` (cast to its parameter dtypes)."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)

    @contextlib.contextmanager
    def applied_to(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into ``module`` (for sampling and validation)."""
        backup = {
            name: p.detach().clone() for name, p in module.named_parameters() if name in self.shadow
        }
        self.copy_to(module)
        try:
            yield module
        finally:
            params = dict(module.named_parameters())
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)
