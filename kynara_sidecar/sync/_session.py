"""One central store shared by the daemon's sync tasks, every call bounded.

The shipper and the status publisher talk to the same ``Store``. A store
may be down when the daemon starts, or lost later; each call here first
connects when the store is not known to be up (``Store.connect`` is
idempotent, and one lock keeps two tasks from connecting at once), then
runs under ``sync.timeout_seconds``. A call that takes longer counts as
failed: a slow store is treated like a dead one, so no task waits on it
for long, and the next call connects again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kynara_sidecar.sync import Store, StoreUnavailable

__all__ = ["StoreSession", "error_text"]

T = TypeVar("T")


def error_text(err: BaseException) -> str:
    """What a log line or a status says of ``err``: its message, or its
    type's name when it has none (``str`` of a bare ``TimeoutError`` is
    empty, and an empty ``error`` field tells an operator nothing)."""
    return str(err) or type(err).__name__


class StoreSession:
    """A ``Store`` whose calls connect on demand and time out.

    Args:
        store: the store, connected or not.
        timeout: seconds any one call (connecting included) may take.
    """

    def __init__(self, store: Store, timeout: float):
        self.store = store
        self.timeout = timeout
        self._up = False
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return self.store.url

    async def call(self, make: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``make()`` against the store, connecting first if needed.

        Args:
            make: builds the store call's awaitable (called once, after any
                connect).
            what: the call, for the error message ("ship segment message
                ...").

        Raises:
            StoreUnavailable: the store could not be reached, failed the
                call, or did not answer within ``timeout`` seconds (the
                message says which setting bounds it).
        """
        try:
            if not self._up:
                async with self._lock:
                    if not self._up:
                        await self._bounded(self.store.connect(), "connect")
                        self._up = True
            return await self._bounded(make(), what)
        except StoreUnavailable:
            self._up = False
            raise
        except (OSError, ConnectionError, RuntimeError) as err:
            # A store is to raise StoreUnavailable; anything else from its
            # client library still means the call failed, not the daemon.
            self._up = False
            raise StoreUnavailable(
                f"{self.url}: {what}: {type(err).__name__}: {err}"
            ) from err

    async def _bounded(self, call: Awaitable[T], what: str) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise StoreUnavailable(
                f"{self.url}: {what}: no answer within sync.timeout_seconds "
                f"({self.timeout:g}s)"
            ) from None

    async def close(self, timeout: float | None = None) -> None:
        """Close the store, waiting at most ``timeout`` seconds (the call
        timeout when None); a store that fails to close is let go."""
        self._up = False
        try:
            async with asyncio.timeout(timeout or self.timeout):
                await self.store.close()
        except (StoreUnavailable, TimeoutError, OSError):
            pass
