"""How long the server waits for the nodes' replies to one exchange (a round's messages, an evaluation,
the discovery of which partition a node holds).

A fixed ``round_timeout`` (seconds, > 0) is one deadline for every exchange. With ``round_timeout = 0``
(the default) the deadline is derived from what the run has measured:

- until an exchange has been measured (a run's first round, which includes every node's start-up, and
  the discovery of the nodes), the server waits as long as replies keep coming: a node is declared lost
  once no reply has arrived for ``node_wait`` seconds;
- afterwards an exchange of ``m`` messages waits ``timeout_factor`` times the longer of the slowest
  exchange measured so far and ``m`` times the most seconds per message measured so far (a simulation
  runs its nodes a few at a time, so an exchange with more messages takes longer; a deployment runs them
  side by side), and never less than :data:`MIN_DERIVED_TIMEOUT`.

An exchange is measured from sending its messages to its last reply; one without any reply is not.
"""

from __future__ import annotations

import time

#: The least a derived deadline gives an exchange (seconds).
MIN_DERIVED_TIMEOUT = 30.0


class ReplyWait:
    """One exchange's deadline: :meth:`replied` on each reply, :meth:`expired` to ask, :meth:`finish` at
    the end (records what it measured with its :class:`RoundTimeouts`)."""

    def __init__(self, owner: RoundTimeouts | None, messages: int, limit: float, rolling: bool):
        self.owner = owner
        self.messages = messages
        self.limit = limit
        self.rolling = rolling
        self.start = time.monotonic()
        self.deadline = self.start + limit
        self.last_reply: float | None = None

    def replied(self) -> None:
        self.last_reply = time.monotonic()
        if self.rolling:
            self.deadline = self.last_reply + self.limit

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def describe(self) -> str:
        """Why a silent node was given up (for the incidents and the log)."""
        if self.rolling:
            return f"no reply within {self.limit:g} s of the last node's reply (node_wait, first exchange)"
        return f"no reply within {self.limit:g} s"

    def finish(self) -> None:
        if self.owner is not None and self.last_reply is not None:
            self.owner.measured(self.last_reply - self.start, self.messages)


class RoundTimeouts:
    """The deadlines of a run's exchanges (see the module docstring)."""

    def __init__(self, round_timeout: float, node_wait: float, timeout_factor: float):
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.timeout_factor = timeout_factor
        #: The slowest exchange measured (seconds) and the most seconds per message.
        self.longest: float | None = None
        self.per_message: float | None = None

    @property
    def derived(self) -> bool:
        return self.round_timeout == 0

    def limit(self, messages: int) -> float | None:
        """The deadline of an exchange of ``messages`` messages (None: not measured yet, wait while replies
        keep coming)."""
        if not self.derived:
            return self.round_timeout
        if self.longest is None or self.per_message is None:
            return None
        return max(MIN_DERIVED_TIMEOUT, self.timeout_factor * max(self.longest, self.per_message * messages))

    def wait(self, messages: int) -> ReplyWait:
        """The deadline of an exchange of ``messages`` messages, starting now."""
        limit = self.limit(messages)
        if limit is None:
            return ReplyWait(self, messages, self.node_wait, rolling=True)
        return ReplyWait(self, messages, limit, rolling=False)

    def discovery(self, messages: int) -> ReplyWait:
        """The wait for new nodes' answers to which partition they hold: a node starting up may take a while,
        so it waits while answers keep coming (at most 60 s after the last one, or ``round_timeout``);
        not measured."""
        limit = min(self.round_timeout, 60.0) if not self.derived else min(self.node_wait, 60.0)
        return ReplyWait(None, messages, limit, rolling=self.derived)

    def measured(self, seconds: float, messages: int) -> None:
        self.longest = seconds if self.longest is None else max(self.longest, seconds)
        rate = seconds / max(1, messages)
        self.per_message = rate if self.per_message is None else max(self.per_message, rate)
