"""The collector's side of the signed directory: sign and publish it.

``DirectoryPublisher`` turns ``directory.json`` content (from SCIM, or from
a file with ``kynara-collector directory publish``) into a signed directory
update (``sync.directory``) and makes it the store's current directory,
where daemons whose ``directory.store`` names the store pick it up.

Two rules keep daemons converging:

- ``created`` strictly increases, even when the machine's clock steps back
  (a daemon takes only an update newer than the one it has): each update
  is created at the clock's time or one nanosecond after the last one,
  whichever is later. The last one is the later of what this publisher
  published and the store's current update, read before every publish,
  when it verifies with this publisher's key (so a restarted collector
  continues where it was rather than going back with its clock, and a
  hand publish from a machine whose clock is ahead does not make later
  revisions look older to daemons);
- content equal to the current one publishes nothing, so a SCIM request
  that changes no principal (or a restart) costs daemons nothing.

Signing a large directory takes seconds of CPU (decoding and checking
every principal), so it runs in a worker thread, not on the event loop.
Publishes are serialized: each waits for the one before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kynara_sidecar.audit.keys import SigningKey
from kynara_sidecar.audit.record import parse_timestamp
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.sync import Store
from kynara_sidecar.sync.directory import (
    DirectoryError,
    build_directory_update,
    directory_revision,
    verify_directory_update,
)
from kynara_sidecar.sync.follower import bundle_digest

__all__ = ["DirectoryPublisher"]

_log = logging.getLogger("kynara.collector")
_NANOS = 1_000_000_000


class DirectoryPublisher:
    """Signs directory content with the collector's directory key and
    publishes it to ``store`` (see the module doc).

    Args:
        store: a connected or unconnected ``dir://`` or ``nats://`` store.
        key: the directory signing key (``directory.signing_key``).
        clock: nanoseconds since the epoch; a test passes one that steps
            back.
    """

    def __init__(
        self,
        store: Store,
        key: SigningKey,
        *,
        clock: Callable[[], int] = time.time_ns,
    ):
        self._store = store
        self._key = key
        self._clock = clock
        self._lock = asyncio.Lock()
        # The store's current update last read (its digest), so one
        # already read is not verified again.
        self._seen_digest: str | None = None
        self._last_created = -1
        self._last_content: bytes | None = None
        self._last_revision = ""

    @property
    def revision(self) -> str:
        """The revision last published (or found current), "" for none."""
        return self._last_revision

    async def publish(self, content: bytes) -> str:
        """Make ``content`` (``sync.directory.directory_content`` bytes) the
        current directory, unless it already is.

        Returns:
            The content's revision.

        Raises:
            DirectoryError: ``content`` is no canonical directory, or the
                update would be larger than the cap (``kind`` says which).
            StoreUnavailable: the store is away; nothing was published, and
                the next call tries again.
        """
        async with self._lock:
            await self._refresh()
            if content == self._last_content:
                return self._last_revision
            created = max(self._clock(), self._last_created + 1)
            data = await asyncio.to_thread(
                build_directory_update,
                content,
                self._key,
                Timestamp(created // _NANOS, created % _NANOS),
            )
            digest = bundle_digest(data)
            await self._store.publish_directory(digest, data)
            self._seen_digest = digest
            self._last_created = created
            self._last_content = content
            self._last_revision = directory_revision(content)
            _log.info(
                "directory published",
                extra={
                    "fields": {
                        "component": "collector",
                        "revision": self._last_revision,
                        "bytes": len(data),
                        "key_id": self._key.key_id,
                    }
                },
            )
            return self._last_revision

    async def _refresh(self) -> None:
        """Take the store's current update as the last one when this key
        signed it and it is newer than the last one (a hand publish, or
        this publisher's own before a restart)."""
        entry = await self._store.current_directory()
        if entry is None or entry.digest == self._seen_digest:
            return
        self._seen_digest = entry.digest
        trusted = {self._key.key_id: self._key.public()}
        try:
            current = await asyncio.to_thread(
                verify_directory_update, entry.data, trusted
            )
        except DirectoryError as err:
            # Another key's (a rotation) or damaged: publish over it.
            self._last_content = None
            _log.warning(
                "current directory not verified with this key; publishing anew",
                extra={"fields": {"key_id": self._key.key_id, "error": str(err)}},
            )
            return
        moment = parse_timestamp(current.created)
        created = moment.seconds * _NANOS + moment.nanos
        if created <= self._last_created:
            return
        self._last_created = created
        self._last_content = current.content
        self._last_revision = current.revision
