"""``dir://PATH``: a central store that is a directory on one machine or a
shared volume.

Every file is written whole to a temporary file in its final directory
(named ``.tmp-*``), flushed with ``fsync``, then renamed into place, and the
directory is synced so the rename survives a crash. A rename within one
directory is atomic, so a reader finds the old file or the new one, never
part of one; readers only ever open the final names below and so never
read a temporary file a crash left behind.

Layout under the root (which must already exist: a missing root is most
likely a shared volume that is not mounted, and creating an empty store in
its place would hide that)::

    bundles/sha256-<hex>            a bundle's bytes, write-once, by digest
    bundles/current                 "sha256:<hex>\\n": the current bundle
    directory/sha256-<hex>          a signed directory update, by digest
    directory/current               "sha256:<hex>\\n": the current one
    segments/<daemon>/<seq>.msg     one segment message: the message id on
                                    the first line, then the Segment bytes
    segments/<daemon>/ids/<sha256 of msg id>
                                    the message's seq; marks it as stored
    consumers/<consumer>/<daemon>   the last seq that consumer acknowledged
                                    for that daemon (every one before it
                                    was acknowledged too)
    status/<daemon>.json            the daemon's latest status document
    approvals/<daemon>/<approval id>.json
                                    an approval's latest published state
    reviews/<daemon>/<approval id>.<review id>.json
                                    a signed review for that daemon to take
    limits/<daemon>.json            the daemon's latest limit tallies
                                    (``limits.fleet``)

``<daemon>`` is ``daemon_token(daemon_id)``, ``<seq>`` 20 decimal digits
from 1, in ship order. A bundle is published by writing its content file,
then replacing ``current``; since content files are never removed, a
reader that read ``current`` always finds the bundle it names. A signed
directory update (``sync.directory``) is published alike under
``directory/``; since a collector publishes one on every change and each
can be megabytes, publishing removes every update but the new one and the
one it replaces, and a reader that finds the update ``current`` named
already removed (two publishes behind) reads ``current`` again. Publishes
hold ``directory/.publish.lock`` (``flock``) from reading ``current`` to
the last removal: two publishers at once (a collector's stop and the
publish it interrupted, a hand ``directory publish`` beside a running
collector) would otherwise each remove the update the other just named.
A publish waits for the lock at most half its timeout, then fails with
``StoreUnavailable`` naming it.

A new segment message takes the next free ``<seq>`` with ``os.link``, which
refuses to replace an existing name: two processes shipping for one
daemon cannot overwrite each other's message (the loser takes the next
number); two shipping for different daemons never meet. The id marker is
written after the message, so a crash between the two leaves a message
without a marker; a shipper resends its oldest unacknowledged message, so
the resend finds that message last in its daemon's directory and is
recognised as a duplicate then.

A consumer reads each daemon's messages in ``<seq>`` order from the
position after its last acknowledgement, taking one message per daemon in
turn and waiting ``poll_seconds`` when none has anything new. File I/O runs
in worker threads, each call bounded by ``timeout``: a hung network volume
makes the call fail with ``StoreUnavailable`` rather than stall the loop.

Whoever can write the directory can put anything in it, and one bad entry
must not stop the consumer for every daemon. So, each logged at ERROR
(``kynara.sync``) and the others read on:

- a name under ``segments/`` that is not a directory is skipped;
- a directory whose name is not a canonical ``daemon_token`` is read, and
  its messages delivered with ``daemon_id`` ``""`` (never a registered
  daemon), so the consumer refuses them and acknowledges past them;
- a ``<seq>.msg`` that is not a file, or has no id line, is delivered
  with the bytes it has (none for a directory), for the consumer to
  refuse; an id line that is not UTF-8 is decoded with replacements;
- a message file larger than ``MAX_MESSAGE_FILE_BYTES`` is delivered cut
  at that size: more than any consumer takes (the collector refuses
  anything over 4 MiB), so it is refused without being read whole.

A shipper reading its tail treats such a message as someone else's and
takes the next number.

Approvals and reviews are replaced or created with the same atomic rename,
and read with the same care: regular files only, never past
``MAX_APPROVAL_BYTES`` or ``MAX_REVIEW_BYTES`` (a larger one is skipped
and logged), names that are no daemon token or store key skipped and
logged once per reader. A watch lists the directories every
``poll_seconds`` and reads only the files whose inode, size or time
changed since it last looked (a put is a rename: a new inode). Limit
tallies are written and read alike (``MAX_LIMIT_TALLIES_BYTES``), and
watched the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from kynara_sidecar.errors import ConfigError
from kynara_sidecar.sync import (
    MAX_APPROVAL_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_DIRECTORY_BYTES,
    MAX_LIMIT_TALLIES_BYTES,
    MAX_REVIEW_BYTES,
    BundleEntry,
    BundleTooLarge,
    PublishedApproval,
    PublishedReview,
    StoreUnavailable,
    canonical_daemon_id,
    check_consumer_name,
    check_store_key,
    daemon_token,
)

__all__ = [
    "MAX_MESSAGE_FILE_BYTES",
    "MAX_OUTSTANDING_CALLS",
    "NAK_DELAY_SECONDS",
    "DirStore",
]

_log = logging.getLogger("kynara.sync")

_T = TypeVar("_T")
# Calls not yet returned, by store root, for every DirStore of the process
# (a consumer reconnecting makes a new one; a hung mount must not get 16
# more threads each time). Daemons and tests may run several loops.
_OUTSTANDING: dict[str, int] = {}
_OUTSTANDING_LOCK = threading.Lock()
# The `current` pointer and a consumer position are one short line each.
_MAX_POINTER_BYTES = 256
# A daemon's status document is a few kilobytes.
_MAX_STATUS_BYTES = 1024 * 1024
# Store calls that may be outstanding at once (each on a thread of its own):
# past this many, a hung mount fails new calls at once rather than pile up
# threads.
MAX_OUTSTANDING_CALLS = 16
# How often a directory publish tries the publish lock another holds: a
# publish takes milliseconds, and the call's timeout bounds the wait.
_LOCK_POLL_SECONDS = 0.01
_SEQ_DIGITS = 20
_MESSAGE = re.compile(r"^(\d{20})\.msg$")
_TMP_PREFIX = ".tmp-"
_DIGEST_PREFIX = "sha256:"
_FILE_MODE = 0o644
# A nak'd message comes again after this pause, as with NATS's nak delay.
NAK_DELAY_SECONDS = 1.0
# A shipped message is at most 512 KiB of records and a checkpoint; a file
# past this is read only this far (see the module doc).
MAX_MESSAGE_FILE_BYTES = 8 << 20
# Attacker-chosen names are cut to this in log lines.
_MAX_LOGGED_NAME = 128


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: pathlib.Path, data: bytes) -> pathlib.Path:
    """``data`` in a new synced temporary file in ``directory``."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return pathlib.Path(name)


