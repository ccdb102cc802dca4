"""A progress bar within a round: the clients whose step is done, out of the round's active clients.

The round bar (:func:`protofl.engine.rounds.RoundDriver.run`) moves once per round; on a long round it
sits still for minutes. :class:`ClientProgress` draws a second bar under it (``position=1``, cleared at
the end of the round) that moves as each client's step finishes (per client, or a batched chunk's
clients at once). It draws only where ``federation.progress`` is on; off, it writes nothing anywhere.
"""

from __future__ import annotations

from typing import Any


class ClientProgress:
    """Clients done in the current round; a tqdm bar on stderr when ``enabled``.

    :meth:`start` opens a round's bar, :meth:`advance` counts clients done, :meth:`close` clears it.
    ``done`` and ``total`` hold the last round's count whether or not a bar is drawn."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.round = 0
        self.done = 0
        self.total = 0
        self._bar: Any = None

    def start(self, round_index: int, total: int) -> None:
        """Round ``round_index`` begins with ``total`` clients to step."""
        self.close()
        self.round, self.done, self.total = round_index, 0, total
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                desc=f"round {round_index} clients",
                unit="client",
                position=1,
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self, count: int = 1) -> None:
        """``count`` more clients of the round are done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            if self.done >= self.total:
                self._bar.refresh()  # the full count is drawn once, however fast the round went

    def close(self) -> None:
        """The round is over: clear its bar (the round bar above it stays)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
