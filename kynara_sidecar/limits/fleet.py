"""Fleet-scope limits: each daemon's counted decisions, shared through the
central store so that every daemon adds the others' to its own.

A limit declared ``scope: fleet`` counts the decisions of every daemon
that shares the store (one user, many agents). Each daemon keeps exact
counts of its own decisions (``book``); what the others decided reaches it
through the store:

- **out**: after each commit the pipeline hands this daemon's counted
  decisions of fleet limits to ``published``; at most every
  ``publish_interval`` the daemon puts one document holding all of its own
  decisions still in their windows (``Store.put_limit_tallies``, latest
  wins), so a burst of decisions is one put, not one per decision;
- **in**: a watch of every daemon's document (``watch_limit_tallies``)
  keeps the latest one of each other daemon, indexed by (limit, key), and
  ``remote`` sums the events of one key at or after a window's start.

The document is canonical JSON (sorted keys, no spaces)::

    {"v": 2, "daemon_id": "...", "published_at": <ns>,
     "limits": {"<limit>": {"definition": "<digest>",
                            "keys": {"<key>": [[<time ns>, <amount>], ...]}}}}

Events in time order. An amount is a JSON integer for a limit with an
int ceiling (so sums stay exact) and a JSON number with a fraction or
exponent for a double one (``5.0``); a reader refuses an event whose
amount is not of its limit's type. A daemon's own events come from
``seed`` (the book's events at start, read from the log) and ``published``;
each is known by its decision id, so a decision seeded and published both
counts once. Own events stay in the document while a reader can still ask
for them: from their limit's window start (``window_start`` at the
publisher's clock) less ``GRACE_NANOS``, for clocks a moment apart.

Definitions. A limit's decisions belong to its name and to what it counts
(``CompiledLimit.definition``): a limit redefined under its name starts
afresh. Each limit in the document carries the definition its events were
counted under; a reader counts a limit's events only where that is the
definition it has active itself, and skips the limit otherwise (counting
nothing from it: while a redefinition rolls out, the daemons on either
side count only each other's of their own definition). On ``activate`` a
daemon drops its own events of a definition no longer active, and
``published`` ignores a decision counted under another definition than
the active one (one that committed across the activation).

Sums. A remote sum of doubles is exact, rounded once: amounts are added as
integers in units of 2**-1074 (``audit.verify_pack.DOUBLE_SHIFT``) and
the total rounded once by ``verify_pack.rounded_sum``, the helpers the book
and ``verify`` use too, so it does not depend on how many events or
daemons it was added from.

Consistency (the trade-off the README states): per-daemon counts are
exact; fleet counts are eventually consistent. Two daemons deciding within
the propagation delay (NATS: milliseconds; ``dir://``: its poll interval,
plus ``publish_interval``) do not see each other's decisions, so the fleet
can pass a ceiling by what the other daemons allowed in that delay. A
daemon that has not heard from the store for ``max_staleness_seconds``
has no remote part: ``remote`` answers None and the pipeline leaves the
limit absent, so conditions reading it fail closed. "Heard" means the
last successful read of every document, or a watch that has not reported
a loss since (a NATS watch notices a lost connection within a fraction of
a second and a silent one within about eleven seconds; a ``dir://`` watch
within ``sync.timeout_seconds``); until the first read after ``launch``
the daemon has heard nothing.

A document over the store's limit (``MAX_LIMIT_TALLIES_BYTES``) is not
put: an ERROR (``kynara.limits``) and a publish error, every time it
changes; the other daemons keep this daemon's last document, so their
view of it goes stale (they under-count it) until it shrinks as events
leave their windows. Nothing here raises into the pipeline.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec

from kynara_sidecar.audit.verify_pack import DOUBLE_SHIFT, rounded_sum
from kynara_sidecar.config import (
    DEFAULT_FLEET_MAX_STALENESS_SECONDS,
    DEFAULT_FLEET_PUBLISH_INTERVAL_SECONDS,
)
from kynara_sidecar.decision import NANOS_PER_SECOND
from kynara_sidecar.limits.book import GRACE_NANOS, Counted, Tally
from kynara_sidecar.policy.limits import CompiledLimit, window_start
from kynara_sidecar.policy.model import LimitScope
from kynara_sidecar.sync import Store, StoreUnavailable, retry_delay

__all__ = ["DOCUMENT_VERSION", "FleetLimits", "decode_document", "encode_document"]

_log = logging.getLogger("kynara.limits")

# 2: each limit carries its definition (1 had none, and is refused).
DOCUMENT_VERSION = 2
# Reconnecting after a lost watch: doubling pauses within these bounds.
_RETRY_MIN_SECONDS = 0.5
_RETRY_MAX_SECONDS = 10.0
# Attacker-chosen names are cut to this in log lines.
_MAX_LOGGED = 128

Amount = int | float
# One limit as ``encode_document`` takes it: (definition, key -> events).
Published = tuple[str, Mapping[str, Iterable[tuple[int, Amount]]]]


class _Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    definition: str
    keys: dict[str, list[tuple[int, int | float]]]


class _Document(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    daemon_id: str
    published_at: int
    limits: dict[str, _Limit]


def encode_document(
    daemon_id: str, published_at: int, limits: Mapping[str, Published]
) -> bytes:
    """The canonical JSON of one daemon's document (see the module doc):
    ``limits`` maps each limit to (its definition, key -> events); keys
    sorted, events in (time, amount) order."""
    body = {
        limit: {
            "definition": definition,
            "keys": {key: sorted(events) for key, events in keys.items()},
        }
        for limit, (definition, keys) in limits.items()
    }
    return msgspec.json.encode(
        {
            "v": DOCUMENT_VERSION,
            "daemon_id": daemon_id,
            "published_at": published_at,
            "limits": body,
        },
        order="sorted",
    )


def decode_document(data: bytes) -> _Document:
    """The document ``data`` holds.

    Raises:
        ValueError: not a document of this version (naming what was wrong).
    """
    try:
        document = msgspec.json.decode(data, type=_Document)
    except msgspec.DecodeError as err:
        raise ValueError(f"not a limit tallies document: {err}") from None
    if document.v != DOCUMENT_VERSION:
        raise ValueError(
            f"limit tallies document version {document.v}: expected {DOCUMENT_VERSION}"
        )
    return document


def _raise_if_cancelled() -> None:
    # A store call may swallow a cancellation (a NATS connect: Python
    # 3.11's wait_for, gh-86296); the task still counts it, so a task
    # ``close`` left behind ends here rather than putting or watching on.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _within(call: Awaitable[object], seconds: float) -> bool:
    """Run ``call`` as a task for at most ``seconds``; whether it ended
    (one still running is cancelled and left behind, not awaited)."""
    task = asyncio.ensure_future(call)
    _, pending = await asyncio.wait({task}, timeout=max(seconds, 0.0))
    if pending:
        task.cancel()
        return False
    with contextlib.suppress(Exception):
        task.result()
    return True


class _Events:
    """One daemon's events of one (limit, key): times ascending, and the
    prefix sums of their amounts in the same order, so the sum of a window
    is one subtraction and exact. Ints are summed as they are; doubles as
    integers in units of 2**-``shift``, the finest power of two among them
    (every double is an integer multiple of it), which keeps each prefix a
    few words long where 2**-1074 would make it some 1,100 bits."""

    __slots__ = ("integral", "prefix", "shift", "times")

    def __init__(self, events: list[tuple[int, Amount]], integral: bool):
        events.sort()
        self.times = [t for t, _ in events]
        self.prefix = [0]
        self.integral = integral
        self.shift = 0
        total = 0
        if integral:
            for _, amount in events:
                total += amount
                self.prefix.append(total)  # type: ignore[arg-type]
            return
        ratios = [float(amount).as_integer_ratio() for _, amount in events]
        # Each denominator is a power of two: 2**(bit_length - 1).
        self.shift = max((d.bit_length() - 1 for _, d in ratios), default=0)
        for numerator, denominator in ratios:
            total += numerator << (self.shift - denominator.bit_length() + 1)
            self.prefix.append(total)

    def since(self, start_nanos: int) -> tuple[int, int]:
        """(count, sum) at or after ``start_nanos``: the sum an int, or for
        doubles in units of 2**-DOUBLE_SHIFT."""
        first = bisect.bisect_left(self.times, start_nanos)
        held = self.prefix[-1] - self.prefix[first]
        if not self.integral:
            held <<= DOUBLE_SHIFT - self.shift
        return len(self.times) - first, held


class FleetLimits:
    """This daemon's side of fleet-scope limits; see the module doc.

    Args:
        store: the central store; each watch of it starts with
            ``connect`` (idempotent).
        daemon_id: this daemon's ``identity.daemon_id``; its own document
            is put under it and ignored when read back.
        max_staleness_seconds: past this long without hearing from the
            store, ``remote`` answers None (fleet limits fail closed).
        publish_interval: at most one put per this many seconds; the
            decisions of a burst go in one document.
        clock: ns since the epoch (``time.time_ns``), for windows,
            ``published_at`` and staleness.
    """

    def __init__(
        self,
        store: Store,
        daemon_id: str,
        *,
        max_staleness_seconds: float = DEFAULT_FLEET_MAX_STALENESS_SECONDS,
        publish_interval: float = DEFAULT_FLEET_PUBLISH_INTERVAL_SECONDS,
        clock: Callable[[], int] = time.time_ns,
    ):
        if max_staleness_seconds <= 0:
            raise ValueError(
                f"max_staleness_seconds {max_staleness_seconds}: expected > 0"
            )
        if publish_interval < 0:
            raise ValueError(f"publish_interval {publish_interval}: expected >= 0")
        self.store = store
        self.daemon_id = daemon_id
        self.max_staleness_nanos = int(max_staleness_seconds * NANOS_PER_SECOND)
        self.publish_interval = publish_interval
        self.clock = clock
        self._limits: dict[str, CompiledLimit] = {}
        # Own events: (limit, definition, key) -> decision id -> (time ns,
        # amount); only the active definition's are kept.
        self._own: dict[tuple[str, str, str], dict[str, tuple[int, Amount]]] = {}
        # Other daemons' latest documents as read, and their index:
        # (limit, key) -> daemon id -> events.
        self._documents: dict[str, bytes] = {}
        self._index: dict[tuple[str, str], dict[str, _Events]] = {}
        # Daemon id -> the (limit, key)s its document put in the index.
        self._indexed: dict[str, list[tuple[str, str]]] = {}
        # Daemon id -> limit -> the other definition its document holds
        # that limit under (its events not counted here).
        self._defined_otherwise: dict[str, dict[str, str]] = {}
        # Staleness: a watch running without a loss reported counts as
        # hearing now; otherwise the last time it did (None: never).
        self._watching = False
        self._heard: int | None = None
        self._publish_errors = 0
        self._refused_documents = 0
        self._last_published: int | None = None
        # Digests of this daemon's own latest puts, and when it launched: a
        # document under its id that it did not put, published since, is
        # another daemon using its id (each overwrites the other, and
        # neither sees the other's counts).
        self._puts: collections.deque[bytes] = collections.deque(maxlen=16)
        self._launched: int | None = None
        self._impostor: int | None = None
        self._last_error = ""
        self._dirty: asyncio.Event | None = None
        # Whether the last put found the store connected (dir://: laid out).
        self._connected = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- set-up

    def activate(self, limits: Mapping[str, CompiledLimit]) -> list[str]:
        """Take the fleet-scope limits of a newly active policy set (others
        in ``limits`` are ignored) and return their names. Own events of
        limits no longer declared, or counted under another definition than
        the new one, are dropped, the other daemons' documents indexed again
        for the new set, and the document put again. A limit whose window
        now reaches further back, or that was redefined, needs ``seed`` again
        with the book's events."""
        self._limits = {
            name: limit
            for name, limit in sorted(limits.items())
            if limit.scope == LimitScope.FLEET
        }
        self._own = {
            (name, definition, key): events
            for (name, definition, key), events in self._own.items()
            if name in self._limits and self._limits[name].definition == definition
        }
        self._index.clear()
        self._indexed.clear()
        self._defined_otherwise.clear()
        for daemon_id, data in list(self._documents.items()):
            self._take(daemon_id, data, log=False)
        self._mark()
        return list(self._limits)

    def seed(self, counted: Iterable[Counted]) -> None:
        """Take this daemon's counted decisions as the book holds them
        (read from the log at start, or after ``activate`` brought a limit
        whose window reaches further back or a new definition); events of
        limits not active here, or of another definition, are ignored, one
        already known (by decision id) counts once."""
        self._add(counted)

    def published(self, counted: Iterable[Counted]) -> None:
        """Decisions whose record committed: put them in the next document
        (within ``publish_interval``). Called on the event loop. A decision
        counted under another definition than the active one (made before
        an activation that redefined its limit) is ignored."""
        if self._add(counted):
            self._mark()

    def _add(self, counted: Iterable[Counted]) -> bool:
        added = False
        for entry in counted:
            limit = self._limits.get(entry.limit)
            if limit is None or entry.definition != limit.definition:
                continue
            events = self._own.setdefault(
                (entry.limit, entry.definition, entry.key), {}
            )
            events[entry.decision_id] = (entry.time_nanos, entry.amount)
            added = True
        return added

    def _mark(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    # -- running

    def launch(self) -> None:
        """Start publishing this daemon's document and watching the
        others'; called on the event loop (a policy activation's callback
        too, which cannot await), idempotent. Returns at once: until the
        first read succeeds, ``remote`` answers None. Nothing connects to
        the store before this."""
        if self._tasks:
            return
        self._launched = self.clock()
        self._dirty = asyncio.Event()
        self._dirty.set()
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="kynara-fleet-publish"),
            asyncio.create_task(self._watch_loop(), name="kynara-fleet-watch"),
        ]

    @property
    def started(self) -> bool:
        """Whether ``launch`` ran and ``close`` did not."""
        return bool(self._tasks)

    async def close(self, seconds: float = 5.0) -> bool:
        """Stop both tasks, put the document once more if it changed since
        its last put, and close the store, all within ``seconds``; whether
        everything finished in time.

        A task that does not end when cancelled (a store call stuck where
        cancelling cannot reach it, such as a NATS connect in progress) is
        left behind after ``seconds``. The final put is made only when the
        last one reached the store and both tasks ended: a store that is
        down (or never connected) is not waited for again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        stopped = True
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=seconds)
            stopped = not pending
        self._watching = False
        if (
            stopped
            and tasks
            and self._connected
            and self._dirty is not None
            and self._dirty.is_set()
        ):
            stopped = await _within(self._publish_once(), deadline - loop.time())
        if stopped:
            stopped = await _within(self.store.close(), deadline - loop.time())
        return stopped

    async def _publish_loop(self) -> None:
        assert self._dirty is not None
        failures = 0
        while True:
            _raise_if_cancelled()
            await self._dirty.wait()
            self._dirty.clear()
            if await self._publish_once():
                failures = 0
                await asyncio.sleep(self.publish_interval)
            else:
                failures += 1
                await asyncio.sleep(
                    max(
                        self.publish_interval,
                        retry_delay(
                            failures,
                            _RETRY_MIN_SECONDS,
                            _RETRY_MAX_SECONDS,
                            random.random(),
                        ),
                    )
                )

    async def _publish_once(self) -> bool:
        """Put the document; whether it went (a failure marks it to go
        again, a refusal for its size waits for the next change)."""
        now = self.clock()
        data = encode_document(self.daemon_id, now, self._current(now))
        self._puts.append(hashlib.sha256(data).digest())
        try:
            if not self._connected:
                await self.store.connect()
                _raise_if_cancelled()
                self._connected = True
            await self.store.put_limit_tallies(self.daemon_id, data)
        except StoreUnavailable as err:
            self._connected = False
            self._failed(str(err), logging.WARNING)
            self._mark()
            return False
        except asyncio.CancelledError:
            # Stopped mid-put: ``close`` puts it once more if it can.
            self._mark()
            raise
        except ValueError as err:
            self._failed(
                f"{err}: the other daemons keep this daemon's previous document "
                "and under-count it until fewer decisions are in the windows",
                logging.ERROR,
            )
            return False
        self._last_published = now
        return True

    def _failed(self, error: str, level: int) -> None:
        self._publish_errors += 1
        self._last_error = error
        _log.log(
            level,
            "limit tallies not published",
            extra={"fields": {"store": self.store.url, "error": error}},
        )

    # NOTE: each put carries every own event still in its window, and each
    # reader decodes the whole document again: about 60 ms to build and
    # 50 ms to read 36,000 events (1 MiB, the most a document may hold, at
    # about 29 bytes an event; see sync.MAX_LIMIT_TALLIES_BYTES), on the
    # event loop. Per-key entries or deltas would scale further.
    def _current(self, now: int) -> dict[str, Published]:
        """Own events still in their windows (from each limit's window
        start at ``now`` less ``GRACE_NANOS``), dropping the rest, by
        limit: (definition, key -> events)."""
        body: dict[str, tuple[str, dict[str, list[tuple[int, Amount]]]]] = {}
        oldest: dict[str, int] = {}
        for (name, definition, key), events in list(self._own.items()):
            if name not in oldest:
                start = window_start(self._limits[name].window, now)
                oldest[name] = start - GRACE_NANOS
            cut = oldest[name]
            for decision_id in [d for d, (t, _) in events.items() if t < cut]:
                del events[decision_id]
            if not events:
                del self._own[(name, definition, key)]
                continue
            keys = body.setdefault(name, (definition, {}))[1]
            keys[key] = list(events.values())
        return body

    async def _watch_loop(self) -> None:
        failures = 0
        while True:
            _raise_if_cancelled()
            try:
                # Idempotent; makes what is missing (dir://: the limits
                # directory of a store an older version laid out).
                await self.store.connect()
                _raise_if_cancelled()
                found = await self.store.limit_tallies()
                self._heard = self.clock()
                self._watching = True
                failures = 0
                self._replace(found)
                async for daemon_id, data in self.store.watch_limit_tallies():
                    self._heard = self.clock()
                    self._take(daemon_id, data)
                raise StoreUnavailable(f"{self.store.url}: the watch ended")
            except StoreUnavailable as err:
                if self._watching:
                    self._heard = self.clock()
                self._watching = False
                failures += 1
                _log.warning(
                    "limit tallies watch lost",
                    extra={"fields": {"store": self.store.url, "error": str(err)}},
                )
            await asyncio.sleep(
                retry_delay(
                    failures, _RETRY_MIN_SECONDS, _RETRY_MAX_SECONDS, random.random()
                )
            )

    def _replace(self, found: Mapping[str, bytes]) -> None:
        """Every daemon's document as one read found them: those gone are
        forgotten."""
        for daemon_id in [d for d in self._documents if d not in found]:
            self._take(daemon_id, b"")
        for daemon_id, data in found.items():
            self._take(daemon_id, data)

    def _take(self, daemon_id: str, data: bytes, *, log: bool = True) -> None:
        """Index ``daemon_id``'s document ``data`` in place of its previous
        one (``b""``: it was removed). This daemon's own is not indexed."""
        if daemon_id == self.daemon_id:
            self._check_own(data)
            return
        for pair in self._indexed.pop(daemon_id, ()):
            daemons = self._index.get(pair)
            if daemons is not None:
                daemons.pop(daemon_id, None)
                if not daemons:
                    del self._index[pair]
        if not data:
            self._documents.pop(daemon_id, None)
            self._defined_otherwise.pop(daemon_id, None)
            return
        self._documents[daemon_id] = data
        try:
            document = decode_document(data)
            if document.daemon_id != daemon_id:
                raise ValueError(
                    f"it names daemon {document.daemon_id[:_MAX_LOGGED]!r}, "
                    "not the one it is stored under"
                )
            indexed = self._index_document(daemon_id, document)
        except ValueError as err:
            if log:
                self._refused_documents += 1
                _log.error(
                    "limit tallies document refused",
                    extra={
                        "fields": {
                            "store": self.store.url,
                            # Not "daemon_id": every line carries this
                            # daemon's own under that name.
                            "from_daemon": daemon_id[:_MAX_LOGGED],
                            "error": str(err)[: _MAX_LOGGED * 4],
                        }
                    },
                )
            return
        self._indexed[daemon_id] = indexed
        for pair, events in indexed.items():
            self._index.setdefault(pair, {})[daemon_id] = events
        self._note_definitions(daemon_id, document, log=log)

    def _note_definitions(
        self, daemon_id: str, document: _Document, *, log: bool
    ) -> None:
        """Keep which active limits ``daemon_id``'s document holds under
        another definition (not counted here); a WARNING when that changes."""
        otherwise = {
            name: entry.definition
            for name, entry in document.limits.items()
            if name in self._limits
            and entry.definition != self._limits[name].definition
        }
        before = self._defined_otherwise.get(daemon_id, {})
        if otherwise:
            self._defined_otherwise[daemon_id] = otherwise
        else:
            self._defined_otherwise.pop(daemon_id, None)
        changed = {n: d for n, d in otherwise.items() if before.get(n) != d}
        if not log or not changed:
            return
        for name, definition in sorted(changed.items()):
            _log.warning(
                "fleet limit defined otherwise by another daemon: its counts "
                "of it are not added",
                extra={
                    "fields": {
                        "store": self.store.url,
                        "from_daemon": daemon_id[:_MAX_LOGGED],
                        "limit": name,
                        "their_definition": definition[:_MAX_LOGGED],
                        "definition": self._limits[name].definition,
                    }
                },
            )

    def _index_document(
        self, daemon_id: str, document: _Document
    ) -> dict[tuple[str, str], _Events]:
        """The events of ``document`` for active fleet limits defined as
        they are here, by (limit, key); a limit under another definition is
        skipped. Raises ValueError naming an event of the wrong type."""
        indexed = {}
        for name, entry in document.limits.items():
            limit = self._limits.get(name)
            if limit is None:
                continue  # not declared here (yet): another policy revision
            if entry.definition != limit.definition:
                continue  # counts something else: none of it is this one's
            integral = isinstance(limit.ceiling, int)
            for key, events in entry.keys.items():
                for time_nanos, amount in events:
                    if isinstance(amount, int) != integral or not amount >= 0:
                        raise ValueError(
                            f"limit {name!r} key {key[:_MAX_LOGGED]!r}: amount "
                            f"{amount!r} at {time_nanos}: expected a non-negative "
                            f"{'integer' if integral else 'double'}"
                        )
                    if not integral and not math.isfinite(amount):
                        raise ValueError(
                            f"limit {name!r} key {key[:_MAX_LOGGED]!r}: amount "
                            f"{amount!r} at {time_nanos}: expected a finite double"
                        )
                if events:
                    indexed[(name, key)] = _Events(list(events), integral)
        return indexed

    # -- reading

    def remote(
        self, limit: CompiledLimit | str, key: str, start_nanos: int
    ) -> Tally | None:
        """What the other daemons' latest documents hold for ``key`` of the
        fleet limit ``limit`` at or after ``start_nanos``, counted under its
        active definition; None when this daemon has not heard from the
        store within ``max_staleness_seconds`` (the limit is then absent).
        A sum of doubles is the exact sum rounded once.

        Raises:
            KeyError: ``limit`` is no active fleet-scope limit, or (a
                ``CompiledLimit``) is defined otherwise than the active one.
        """
        name = limit if isinstance(limit, str) else limit.name
        compiled = self._limits.get(name)
        if compiled is None:
            raise KeyError(f"limit {name!r}: no active fleet-scope limit")
        if not isinstance(limit, str) and limit.definition != compiled.definition:
            raise KeyError(
                f"limit {name!r}: definition {limit.definition!r}, the active "
                f"one is {compiled.definition!r}"
            )
        if self.stale():
            return None
        count = total = 0
        for events in self._index.get((name, key), {}).values():
            held, amount = events.since(start_nanos)
            count += held
            total += amount
        if isinstance(compiled.ceiling, int):
            return Tally(count, total)
        return Tally(count, rounded_sum(0, total))

    def _check_own(self, data: bytes) -> None:
        """A document under this daemon's id that it did not put, published
        since it launched: another daemon runs with the same
        ``identity.daemon_id``; fleet limits fail closed for a while."""
        if not data or hashlib.sha256(data).digest() in self._puts:
            return
        try:
            published = decode_document(data).published_at
        except ValueError:
            published = self.clock()
        if self._launched is None or published < self._launched:
            return  # this daemon's own from before it started
        if self._impostor is None:
            _log.error(
                "another daemon puts limit tallies under this daemon's id: "
                "fleet limits fail closed (identity.daemon_id must be unique)",
                extra={
                    "fields": {"store": self.store.url, "setting": "identity.daemon_id"}
                },
            )
        self._impostor = self.clock()

    def stale(self) -> bool:
        """Whether this daemon has not heard from the store within
        ``max_staleness_seconds`` (or at all), or another daemon put a
        document under its id within that time."""
        now = self.clock()
        if self._impostor is not None:
            if now - self._impostor <= self.max_staleness_nanos:
                return True
            self._impostor = None
        if self._watching:
            return False
        return self._heard is None or now - self._heard > self.max_staleness_nanos

    def status(self) -> dict[str, Any]:
        """For metrics and the daemon's status: other daemons whose
        documents are held, when the store was last heard from (ns; None
        never), whether fleet limits are stale (absent), publish errors,
        documents refused, the last successful put (ns), the last publish
        error, and how many (daemon, limit) pairs are held under another
        definition than the active one (not counted)."""
        watching = self._watching
        return {
            "fleet_limits": sorted(self._limits),
            "daemons_seen": len(self._documents),
            "defined_otherwise": sum(map(len, self._defined_otherwise.values())),
            "last_heard_ns": self.clock() if watching else self._heard,
            "watching": watching,
            "stale": self.stale(),
            "publish_errors": self._publish_errors,
            "refused_documents": self._refused_documents,
            "last_published_ns": self._last_published,
            "last_publish_error": self._last_error,
        }
