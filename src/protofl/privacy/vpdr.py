"""VPDR's client side as a plug-in for a prototype host: calibrated release, per-client ledger, DCR.

:class:`PrototypePrivacy` is built once per run from a :class:`~protofl.config.PrivacyConfig`:

- it calibrates the Gaussian noise multiplier σ so that ``planned_releases`` releases (with VPP, each
  also one private selection at ``selection_fraction · ε / planned_releases``, pure DP) compose to at
  most (ε, δ) under the configured accountant. The VPDR reference instead gives 0.9 ε to the Gaussian
  part by the classic RDP conversion; composing both parts with the accountant is tighter, so σ comes
  out lower at the same ε;
- ``release`` turns a client's features into the prototypes it may publish (IGPP or VPP), after the
  ledger kept in the client's state confirms the release fits the budget; nothing is recorded or
  released when it does not (:class:`~protofl.privacy.accounting.BudgetExceededError`);
- ``report`` gives the spent ε at δ per client under both accountants.

:class:`DistillationClipping` is DCR's local-training part: soft clipping of the features fed to the
head and to the host loss, an EMA teacher head on the unclipped features, and a KD term after warm-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from protofl.config import PrivacyConfig
from protofl.privacy.accounting import (
    Event,
    GaussianEvent,
    PrivacyLedger,
    PureDpEvent,
    calibrate_noise_multiplier,
    spend_report,
)
from protofl.privacy.mechanisms import (
    PrototypeRelease,
    igpp_release,
    soft_clip,
    vpp_release,
)

__all__ = ["LEDGER_KEY", "DistillationClipping", "PrototypePrivacy"]

#: Where a client's ledger lives in its state (a list of ``(event dict, count)`` pairs).
LEDGER_KEY = "privacy_ledger"


class PrototypePrivacy:
    """The release mechanism of one run (see the module docstring)."""

    def __init__(self, config: PrivacyConfig, planned_releases: int, num_classes: int):
        if config.mechanism == "none":
            raise ValueError("PrototypePrivacy needs a mechanism (igpp or vpp)")
        if planned_releases < 1:
            raise ValueError(f"planned_releases must be >= 1, got {planned_releases}")
        self.config = config
        self.planned_releases = planned_releases
        self.num_classes = num_classes
        self.selection_epsilon = (
            config.selection_fraction * config.epsilon / planned_releases if config.mechanism == "vpp" else None
        )
        selection = [(PureDpEvent(self.selection_epsilon), planned_releases)] if self.selection_epsilon else []
        self.noise_multiplier = calibrate_noise_multiplier(
            config.epsilon, config.delta, planned_releases, config.accountant, selection
        )
        self._plan = self.plan()

    def release_events(self) -> tuple[tuple[Event, int], ...]:
        """What one release costs."""
        gaussian = (GaussianEvent(self.noise_multiplier), 1)
        return ((PureDpEvent(self.selection_epsilon), 1), gaussian) if self.selection_epsilon else (gaussian,)

    def plan(self) -> tuple[tuple[Event, int], ...]:
        """The releases σ was calibrated for: ``planned_releases`` times :meth:`release_events`."""
        return tuple((event, count * self.planned_releases) for event, count in self.release_events())

    def ledger(self, client_state: dict[str, Any]) -> PrivacyLedger:
        """The client's ledger, with the calibrated plan (its budget check needs no accountant run while
        the client's releases stay within the plan; see :class:`PrivacyLedger`)."""
        ledger = PrivacyLedger(self.config.accountant, self.config.delta, self.config.epsilon, plan=self._plan)
        ledger.load_state_dict(client_state.get(LEDGER_KEY, ()))
        return ledger

    def check(self, client_state: dict[str, Any], who: str) -> None:
        """Raise :class:`BudgetExceededError` if this client's next release would exceed its budget."""
        self.ledger(client_state).check(self.release_events(), who)

    def release(self, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator, client_state: dict[str, Any],
                who: str = "client") -> tuple[PrototypeRelease, list]:
        """The noisy prototypes of features ``z`` (labels ``y``) and the client's updated ledger state."""
        ledger = self.ledger(client_state)
        ledger.spend(self.release_events(), who)
        c = self.config
        if c.mechanism == "igpp":
            out = igpp_release(z, y, self.num_classes, c.clip_bound, self.noise_multiplier, generator, c.sensitivity)
        else:
            out = vpp_release(z, y, self.num_classes, c.clip_bound, self.noise_multiplier, c.rho, c.score_cap,
                              self.selection_epsilon, generator, c.sensitivity)
        return out, ledger.state_dict()

    def report(self, client_states: Iterable[dict[str, Any]], all_accountants: bool = True) -> dict[str, Any]:
        """Spent ε at δ per client under each accountant (max and mean over clients) and the calibration."""
        c = self.config
        return spend_report([self.ledger(state) for state in client_states], accountant=c.accountant, delta=c.delta,
                            budget=c.epsilon, mechanism=c.mechanism, noise_multiplier=self.noise_multiplier,
                            planned_releases=self.planned_releases, counted=("gaussian",),
                            all_accountants=all_accountants, selection_epsilon_per_release=self.selection_epsilon,
                            sensitivity=c.sensitivity)


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
            kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                          reduction="batchmean")
            loss = loss + c.kd_weight * t * t * kd
        self.steps += 1
        return loss

