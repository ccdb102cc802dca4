"""What the Flower app needs beyond the run's own configuration, and how it travels.

The ServerApp and the ClientApps receive everything through Flower's run config (``[tool.flwr.app.config]``
of the generated app, or ``flwr run -c``): the resolved protofl configuration as TOML text and the
server's fault-handling settings (:class:`FlowerSettings`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from protofl.config import RunConfig, check

#: Run-config keys (Flower's convention is hyphenated keys).
CONFIG_KEY = "protofl-config"


@dataclasses.dataclass(frozen=True)
class FlowerSettings:
    """How the server drives a run on Flower.

    ``min_replies``: a round goes on once this many training replies are in and the others are overdue
    (0: every reachable client must reply); ``round_timeout``: seconds to wait for replies before a
    silent node is declared lost (0: derived from the run's measured exchanges, ``timeout_factor`` times
    the slowest, see :mod:`protofl.flower.timeouts`); ``node_wait``: seconds to wait at the start for
    every partition's node, and, until an exchange has been measured, for the next reply; ``out``: the run folder (on the server's machine); ``run_key``: names the run's client state
    on the nodes, so a restarted node or server continues it; ``resume``: continue from ``out``'s
    checkpoint; ``client_state_dir``: where nodes without a ``state-dir`` node config keep their state
    (the simulation runtime's nodes have no node config of their own).
    """

    out: str
    run_key: str
    min_replies: int = 0
    round_timeout: float = 0.0
    node_wait: float = 120.0
    timeout_factor: float = 3.0
    resume: bool = False
    client_state_dir: str = ""

    def __post_init__(self) -> None:
        check(bool(self.out), "out", "the run folder is required")
        check(
            bool(self.run_key) and self.run_key.replace("-", "").isalnum(),
            "run-key",
            f"must be a non-empty alphanumeric key, got {self.run_key!r}",
        )
        check(self.min_replies >= 0, "min-replies", f"must be >= 0, got {self.min_replies}")
        check(
            math.isfinite(self.round_timeout) and self.round_timeout >= 0,
            "round-timeout",
            f"must be >= 0 seconds (0: derived from the measured rounds), got {self.round_timeout}",
        )
        check(
            math.isfinite(self.timeout_factor) and self.timeout_factor >= 1,
            "timeout-factor",
            f"must be a number >= 1, got {self.timeout_factor}",
        )
        check(self.node_wait > 0, "node-wait", f"must be > 0 seconds, got {self.node_wait}")

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FlowerSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in names}
        for key in ("min_replies",):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        for key in ("round_timeout", "node_wait", "timeout_factor"):
            if key in kwargs:
                try:
                    kwargs[key] = float(kwargs[key])
                except (TypeError, ValueError):
                    check(False, key.replace("_", "-"), f"must be a number of seconds, got {kwargs[key]!r}")
        return cls(**kwargs)


def run_config_of(run_config: Mapping[str, Any]) -> RunConfig:
    """The protofl configuration carried in a Flower run config."""
    import tomllib

    from protofl.config import ConfigError
    from protofl.runner import resolve_config

    text = run_config.get(CONFIG_KEY)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"the Flower run config has no {CONFIG_KEY!r} (the run's protofl configuration as TOML)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_KEY}: not valid TOML: {exc}") from None
    return resolve_config(data)