@contextlib.contextmanager
def _locked(path: pathlib.Path, seconds: float, url: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); one
    holder at a time across threads and processes, each opening its own.

    Waits at most ``seconds``: a holder that is stopped (SIGSTOP, a frozen
    container) must not leave this thread blocked, counted against
    MAX_OUTSTANDING_CALLS, and writing long after its caller gave up.

    Raises:
        StoreUnavailable: another publisher held the lock all that time.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        # Made by another user (a hand publish as root): replacing and
        # removing updates needs only the folder's write permission, and a
        # lock taken through a read-only descriptor serves as well.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(
                        f"{url}: {path} was held by another publisher for {seconds:g} s"
                    ) from None
                time.sleep(_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new."""
    temp = _write_temp(path.parent, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _link_new(path: pathlib.Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether it did."""
    temp = _write_temp(path.parent, data)
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


@dataclasses.dataclass(frozen=True)
class _Message:
    seq: int
    msg_id: str
    data: bytes


def _encode_message(msg_id: str, data: bytes) -> bytes:
    return msg_id.encode() + b"\n" + data


def _decode_message(seq: int, raw: bytes, path: pathlib.Path) -> _Message:
    head, sep, data = raw.partition(b"\n")
    if not sep:
        _malformed("a segment message with no id line", path)
        return _Message(seq, "", raw)
    return _Message(seq, head.decode(errors="replace"), data)


class _NotAFile(OSError):
    """A store entry that is not a regular file (a FIFO, a device, a
    symlink, a directory): never read, so it can neither hang a call nor
    feed it without end."""


def _read_file(path: pathlib.Path, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the regular file at ``path``.

    The store writes only regular files, renamed into place; anything else
    there was put by someone else. It is opened without blocking and without
    following a symlink, and refused unless fstat says it is a regular file.

    Raises:
        FileNotFoundError: nothing there.
        _NotAFile: something other than a regular file there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _NotAFile(errno.ELOOP, "a symlink, not a file", str(path)) from None
        if err.errno == errno.EISDIR:
            raise _NotAFile(
                errno.EISDIR, "a directory, not a file", str(path)
            ) from None
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise _NotAFile(errno.EINVAL, "not a regular file", str(path))
    with os.fdopen(fd, "rb") as file:
        return file.read(limit + 1)


def _read_message_file(path: pathlib.Path) -> bytes:
    """The file's bytes, at most ``MAX_MESSAGE_FILE_BYTES`` of them; b""
    for anything but a regular file (an entry to refuse). Raises
    FileNotFoundError."""
    try:
        return _read_file(path, MAX_MESSAGE_FILE_BYTES)[:MAX_MESSAGE_FILE_BYTES]
    except _NotAFile as err:
        _malformed(f"a segment message that is {err.strerror}", path)
        return b""


def _malformed(what: str, path: pathlib.Path) -> None:
    _log.error(
        "malformed store entry",
        extra={"fields": {"entry": str(path)[-_MAX_LOGGED_NAME:], "error": what}},
    )


class DirStore:
    """A central store in the directory ``url`` names; see the module doc.

    Args:
        url: ``dir:///absolute/path`` or ``dir://relative/path`` (relative to
            the working directory).
        timeout: seconds one call may take before it raises
            ``StoreUnavailable``.
        poll_seconds: how often ``watch_bundles`` reads ``current`` and
            ``segments`` looks for new messages.
        timeout_key: the setting ``timeout`` came from, named when a call
            runs out of it (the collector's is ``store.timeout_seconds``).
        setting: the setting ``url`` came from, named as the one to fix
            when the directory is missing; "" for "the setting that names
            it" (the same store may be opened for several settings).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        poll_seconds: float = 1.0,
        timeout_key: str = "sync.timeout_seconds",
        setting: str = "",
    ):
        scheme, sep, rest = url.partition("://")
        if scheme != "dir" or not sep or not rest:
            raise ConfigError(f"{url!r}: expected dir:///absolute/path")
        self.url = url
        self.root = pathlib.Path(rest)
        self.timeout = timeout
        self.timeout_key = timeout_key
        self.setting = setting
        self.poll_seconds = poll_seconds
        self._bundles = self.root / "bundles"
        self._directory = self.root / "directory"
        self._segments = self.root / "segments"
        self._consumers = self.root / "consumers"
        self._status = self.root / "status"
        self._approvals = self.root / "approvals"
        self._reviews = self.root / "reviews"
        self._limits = self.root / "limits"
        # Entries refused once by this store's readers: logged once each.
        self._refused: set[str] = set()
        # Per daemon token: the last seq this process knows of, so shipping
        # lists a daemon's directory once, not on every message.
        self._tails: dict[str, int] = {}

    async def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        key = str(self.root)
        if _OUTSTANDING.get(key, 0) >= MAX_OUTSTANDING_CALLS:
            raise StoreUnavailable(
                f"{self.url}: {what}: {_OUTSTANDING[key]} earlier calls have not "
                f"returned after {self.timeout} s (a hung mount?); not starting "
                "another until they do"
            )
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancellation (gh-86296) and hang the daemon's stop.
            async with asyncio.timeout(self.timeout):
                return await self._on_own_thread(fn)
        except StoreUnavailable:
            raise
        except TimeoutError as err:
            raise StoreUnavailable(
                f"{self.url}: {what} took longer than {self.timeout} s "
                f"({self.timeout_key})"
            ) from err
        except OSError as err:
            where = err.filename or self.root
            raise StoreUnavailable(
                f"{self.url}: {what}: {where}: {err.strerror or err}"
            ) from err

    def _on_own_thread(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``fn`` on a daemon thread of its own.

        A call into a hung mount blocks in the kernel and can be neither
        cancelled nor joined. On the loop's shared executor each such call
        would hold a worker for good, and once all were held the daemon's
        own thread work (its writer, its stop) would queue behind them; a
        daemon thread holds only itself and never delays the exit. At most
        ``MAX_OUTSTANDING_CALLS`` may be outstanding at once.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()

        def settle(result: _T | None, error: BaseException | None) -> None:
            with _OUTSTANDING_LOCK:
                _OUTSTANDING[key] -= 1
            if future.done():
                return  # the caller gave up (a timeout, a stop)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def run() -> None:
            try:
                result, error = fn(), None
            except BaseException as err:  # handed to the caller as is
                result, error = None, err
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle, result, error)

        key = str(self.root)
        with _OUTSTANDING_LOCK:
            _OUTSTANDING[key] = _OUTSTANDING.get(key, 0) + 1
        threading.Thread(target=run, name="kynara-dir-store", daemon=True).start()
        return future

    async def connect(self) -> None:
        """Check the root is a writable directory and create the layout.

        Raises:
            StoreUnavailable: the root is missing, not a directory or not
                writable (the message names the path).
        """
        await self._call("connect", self._connect)

    def _connect(self) -> None:
        if not self.root.is_dir():
            fix = self.setting or "the setting that names it"
            raise StoreUnavailable(
                f"{self.url}: {self.root} is not a directory (create it or mount "
                f"the volume, or fix {fix})"
            )
        for path in (
            self._bundles,
            self._directory,
            self._segments,
            self._consumers,
            self._status,
            self._approvals,
            self._reviews,
            self._limits,
        ):
            path.mkdir(exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise StoreUnavailable(f"{self.url}: {path} is not writable")
        _fsync_dir(self.root)

    async def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # -- bundles

    async def publish_bundle(self, data: bytes) -> str:
        digest = _DIGEST_PREFIX + hashlib.sha256(data).hexdigest()
        await self._call("publish bundle", lambda: self._publish(digest, data))
        return digest

    def _content_path(
        self, digest: str, folder: pathlib.Path | None = None
    ) -> pathlib.Path:
        return (folder or self._bundles) / digest.replace(":", "-", 1)

    def _publish(
        self, digest: str, data: bytes, folder: pathlib.Path | None = None
    ) -> None:
        folder = folder or self._bundles
        content = self._content_path(digest, folder)
        if not content.exists():
            _write_atomic(content, data)
        _write_atomic(folder / "current", f"{digest}\n".encode())

    async def current_bundle(self) -> BundleEntry | None:
        return await self._call("read current bundle", self._current)

    def _require_dir(self, path: pathlib.Path) -> None:
        """Raise ``StoreUnavailable`` when ``path``, one of the store's
        folders, is not there: a store never recreates its own folders, so
        an unmounted volume is reported rather than written around."""
        if not path.is_dir():
            raise StoreUnavailable(
                f"{self.url}: {path} is missing (is the volume mounted?)"
            )

    def _current_digest(self, folder: pathlib.Path | None = None) -> str | None:
        folder = folder or self._bundles
        try:
            raw = _read_file(folder / "current", _MAX_POINTER_BYTES)
        except FileNotFoundError:
            raw = None
        if raw is None:
            self._require_dir(folder)
            return None
        text = raw.decode("ascii", errors="replace").strip()
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
            raise StoreUnavailable(
                f"{self.url}: {folder / 'current'}: expected sha256:<hex>, "
                f"got {text[:80]!r}"
            )
        return text

    def _current(
        self,
        folder: pathlib.Path | None = None,
        limit: int = MAX_BUNDLE_BYTES,
        what: str = "a policy bundle",
    ) -> BundleEntry | None:
        folder = folder or self._bundles
        digest = self._current_digest(folder)
        if digest is None:
            return None
        path = self._content_path(digest, folder)
        data = _read_file(path, limit)
        if len(data) > limit:
            raise BundleTooLarge(
                f"{self.url}: {path}: larger than {limit} bytes; expected {what}"
            )
        if _DIGEST_PREFIX + hashlib.sha256(data).hexdigest() != digest:
            raise StoreUnavailable(
                f"{self.url}: {path}: content does not match its digest (corrupt)"
            )
        return BundleEntry(digest=digest, data=data)

    def watch_bundles(self) -> AsyncIterator[BundleEntry]:
        """The current bundle, then each new one, read every poll_seconds.

        Raises:
            StoreUnavailable: the directory could not be read; the caller
                connects and watches again.
        """
        return self._watch("read current bundle", self._bundles, self._current)

    async def _watch(
        self,
        what: str,
        folder: pathlib.Path,
        read: Callable[[], BundleEntry | None],
    ) -> AsyncIterator[BundleEntry]:
        """``read``'s entry, then each new one ``folder/current`` names,
        polled every poll_seconds (``watch_bundles``, ``watch_directory``)."""
        seen: str | None = None
        while True:
            digest = await self._call(what, lambda: self._current_digest(folder))
            if digest is not None and digest != seen:
                entry = await self._call(what, read)
                if entry is not None:
                    seen = entry.digest
                    yield entry
                    continue
            await asyncio.sleep(self.poll_seconds)

    # -- signed directory

    async def publish_directory(self, digest: str, data: bytes) -> None:
        """Make ``data`` (a signed directory update, whose ``bundle_digest``
        is ``digest``) the current directory, and remove older updates but
        the one it replaces.

        Raises:
            ValueError: ``digest`` is not ``data``'s digest.
            BundleTooLarge: ``data`` is larger than ``MAX_DIRECTORY_BYTES``.
        """
        _check_digest(digest, data)
        if len(data) > MAX_DIRECTORY_BYTES:
            raise BundleTooLarge(
                f"{self.url}: a directory update of {len(data)} bytes exceeds "
                f"MAX_DIRECTORY_BYTES ({MAX_DIRECTORY_BYTES})"
            )
        await self._call(
            "publish directory", lambda: self._publish_directory(digest, data)
        )

    def _publish_directory(self, digest: str, data: bytes) -> None:
        self._require_dir(self._directory)
        # Half the call's time, so its own error, naming the lock, is the
        # one the caller sees.
        lock = self._directory / ".publish.lock"
        with _locked(lock, self.timeout / 2, self.url):
            self._replace_directory(digest, data)

    def _replace_directory(self, digest: str, data: bytes) -> None:
        previous = self._current_digest(self._directory)
        self._publish(digest, data, self._directory)
        keep = {
            self._content_path(d, self._directory).name for d in (digest, previous) if d
        }
        for path in self._directory.iterdir():
            if path.name.startswith("sha256-") and path.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    async def current_directory(self) -> BundleEntry | None:
        """The current signed directory update, or None when none was
        published."""
        return await self._call("read current directory", self._current_directory)

    def _current_directory(self) -> BundleEntry | None:
        # The update ``current`` names may be removed by a publish two
        # updates on between reading the pointer and the file: read again.
        for _ in range(3):
            try:
                return self._current(
                    self._directory, MAX_DIRECTORY_BYTES, "a directory update"
                )
            except FileNotFoundError:
                continue
        return self._current(self._directory, MAX_DIRECTORY_BYTES, "a directory update")

    def watch_directory(self) -> AsyncIterator[BundleEntry]:
        """The current signed directory update, then each new one, read
        every poll_seconds.

        Raises:
            StoreUnavailable: the directory could not be read; the caller
                connects and watches again.
        """
        return self._watch(
            "read current directory", self._directory, self._current_directory
        )

    # -- segments

    async def ship_segment(self, daemon_id: str, msg_id: str, data: bytes) -> bool:
        if "\n" in msg_id or not msg_id:
            raise ValueError(f"segment message id {msg_id!r}: empty or has a newline")
        return await self._call(
            f"ship segment message {msg_id}",
            lambda: self._ship(daemon_token(daemon_id), msg_id, data),
        )

    def _marker(self, directory: pathlib.Path, msg_id: str) -> pathlib.Path:
        return directory / "ids" / hashlib.sha256(msg_id.encode()).hexdigest()

    def _ship(self, token: str, msg_id: str, data: bytes) -> bool:
        directory = self._segments / token
        tail = self._tails.get(token)
        if tail is None:
            self._require_dir(self._segments)
            # Never parents=True: that would recreate a missing root.
            directory.mkdir(exist_ok=True)
            (directory / "ids").mkdir(exist_ok=True)
            _fsync_dir(self._segments)
        marker = self._marker(directory, msg_id)
        if marker.exists():
            return False
        if tail is None:
            tail = self._scan_tail(directory)
        # A crash between message and marker: the resend meets its own
        # message last in the directory.
        if tail and self._read_id(directory, tail) == msg_id:
            _write_atomic(marker, str(tail).encode())
            self._tails[token] = tail
            return False
        raw = _encode_message(msg_id, data)
        seq = tail + 1
        while not _link_new(directory / f"{seq:0{_SEQ_DIGITS}d}.msg", raw):
            # Another process took that number for this daemon.
            if self._read_id(directory, seq) == msg_id:
                _write_atomic(marker, str(seq).encode())
                self._tails[token] = seq
                return False
            seq += 1
        _write_atomic(marker, str(seq).encode())
        self._tails[token] = seq
        return True

    def _scan_tail(self, directory: pathlib.Path) -> int:
        return max(self._seqs(directory), default=0)

    def _seqs(self, directory: pathlib.Path) -> list[int]:
        return sorted(
            int(match.group(1))
            for name in os.listdir(directory)
            if (match := _MESSAGE.match(name))
        )

    def _read_id(self, directory: pathlib.Path, seq: int) -> str:
        path = directory / f"{seq:0{_SEQ_DIGITS}d}.msg"
        return _decode_message(seq, _read_message_file(path), path).msg_id

    async def segments(self, consumer: str) -> AsyncIterator[_DirDelivery]:
        """Every daemon's messages after ``consumer``'s acknowledged ones,
        each daemon's in order, polling for new ones until the caller stops.

        A delivery neither acked nor nak'd is not offered again by this
        iterator; a new one (after a restart) starts after the last
        acknowledged message, so it comes again then.

        Raises:
            ConfigError: ``consumer`` is not a valid consumer name.
            StoreUnavailable: the directory could not be read or written.
        """
        cursor = _Cursor(self, check_consumer_name(consumer))
        await self._call("open consumer", cursor.open)
        while True:
            deliveries = await self._call("read segments", cursor.next_round)
            for delivery in deliveries:
                yield delivery
            if not deliveries:
                await asyncio.sleep(self.poll_seconds)

    # -- status

    async def put_status(self, daemon_id: str, data: bytes) -> None:
        path = self._status / f"{daemon_token(daemon_id)}.json"
        await self._call(
            f"write status of {daemon_id}", lambda: _write_atomic(path, data)
        )

    async def statuses(self) -> dict[str, bytes]:
        return await self._call("read statuses", self._statuses)

    def _statuses(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for path in sorted(self._status.iterdir()):
            if path.name.startswith(".") or path.suffix != ".json":
                continue
            daemon_id = canonical_daemon_id(path.stem)
            if daemon_id is None:
                _malformed("a status file not named by a daemon token", path)
                continue
            try:
                data = _read_file(path, _MAX_STATUS_BYTES)
            except FileNotFoundError:
                continue
            except _NotAFile as err:
                _malformed(f"a status entry that is {err.strerror}", path)
                continue
            if len(data) > _MAX_STATUS_BYTES:
                _malformed(f"a status file over {_MAX_STATUS_BYTES} bytes", path)
                continue
            found[daemon_id] = data
        return found

    # -- approvals and reviews

    async def put_approval(self, daemon_id: str, approval_id: str, data: bytes) -> None:
        name = f"{check_store_key(approval_id, 'approval id')}.json"
        _check_size(data, MAX_APPROVAL_BYTES, "approval")
        await self._call(
            f"put approval {approval_id}",
            lambda: self._put_in(self._approvals, daemon_id, name, data),
        )

    async def put_review(
        self, daemon_id: str, approval_id: str, review_id: str, data: bytes
    ) -> None:
        check_store_key(approval_id, "approval id")
        name = f"{approval_id}.{check_store_key(review_id, 'review id')}.json"
        _check_size(data, MAX_REVIEW_BYTES, "review")
        await self._call(
            f"put review {review_id}",
            lambda: self._put_in(self._reviews, daemon_id, name, data),
        )

    def _put_in(
        self, base: pathlib.Path, daemon_id: str, name: str, data: bytes
    ) -> None:
        self._require_dir(base)
        directory = base / daemon_token(daemon_id)
        if not directory.is_dir():
            # Never parents=True: that would recreate a missing root.
            directory.mkdir(exist_ok=True)
            _fsync_dir(base)
        _write_atomic(directory / name, data)

    async def approvals(self) -> list[PublishedApproval]:
        return await self._call(
            "read approvals", lambda: list(self._read_approvals({}, None))
        )

    async def watch_approvals(self) -> AsyncIterator[PublishedApproval]:
        """Every approval, then each one put since, every poll_seconds.

        Raises:
            StoreUnavailable: the directory could not be read.
        """
        seen: dict[pathlib.Path, tuple[int, int, int]] = {}
        # Path -> (daemon id, approval id) of what was yielded, so a file
        # gone at the next scan is reported removed.
        named: dict[pathlib.Path, tuple[str, str]] = {}
        while True:
            found = await self._call(
                "read approvals",
                lambda: list(self._read_approvals(seen, seen, named)),
            )
            for entry in found:
                yield entry
            await asyncio.sleep(self.poll_seconds)

    def _read_approvals(
        self,
        known: dict[pathlib.Path, tuple[int, int, int]],
        update: dict[pathlib.Path, tuple[int, int, int]] | None,
        named: dict[pathlib.Path, tuple[str, str]] | None = None,
    ) -> Iterator[PublishedApproval]:
        present = set()
        for daemon_id, path, parts, signature in self._entries(self._approvals, 1):
            present.add(path)
            if known.get(path) == signature:
                continue
            data = self._read_entry(path, MAX_APPROVAL_BYTES, "approval")
            if update is not None:
                update[path] = signature
            if data is not None:
                if named is not None:
                    named[path] = (daemon_id, parts[0])
                yield PublishedApproval(daemon_id, parts[0], data)
        if named is None or update is None:
            return
        for path in [p for p in named if p not in present]:
            daemon_id, approval_id = named.pop(path)
            update.pop(path, None)
            yield PublishedApproval(daemon_id, approval_id, b"", deleted=True)

    async def reviews(self, daemon_id: str) -> list[PublishedReview]:
        return await self._call(
            f"read reviews of {daemon_id}",
            lambda: self._read_reviews(daemon_id, set()),
        )

    async def watch_reviews(
        self, daemon_id: str
    ) -> AsyncIterator[list[PublishedReview]]:
        """The daemon's reviews, then each new one, every poll_seconds; one
        batch per scan.

        Raises:
            StoreUnavailable: the directory could not be read.
        """
        seen: set[pathlib.Path] = set()
        while True:
            found = await self._call(
                f"read reviews of {daemon_id}",
                lambda: self._read_reviews(daemon_id, seen, drop_bad=True),
            )
            if found:
                yield found
            await asyncio.sleep(self.poll_seconds)

    def _read_reviews(
        self, daemon_id: str, seen: set[pathlib.Path], *, drop_bad: bool = False
    ) -> list[PublishedReview]:
        found = []
        present = set()
        for owner, path, parts, _ in self._entries(
            self._reviews, 2, daemon_token(daemon_id), drop_bad=drop_bad
        ):
            present.add(path)
            if path in seen:
                continue
            seen.add(path)
            data = self._read_entry(path, MAX_REVIEW_BYTES, "review")
            if data is None and drop_bad and _oversized(path, MAX_REVIEW_BYTES):
                # Logged once by _read_entry; it can be no review, and it is
                # in this daemon's own namespace: gone, not logged again.
                _unlink_synced(path)
            if data is not None:
                found.append(PublishedReview(owner, parts[0], parts[1], data))
        # A dropped review's name may not come again, but forget it anyway:
        # the set stays as small as the directory.
        seen &= present
        return found

    async def drop_review(
        self, daemon_id: str, approval_id: str, review_id: str
    ) -> None:
        check_store_key(approval_id, "approval id")
        check_store_key(review_id, "review id")
        path = (
            self._reviews / daemon_token(daemon_id) / f"{approval_id}.{review_id}.json"
        )
        await self._call(f"drop review {review_id}", lambda: _unlink_synced(path))

    # -- limit tallies

    async def put_limit_tallies(self, daemon_id: str, data: bytes) -> None:
        _check_size(data, MAX_LIMIT_TALLIES_BYTES, "limit tallies document")
        path = self._limits / f"{daemon_token(daemon_id)}.json"

        def put() -> None:
            self._require_dir(self._limits)
            _write_atomic(path, data)

        await self._call(f"write limit tallies of {daemon_id}", put)

    async def limit_tallies(self) -> dict[str, bytes]:
        return await self._call(
            "read limit tallies",
            lambda: dict(self._read_limit_tallies({}, None)),
        )

    async def watch_limit_tallies(self) -> AsyncIterator[tuple[str, bytes]]:
        """Every daemon's document, then each one put or removed since,
        every poll_seconds (a removed one as ``b""``).

        Raises:
            StoreUnavailable: the directory could not be read.
        """
        seen: dict[pathlib.Path, tuple[int, int, int]] = {}
        named: dict[pathlib.Path, str] = {}
        while True:
            found = await self._call(
                "read limit tallies",
                lambda: list(self._read_limit_tallies(seen, named)),
            )
            for entry in found:
                yield entry
            await asyncio.sleep(self.poll_seconds)

    def _read_limit_tallies(
        self,
        seen: dict[pathlib.Path, tuple[int, int, int]],
        named: dict[pathlib.Path, str] | None,
    ) -> Iterator[tuple[str, bytes]]:
        """(daemon id, document) of each file whose (inode, size, mtime)
        is not in ``seen`` (updated); with ``named`` (path -> daemon id of
        what was yielded), each file gone since as (daemon id, b"")."""
        self._require_dir(self._limits)
        present = set()
        for entry in sorted(os.scandir(self._limits), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = pathlib.Path(entry.path)
            stem, dot, suffix = entry.name.rpartition(".")
            daemon_id = canonical_daemon_id(stem) if dot and suffix == "json" else None
            if daemon_id is None:
                self._refuse("a limit tallies file not named by a daemon token", path)
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            present.add(path)
            signature = (info.st_ino, info.st_size, info.st_mtime_ns)
            if seen.get(path) == signature:
                continue
            seen[path] = signature
            data = self._read_entry(path, MAX_LIMIT_TALLIES_BYTES, "limit tallies")
            if data is not None:
                if named is not None:
                    named[path] = daemon_id
                yield daemon_id, data
        if named is None:
            return
        for path in [p for p in named if p not in present]:
            seen.pop(path, None)
            yield named.pop(path), b""

    def _entries(
        self,
        base: pathlib.Path,
        parts: int,
        only: str | None = None,
        *,
        drop_bad: bool = False,
    ) -> Iterator[tuple[str, pathlib.Path, list[str], tuple[int, int, int]]]:
        """(daemon id, path, the name's key parts, (inode, size, mtime)) of
        every entry named ``<key>[.<key>].json`` under ``base/<daemon>``;
        ``drop_bad``: a file with another name is removed once logged."""
        self._require_dir(base)
        tokens = [only] if only is not None else sorted(os.listdir(base))
        for token in tokens:
            if token.startswith("."):
                continue
            directory = base / token
            daemon_id = canonical_daemon_id(token)
            if daemon_id is None:
                self._refuse("a directory not named by a daemon token", directory)
                continue
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                self._refuse("not a daemon's directory; skipped", directory)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = pathlib.Path(entry.path)
                keys = _entry_keys(entry.name, parts)
                if keys is None:
                    self._refuse("a name that is no store key; skipped", path)
                    if drop_bad and not entry.is_dir(follow_symlinks=False):
                        _unlink_synced(path)
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield (
                    daemon_id,
                    path,
                    keys,
                    (info.st_ino, info.st_size, info.st_mtime_ns),
                )

    def _read_entry(self, path: pathlib.Path, limit: int, what: str) -> bytes | None:
        """The entry's bytes, or None (gone, not a file, or over ``limit``)."""
        try:
            data = _read_file(path, limit)
        except FileNotFoundError:
            return None
        except _NotAFile as err:
            self._refuse(f"a {what} entry that is {err.strerror}", path)
            return None
        if len(data) > limit:
            self._refuse(f"a {what} over {limit} bytes; skipped", path)
            return None
        return data

    def _refuse(self, what: str, path: pathlib.Path) -> None:
        key = f"{path}:{what}"
        if key not in self._refused:
            self._refused.add(key)
            _malformed(what, path)


def _entry_keys(name: str, parts: int) -> list[str] | None:
    """The ``parts`` store keys of ``<key>[.<key>].json``, else None."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix != "json":
        return None
    keys = stem.split(".")
    if len(keys) != parts:
        return None
    try:
        return [check_store_key(key, "id") for key in keys]
    except ValueError:
        return None


def _oversized(path: pathlib.Path, limit: int) -> bool:
    """Whether ``path`` is a regular file (not a link) over ``limit`` bytes."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size > limit


def _check_digest(digest: str, data: bytes) -> None:
    got = _DIGEST_PREFIX + hashlib.sha256(data).hexdigest()
    if digest != got:
        raise ValueError(f"expected digest {got} of the data, got {digest[:80]!r}")


def _check_size(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise ValueError(f"a {what} of {len(data)} bytes: expected at most {limit}")


def _unlink_synced(path: pathlib.Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


@dataclasses.dataclass
class _DirDelivery:
    """One segment message for a consumer of a ``DirStore``."""

    daemon_id: str
    msg_id: str
    data: bytes
    seq: int
    _cursor: _Cursor
    _token: str

    async def ack(self) -> None:
        await self._cursor.store._call(
            f"acknowledge {self.msg_id}",
            lambda: self._cursor.ack(self._token, self.seq),
        )

    async def nak(self) -> None:
        self._cursor.nak(self._token, self.seq)


@dataclasses.dataclass
class _Position:
    # Persisted: every seq up to here was acknowledged.
    acked: int
    # Offered to the caller up to here.
    offered: int
    # Acknowledged past ``acked``, waiting for the ones before them.
    ahead: set[int] = dataclasses.field(default_factory=set)
    # After a nak, this daemon waits until the loop's clock passes this.
    paused_until: float = 0.0


class _Cursor:
    """One consumer's positions in every daemon's messages."""

    def __init__(self, store: DirStore, consumer: str):
        self.store = store
        self.directory = store._consumers / consumer
        self.positions: dict[str, _Position] = {}
        # Entries under segments/ that are not daemon directories, logged
        # once each.
        self.skipped: set[str] = set()
        self.loop = asyncio.get_running_loop()
        # Reads and acks run in worker threads; a caller may ack from
        # another task while the next round is read.
        self.lock = threading.Lock()

    def open(self) -> None:
        if not self.store._consumers.is_dir():
            raise StoreUnavailable(
                f"{self.store.url}: {self.store._consumers} is missing (is the "
                f"volume mounted?)"
            )
        self.directory.mkdir(exist_ok=True)

    def _position(self, token: str) -> _Position:
        position = self.positions.get(token)
        if position is None:
            path = self.directory / token
            try:
                acked = int(_read_file(path, _MAX_POINTER_BYTES))
            except FileNotFoundError:
                acked = 0
            except (ValueError, _NotAFile):
                # Everything comes again; the consumer knows what it took.
                _malformed("a consumer position that is no number", path)
                acked = 0
            position = _Position(acked=acked, offered=acked)
            self.positions[token] = position
        return position

    def next_round(self) -> list[_DirDelivery]:
        with self.lock:
            return self._next_round()

    def _next_round(self) -> list[_DirDelivery]:
        now = self.loop.time()
        found = []
        for token in sorted(os.listdir(self.store._segments)):
            if token.startswith("."):
                continue
            position = self._position(token)
            if position.paused_until > now:
                continue
            directory = self.store._segments / token
            path = directory / f"{position.offered + 1:0{_SEQ_DIGITS}d}.msg"
            try:
                raw = _read_message_file(path)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                if token not in self.skipped:
                    self.skipped.add(token)
                    _malformed("not a daemon's directory; skipped", directory)
                continue
            message = _decode_message(position.offered + 1, raw, path)
            position.offered = message.seq
            daemon_id = canonical_daemon_id(token)
            if daemon_id is None:
                _malformed("a directory not named by a daemon token", path)
            found.append(
                _DirDelivery(
                    daemon_id=daemon_id or "",
                    msg_id=message.msg_id,
                    data=message.data,
                    seq=message.seq,
                    _cursor=self,
                    _token=token,
                )
            )
        return found

    def ack(self, token: str, seq: int) -> None:
        with self.lock:
            self._ack(token, seq)

    def _ack(self, token: str, seq: int) -> None:
        position = self._position(token)
        if seq <= position.acked:
            return
        position.ahead.add(seq)
        acked = position.acked
        while acked + 1 in position.ahead:
            acked += 1
            position.ahead.discard(acked)
        if acked != position.acked:
            _write_atomic(self.directory / token, str(acked).encode())
            position.acked = acked

    def nak(self, token: str, seq: int) -> None:
        with self.lock:
            self._nak(token, seq)

    def _nak(self, token: str, seq: int) -> None:
        position = self._position(token)
        if seq <= position.acked:
            return
        position.offered = min(position.offered, seq - 1)
        position.ahead = {s for s in position.ahead if s < seq}
        position.paused_until = self.loop.time() + NAK_DELAY_SECONDS
