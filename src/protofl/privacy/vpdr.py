"""DCR, VPDR's training-side part: soft clipping of the features fed to the head and to the host loss, an
EMA teacher head on the unclipped features, and a KD term after warm-up.

VPDR's releases (IGPP, VPP) are :class:`~protofl.privacy.layer.IGPPLayer` and
:class:`~protofl.privacy.layer.VPPLayer` of the privacy layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from protofl.config import PrivacyConfig
from protofl.privacy.accounting import LEDGER_KEY
from protofl.privacy.mechanisms import soft_clip

__all__ = ["LEDGER_KEY", "DistillationClipping"]


@dataclasses.dataclass
class DistillationClipping:
    """DCR for one client's local training: wraps the host's loss.

    ``loss(params, x, y, forward, head, host_loss)`` = CE(head(sc(z)), y) + host_loss(sc(z), y)
    + λ_KD·T²·KL(softmax(teacher(z)/T) ‖ softmax(head(sc(z))/T)) once ``steps`` ≥ warm-up; the teacher
    is an EMA (momentum m) of the head's parameters, started from the head when KD switches on and
    updated at every step after it (from the parameters entering the step)."""

    config: PrivacyConfig
    teacher: dict[str, torch.Tensor] | None = None
    steps: int = 0

    @classmethod
    def from_state(cls, config: PrivacyConfig, state: dict[str, Any]) -> DistillationClipping:
        return cls(config, state.get("dcr_teacher"), int(state.get("dcr_steps", 0)))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dcr_steps": self.steps}
        if self.teacher is not None:
            out["dcr_teacher"] = self.teacher
        return out

    def loss(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        features: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
        head: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
        host_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    ) -> torch.Tensor:
        c = self.config
        z = features(params, x)
        clipped = soft_clip(z, c.clip_bound, c.soft_clip_tau)
        student = head(params, clipped)
        loss = F.cross_entropy(student, y)
        extra = host_loss(clipped, y)
        if extra is not None:
            loss = loss + extra
        head_now = {k: v.detach() for k, v in params.items() if k.startswith("head.")}
        if self.steps >= c.kd_warmup_steps and c.kd_weight > 0:
            if self.teacher is None:
                self.teacher = {k: v.clone() for k, v in head_now.items()}
            else:
                m = c.ema_momentum
                self.teacher = {k: m * self.teacher[k] + (1 - m) * head_now[k] for k in self.teacher}
            with torch.no_grad():
                teacher_logits = head(self.teacher, z.detach())
            t = c.kd_temperature
            kd = F.kl_div(
                F.log_softmax(student / t, 1),
                F.log_softmax(teacher_logits / t, 1),
                log_target=True,
                reduction="batchmean",
            )
            loss = loss + c.kd_weight * t * t * kd
        self.steps += 1
        return loss
