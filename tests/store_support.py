"""A central store to test against, of either kind, with an outage that
can be switched on and off (the ``backend`` fixture of tests/conftest.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kynara_sidecar.sync import Store, open_store

__all__ = ["POLL", "TIMEOUT", "Backend"]

# Short, so a test of an outage or a watch does not wait long.
TIMEOUT = 1.0
POLL = 0.05


@dataclasses.dataclass
class Backend:
    """A store's URL and how to take it away and bring it back."""

    kind: str
    url: str
    outage: Callable[[], None]
    restore: Callable[[], None]

    def open(self, timeout: float = TIMEOUT) -> Store:
        return open_store(self.url, timeout=timeout, poll_seconds=POLL)
