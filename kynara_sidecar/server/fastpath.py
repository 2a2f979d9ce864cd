"""The fast path: the agent listener's framed MessagePack door on a Unix
socket of its own (``agent.fast_socket``), to ``protos/fastpath.md``.

How a connection runs. The listener is an asyncio Unix server on the
daemon's loop; each connection is a buffered protocol that reads into one
buffer of its own (``INITIAL_BUFFER_BYTES``, grown to a larger frame's size
while one arrives and shrunk back after) and cuts frames out of it without
copying. The first frame must be the hello, within
``HELLO_TIMEOUT_SECONDS`` of connecting; after
it, every frame is decoded and translated at once, on the loop. The
``decide`` requests of one read (pipelined frames that arrived together)
form a group: they are decided together, with no task, and their records go
to the audit writer in one call (``Pipeline.decide_soon``), so they share a
transaction, one wakeup of the loop when it returns, and one
``transport.write`` for all their answers, each tagged with its stream id.
Other requests (``decide_batch``, ``wait_approval``) run as a task each.
Every request ends exactly once: its answer or error is sent and its stream
freed, by the group's callback, the task's body, or, for a task cancelled
before its body ran (a ``cancel`` read with the request, say), the task's
done callback.
Answers leave in whatever order they are ready; whatever one read causes to
be answered at once (refusals, health) leaves in one write too.

Deadlines and ``cancel``: a task is cancelled exactly as grpc.aio cancels a
handler task when a client's deadline passes or it goes away: the
``CancelledError`` reaches whatever the pipeline awaits (the audit writer),
and a record the writer commits anyway stays in the log, as on gRPC. A
request of a group is answered at once and forgotten; its record, already
with the writer, commits with the group's and stays in the log, as on gRPC.
The answer is then ``deadline_exceeded`` or ``cancelled``. A connection
that closes cancels its tasks the same way, without answers; its groups
commit and are not answered.

Shutdown (``Daemon.stop``): ``close`` makes health say NOT_SERVING and every
new request get ``shutting_down``; requests in flight go on; ``stop`` closes
the socket (removing its file), gives the tasks still running what is left
of the grace, ends the rest with ``shutting_down`` and closes the
connections. Open waits end earlier, when the daemon closes the gRPC door's
waits (``DecisionService.close``): both doors share that logic.

Limits: a frame longer than ``max_message_bytes`` gets
``request_too_large`` and its bytes are skipped; a connection without a
hello after ``HELLO_TIMEOUT_SECONDS`` is closed; at most
``max_in_flight`` requests per connection (the hello's answer says how
many); at most ``max_connections`` connections. A peer that stops reading
its answers is not read from until it does (write flow control).

Idle connections (``agent.fast_idle_seconds``): after the hello, a timer
checks each connection every ``idle_seconds``. A connection that had
nothing in flight at one check and sent nothing and had nothing in flight
by the next is closed, without a message (no request of its is left to
answer; a client dials again when it needs to). So a connection is closed
after at least ``idle_seconds`` of quiet and at most twice that, and a
read costs one attribute store rather than a timer's reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import stat
import struct
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol

from kynara_sidecar.approvals.model import Approval
from kynara_sidecar.config import DEFAULT_FAST_IDLE_SECONDS
from kynara_sidecar.errors import (
    InvalidRequest,
    KynaraError,
    RequestTooLarge,
    ServiceError,
    ShuttingDown,
)
from kynara_sidecar.pipeline import Answer, IncomingRequest, Pipeline
from kynara_sidecar.server.decision_service import MAX_BATCH_ITEMS
from kynara_sidecar.server.fastpath_wire import (
    PROTOCOL_VERSION,
    Cancel,
    Decide,
    DecideBatch,
    FastPathError,
    Health,
    WaitApproval,
    answer_map,
    approval_update_map,
    decode_batch_item,
    decode_frame,
    decode_hello,
    encode_message,
    error_map,
    request_from_payload,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT",
    "ApprovalWaits",
    "FastPathServer",
]

FRAME_HEADER = struct.Struct(">II")
HEADER_BYTES = FRAME_HEADER.size
# A reply of up to this many pipelined frames fits in one read beside a
# frame of the largest size.
READ_AHEAD_BYTES = 64 * 1024
# A connection's buffer until a larger frame arrives: a read of many
# pipelined small frames (and a frame of the default max_message_bytes)
# fits, while an idle connection holds little whatever max_message_bytes is.
INITIAL_BUFFER_BYTES = 64 * 1024
# A connection must send its hello within this long of connecting, or it
# is closed: idle or half-sent connections must not hold the connection
# slots. Seconds, as a client on the same host connects in microseconds.
HELLO_TIMEOUT_SECONDS = 5.0
# The longest hello: a version list and a credential. Before it nobody is
# known, so nobody may make the daemon hold a large frame.
MAX_HELLO_BYTES = 16 * 1024
# Requests one connection may have in flight: far more than a client needs
# to fill the group commit (a batch of 256 records), small enough that one
# connection cannot hold the daemon's memory.
DEFAULT_MAX_IN_FLIGHT = 1024
# Connections at once: a sidecar serves the agents of one pod.
# NOTE: one limit for the socket, not one per peer uid: the daemon does not
# read SO_PEERCRED, and the agents of one pod usually run as one uid, where
# a per-uid limit is this limit; who may connect at all is the socket's
# permission bits (agent.socket_mode). A refused connection gets
# `internal` on stream 0: the ErrorCode catalogue has no "unavailable,
# retry later" code besides shutting_down, and a new one is a change of
# the wire contract.
DEFAULT_MAX_CONNECTIONS = 256
# Deadlines further out than this (about 24 days) are not armed: no call
# waits that long, and event loop timers need not hold them.
MAX_TIMER_MS = 2**31
# At stop, a task cancelled after the grace gets this long to end.
_LAST_CANCEL_SECONDS = 0.1
# The most decide requests one group hands the writer at once: the
# writer's batch (audit.max_batch's default), so a read of many small
# frames still commits in transactions of the usual size.
MAX_GROUP = 256

log = logging.getLogger("kynara.server")


class ApprovalWaits(Protocol):
    """What ``wait_approval`` needs: the gRPC door's wait logic
    (``DecisionService``), shared so both doors wait alike."""

    def own_approval(self, approval_id: str, authorization: str) -> Approval:
        """The caller's approval as it is now (``NotFound`` otherwise)."""
        ...

    def states(self, first: Approval) -> AsyncIterator[Approval]:
        """The approval's states until one ends the wait (``ShuttingDown``
        at stop)."""
        ...


def _fields(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": {"component": "server", "door": "fast_path", **fields}}


class _Stream:
    """A request in flight: its task (none for a group's member), deadline
    and why it was cancelled."""

    __slots__ = ("task", "timer", "reason", "grouped")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        # Set before this door cancels the task: the error to answer.
        self.reason: KynaraError | None = None
        # A member of a group whose commit has not returned yet.
        self.grouped = False


class FastPathServer:
    """Serves the fast path on one Unix socket.

    Args:
        pipeline: the decision pipeline.
        waits: the approval waits (the gRPC door's ``DecisionService``).
        path: the socket's path (``agent.fast_socket``).
        mode: its permission bits (``agent.socket_mode``).
        max_message_bytes: longer payloads get ``request_too_large``.
        max_in_flight: requests per connection.
        max_connections: connections at once.
        idle_seconds: a connection idle this long after its hello is closed
            (within twice this); 0 never closes one
            (``agent.fast_idle_seconds``).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        waits: ApprovalWaits,
        path: str,
        mode: int,
        max_message_bytes: int,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_seconds: float = DEFAULT_FAST_IDLE_SECONDS,
    ):
        self.pipeline = pipeline
        self.waits = waits
        self.path = os.path.abspath(path)
        self._mode = mode
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self._max_connections = max_connections
        self.hello_timeout = HELLO_TIMEOUT_SECONDS
        self.idle_seconds = idle_seconds
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self.serving = False
        self.closing = False
        self.hello_answer = {
            "ok": {
                "version": PROTOCOL_VERSION,
                "max_message_bytes": max_message_bytes,
                "max_in_flight": max_in_flight,
            }
        }

    async def start(self) -> None:
        """Bind the socket (a stale file there is replaced, as gRPC's bind
        does; the daemon's socket lock keeps a live daemon's) and listen.

        Raises:
            OSError: the socket cannot be bound.
        """
        path = pathlib.Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), self.path
        )
        os.chmod(self.path, self._mode)
        info = path.stat()
        self._inode = (info.st_dev, info.st_ino)
        log.info("fast path listening", extra=_fields(socket=self.path))

    def set_serving(self, serving: bool) -> None:
        """What ``health`` answers from now on (the daemon's health)."""
        if not self.closing:
            self.serving = serving

    def close(self) -> None:
        """Health NOT_SERVING and ``shutting_down`` for every new request;
        requests in flight go on."""
        self.closing = True
        self.serving = False

    async def stop(self, grace: float) -> None:
        """Stop listening and remove the socket file, give requests still
        in flight up to ``grace`` seconds, end the rest with
        ``shutting_down`` and close every connection. Safe to call twice."""
        self.close()
        if self._server is not None:
            self._server.close()
            self._server = None
            self._unlink()
        tasks: set[asyncio.Future[Any]] = {
            stream.task
            for connection in self._connections
            for stream in connection.streams.values()
            if stream.task is not None
        }
        for connection in self._connections:
            tasks |= connection.groups
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for connection in self._connections:
                    connection.end_all(
                        ShuttingDown(
                            "the daemon stopped before this request ended; "
                            "retry on another replica"
                        )
                    )
                await asyncio.wait(pending, timeout=_LAST_CANCEL_SECONDS)
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()

    def _unlink(self) -> None:
        # Only the file this listener bound: a later daemon may own the path.
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)

    def admit(self, connection: _Connection) -> bool:
        if len(self._connections) >= self._max_connections:
            return False
        self._connections.add(connection)
        return True

    def release(self, connection: _Connection) -> None:
        self._connections.discard(connection)


class _Connection(asyncio.BufferedProtocol):
    """One client connection: framing, the handshake and its streams."""

    def __init__(self, server: FastPathServer):
        self._server = server
        self._pipeline = server.pipeline
        self._max_bytes = server.max_message_bytes
        self._buffer = bytearray(INITIAL_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        # Bytes of a refused (too large) payload still to drop.
        self._skip = 0
        self._hello = False
        self._closed = False
        self._authorization = ""
        self._peer = "unix:"
        self._transport: asyncio.Transport | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # Something was read, or was in flight at the last idle check,
        # since that check.
        self._active = False
        self.streams: dict[int, _Stream] = {}
        # Groups whose commit has not returned: done when it has.
        self.groups: set[asyncio.Future[None]] = set()
        # The decide requests of the read being handled.
        self._group: list[tuple[int, _Stream, IncomingRequest]] = []
        # Answers held back while a read is handled, to leave in one write.
        self._out: list[bytes | bytearray] | None = None

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        # grpc names a Unix peer "unix:" and its address (empty for a
        # client socket that was not bound): records of both doors agree.
        peer = transport.get_extra_info("peername")
        self._peer = f"unix:{peer}" if isinstance(peer, str) else "unix:"
        if not self._server.admit(self):
            self._write_error(
                0,
                ServiceError(
                    "the daemon holds its most fast path connections "
                    f"({self._server._max_connections}); close idle ones or "
                    "retry later"
                ),
            )
            self.close()
            return
        self._hello_timer = asyncio.get_running_loop().call_later(
            self._server.hello_timeout, self._hello_late
        )

    def _hello_late(self) -> None:
        self._hello_timer = None
        if self._hello or self._closed:
            return
        self._refuse(
            0,
            InvalidRequest(
                "expected a hello within "
                f"{self._server.hello_timeout:g} seconds of connecting, got none",
                field="op",
            ),
        )
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.release(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        # The client went away: its requests are cancelled, as grpc cancels
        # the handlers of a call whose client left.
        for stream in self.streams.values():
            if stream.task is not None:
                stream.task.cancel()
            if stream.timer is not None:
                stream.timer.cancel()

    def eof_received(self) -> bool:
        return False  # close: a client that stops sending is done

    def pause_writing(self) -> None:
        # The peer does not read its answers: stop reading its requests.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._out:
            # What this read answered leaves before the connection closes.
            out, self._out = self._out, []
            self._send(out)
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._active = True
        self._out = []
        try:
            self._read_frames()
            if self._group:
                self._decide_group()
        finally:
            out, self._out = self._out, None
            self._send(out)

    # -------------------------------------------------------------- framing

    def _read_frames(self) -> None:
        view, start, end = self._view, self._start, self._end
        while not self._closed:
            if self._skip:
                dropped = min(self._skip, end - start)
                start += dropped
                self._skip -= dropped
                if self._skip:
                    break
            if end - start < HEADER_BYTES:
                break
            length, stream = FRAME_HEADER.unpack_from(view, start)
            if length > self._max_bytes or (
                not self._hello and length > MAX_HELLO_BYTES
            ):
                start += HEADER_BYTES
                self._skip = length
                self._too_large(stream, length)
                continue
            stop = start + HEADER_BYTES + length
            if stop > end:
                break
            self._frame(stream, view[start + HEADER_BYTES : stop])
            start = stop
        # What is left is the start of a frame: move it to the front, into
        # a buffer it fits in.
        left = end - start
        need = INITIAL_BUFFER_BYTES
        if left >= HEADER_BYTES and not self._skip and not self._closed:
            length, _ = FRAME_HEADER.unpack_from(view, start)
            # Grow with the bytes that came (at most doubling what is held),
            # never to what a header alone announces: a few bytes must not
            # make the daemon hold max_message_bytes.
            frame = HEADER_BYTES + min(length, self._max_bytes)
            need = max(need, min(frame, 2 * left + INITIAL_BUFFER_BYTES))
        if need > len(self._buffer):
            # A large frame is arriving: room for more of it, and to read
            # ahead.
            self._resize(need + READ_AHEAD_BYTES, start, left)
        elif need == INITIAL_BUFFER_BYTES < len(self._buffer):
            self._resize(INITIAL_BUFFER_BYTES, start, left)  # it has passed
        elif left and start:
            self._buffer[:left] = bytes(view[start:end])
        self._start, self._end = 0, left

    def _resize(self, size: int, start: int, left: int) -> None:
        # A new buffer: frames decoded from the old one may still hold views.
        buffer = bytearray(size)
        buffer[:left] = self._view[start : start + left]
        self._buffer, self._view = buffer, memoryview(buffer)

    def _too_large(self, stream: int, length: int) -> None:
        self._refuse(
            stream if self._hello else 0,  # the handshake's errors: stream 0
            RequestTooLarge(
                f"expected at most {self._max_bytes} bytes "
                f"(agent.max_message_bytes), got {length}"
                if self._hello
                else f"expected a hello of at most "
                f"{min(self._max_bytes, MAX_HELLO_BYTES)} bytes, got {length}"
            ),
        )
        if not self._hello:
            self.close()

    def _frame(self, stream: int, payload: memoryview) -> None:
        if not self._hello:
            self._handshake(stream, payload)
            return
        try:
            frame = decode_frame(payload)
        except InvalidRequest as err:
            self._refuse(stream, err)
            return
        kind = type(frame)
        if kind is Decide:
            self._decide(stream, frame)  # type: ignore[arg-type]
        elif kind is DecideBatch:
            self._decide_batch(stream, frame)  # type: ignore[arg-type]
        elif kind is Cancel:
            self._cancel(stream)
        elif kind is Health:
            self._health(stream)
        elif kind is WaitApproval:
            self._wait_approval(stream, frame)  # type: ignore[arg-type]
        else:
            self._refuse(
                stream,
                InvalidRequest("expected a request, got a second hello", field="op"),
            )

    def _handshake(self, stream: int, payload: memoryview) -> None:
        try:
            hello = decode_hello(payload)
            if stream != 0:
                raise InvalidRequest(
                    f"expected the hello on stream 0, got stream {stream}",
                    field="stream",
                )
        except InvalidRequest as err:
            self._refuse(0, err)
            self.close()
            return
        if PROTOCOL_VERSION not in hello.versions:
            self._refuse(
                0,
                FastPathError(
                    "unsupported_version",
                    f"expected one of the versions this daemon speaks "
                    f"([{PROTOCOL_VERSION}]), got {hello.versions[:16]}",
                    field="versions",
                ),
            )
            self.close()
            return
        self._hello = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._authorization = hello.authorization
        self._write(encode_message(0, self._server.hello_answer))
        self._arm_idle()

    def _arm_idle(self) -> None:
        idle = self._server.idle_seconds
        if idle > 0 and not self._closed:
            self._idle_timer = asyncio.get_running_loop().call_later(
                idle, self._idle_check
            )

    def _idle_check(self) -> None:
        """Close the connection when it was quiet since the last check
        and had nothing in flight then or now; else check again later."""
        self._idle_timer = None
        if self._closed:
            return
        busy = bool(self.streams or self.groups)
        if self._active or busy:
            # Read from since the last check, or in flight now: not quiet.
            # What is in flight now also keeps the next period from counting
            # as quiet, however long it runs.
            self._active = busy
            self._arm_idle()
            return
        log.debug(
            "idle fast path connection closed",
            extra=_fields(peer=self._peer, idle_seconds=self._server.idle_seconds),
        )
        self.close()

    # ------------------------------------------------------------- requests

    def _admit(self, stream: int, timeout_ms: int | None) -> _Stream | None:
        """A new stream for a request, or None once it was refused."""
        error: KynaraError | None = None
        if stream == 0:
            error = InvalidRequest(
                "expected a stream id above 0 (stream 0 is the hello's)",
                field="stream",
            )
        elif stream in self.streams:
            error = InvalidRequest(
                "expected a stream id not in flight; its first request goes on",
                field="stream",
            )
        elif self._server.closing:
            error = ShuttingDown(
                "the daemon is shutting down; retry on another replica"
            )
        elif len(self.streams) >= self._server.max_in_flight:
            error = InvalidRequest(
                f"expected at most {self._server.max_in_flight} requests in "
                "flight on one connection (the hello's max_in_flight); wait "
                "for answers or open another connection",
                field="stream",
            )
        elif timeout_ms is not None and timeout_ms <= 0:
            error = InvalidRequest(
                f"expected a positive number of milliseconds, got {timeout_ms}",
                field="timeout_ms",
            )
        if error is not None:
            self._refuse(stream, error)
            return None
        return _Stream()

    def _run(
        self,
        stream: int,
        state: _Stream,
        work: Coroutine[Any, Any, None],
        timeout_ms: int | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        state.task = task = loop.create_task(work)
        task.add_done_callback(lambda _: self._task_done(stream, state))
        self.streams[stream] = state
        if timeout_ms is not None and timeout_ms <= MAX_TIMER_MS:
            state.timer = loop.call_later(
                timeout_ms / 1000, self._expire, stream, state, timeout_ms
            )

    def _decide(self, stream: int, frame: Decide) -> None:
        state = self._admit(stream, frame.timeout_ms)
        if state is None:
            return
        try:
            incoming = request_from_payload(
                frame.request, self._peer, self._authorization, "request."
            )
        except KynaraError as err:
            self._refuse(stream, err)
            return
        # In flight from now on (a second frame on this stream is refused);
        # decided with the rest of this read's requests.
        state.grouped = True
        self.streams[stream] = state
        timeout_ms = frame.timeout_ms
        if timeout_ms is not None and timeout_ms <= MAX_TIMER_MS:
            state.timer = asyncio.get_running_loop().call_later(
                timeout_ms / 1000, self._expire, stream, state, timeout_ms
            )
        self._group.append((stream, state, incoming))

    def _decide_group(self) -> None:
        group, self._group = self._group, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(group), MAX_GROUP):
            members = group[start : start + MAX_GROUP]
            done = loop.create_future()
            self.groups.add(done)
            try:
                self._pipeline.decide_soon(
                    [incoming for _, _, incoming in members],
                    lambda outcomes, m=members, d=done: self._answer_group(
                        m, d, outcomes
                    ),
                )
            except Exception:
                failed = _internal_error("decide")
                self._answer_group(members, done, [failed] * len(members))

    def _answer_group(
        self,
        members: list[tuple[int, _Stream, IncomingRequest]],
        done: asyncio.Future[None],
        outcomes: list[Answer | Exception],
    ) -> None:
        if done.done():
            return  # answered already (decide_soon failed after answering)
        frames: list[bytes | bytearray] = []
        for (stream, state, _), outcome in zip(members, outcomes, strict=True):
            state.grouped = False
            if state.reason is not None:
                continue  # answered when it was cancelled
            self._ended(stream, state)
            if isinstance(outcome, Answer):
                frames.append(encode_message(stream, {"ok": answer_map(outcome)}))
            elif isinstance(outcome, KynaraError):
                # The pipeline counted it.
                frames.append(_error_frame(stream, outcome, "request."))
            else:
                frames.append(_error_frame(stream, _internal_error("decide", outcome)))
        self.groups.discard(done)
        done.set_result(None)
        self._send(frames)

    def _decide_batch(self, stream: int, frame: DecideBatch) -> None:
        state = self._admit(stream, frame.timeout_ms)
        if state is None:
            return
        items = frame.request.items
        if len(items) > MAX_BATCH_ITEMS:
            self._refuse(
                stream,
                InvalidRequest(
                    f"expected at most {MAX_BATCH_ITEMS} items, got {len(items)}",
                    field="request.items",
                ),
            )
            return
        # Each item is translated and decided on its own; the records of
        # all decided items commit in one transaction, or none does.
        requests: dict[int, IncomingRequest] = {}
        outcomes: list[Answer | KynaraError | None] = [None] * len(items)
        for index, raw in enumerate(items):
            try:
                requests[index] = request_from_payload(
                    decode_batch_item(raw), self._peer, self._authorization, ""
                )
            except KynaraError as err:
                self._pipeline.refuse(err)
                outcomes[index] = err
        work = self._answer_batch(stream, state, requests, outcomes)
        self._run(stream, state, work, frame.timeout_ms)

    async def _answer_batch(
        self,
        stream: int,
        state: _Stream,
        requests: dict[int, IncomingRequest],
        outcomes: list[Answer | KynaraError | None],
    ) -> None:
        try:
            decided = await self._pipeline.decide_all(list(requests.values()))
        except asyncio.CancelledError:
            if state.reason is None:
                raise  # the connection closed: no one to answer
            self._write_error(stream, state.reason)
        except Exception:
            self._write_error(stream, _internal_error("decide_batch"))
        else:
            for index, outcome in zip(requests, decided, strict=True):
                outcomes[index] = outcome
            items = [_batch_item(i, o) for i, o in enumerate(outcomes)]
            self._write(encode_message(stream, {"ok": {"items": items}}))
        finally:
            self._ended(stream, state)

    def _wait_approval(self, stream: int, frame: WaitApproval) -> None:
        state = self._admit(stream, frame.timeout_ms)
        if state is None:
            return
        try:
            approval = self._server.waits.own_approval(
                frame.request.approval_id, self._authorization
            )
        except KynaraError as err:
            self._refuse(stream, err, "request.")
            return
        except Exception:
            self._refuse(stream, _internal_error("wait_approval"))
            return
        self._run(
            stream, state, self._updates(stream, state, approval), frame.timeout_ms
        )

    async def _updates(self, stream: int, state: _Stream, first: Approval) -> None:
        try:
            async for approval in self._server.waits.states(first):
                self._write(
                    encode_message(stream, {"update": approval_update_map(approval)})
                )
        except asyncio.CancelledError:
            if state.reason is None:
                raise  # the connection closed: no one to answer
            self._write_error(stream, state.reason)
        except KynaraError as err:
            self._write_error(stream, err)
        except Exception:
            self._write_error(stream, _internal_error("wait_approval"))
        else:
            self._write(encode_message(stream, {"ok": {}}))
        finally:
            self._ended(stream, state)

    def _health(self, stream: int) -> None:
        if stream == 0 or stream in self.streams:
            self._admit(stream, None)  # refuses, naming the stream
            return
        status = "SERVING" if self._server.serving else "NOT_SERVING"
        self._write(encode_message(stream, {"ok": {"status": status}}))

    def _cancel(self, stream: int) -> None:
        state = self.streams.get(stream)
        if state is not None:
            self._stop_stream(
                stream, state, FastPathError("cancelled", "cancelled by the client")
            )

    def _expire(self, stream: int, state: _Stream, timeout_ms: int) -> None:
        self._stop_stream(
            stream,
            state,
            FastPathError(
                "deadline_exceeded",
                f"the deadline of {timeout_ms} ms passed before the answer",
            ),
        )

    def _stop_stream(self, stream: int, state: _Stream, reason: KynaraError) -> None:
        """Cancel a request's task, which answers ``reason``, or answer a
        group's member ``reason`` now (unless it is already done, its
        answer sent)."""
        if state.reason is not None:
            return
        if state.grouped:
            state.reason = reason
            self._ended(stream, state)
            self._write_error(stream, reason)
            return
        task = state.task
        if task is None or task.done():
            return
        state.reason = reason
        task.cancel()

    def _task_done(self, stream: int, state: _Stream) -> None:
        """End a request whose task ended without its body ending it: one
        cancelled before its first step, whose body (and ``finally``) never
        ran."""
        if self.streams.get(stream) is not state:
            return  # its body ended it
        self._ended(stream, state)
        if state.reason is not None:
            self._write_error(stream, state.reason)

    def end_all(self, reason: KynaraError) -> None:
        for stream, state in list(self.streams.items()):
            self._stop_stream(stream, state, reason)

    def _ended(self, stream: int, state: _Stream) -> None:
        if self.streams.get(stream) is state:
            del self.streams[stream]
        if state.timer is not None:
            state.timer.cancel()

    # -------------------------------------------------------------- answers

    def _refuse(self, stream: int, error: KynaraError, prefix: str = "") -> None:
        """Count a request refused before the pipeline saw it, and answer:
        on its stream, or on stream 0 when that stream is in flight (every
        message on a stream in flight is its request's, so a client never
        takes the refusal for that request's end)."""
        self._pipeline.refuse(error)
        if stream and stream in self.streams:
            message = error_map(error)
            message.message = (
                f"a frame on stream {stream}, which is in flight, was refused: "
                f"{message.message}"
            )
            self._write(encode_message(0, {"error": message}))
            return
        self._write_error(stream, error, prefix)

    def _write_error(self, stream: int, error: KynaraError, prefix: str = "") -> None:
        self._write(_error_frame(stream, error, prefix))

    def _write(self, frame: bytearray) -> None:
        if self._out is not None:
            self._out.append(frame)  # leaves with the rest of this read's
        else:
            self._send([frame])

    def _send(self, frames: list[bytes | bytearray]) -> None:
        # One write, one system call, for all of them.
        transport = self._transport
        if not frames or transport is None or transport.is_closing():
            return
        transport.write(frames[0] if len(frames) == 1 else b"".join(frames))


def _batch_item(index: int, outcome: Answer | KynaraError | None) -> dict[str, Any]:
    if isinstance(outcome, Answer):
        return {"decision": answer_map(outcome)}
    assert outcome is not None
    error = error_map(outcome)
    error.field = f"items[{index}]" + (f".{error.field}" if error.field else "")
    return {"error": error}


def _error_frame(stream: int, error: KynaraError, prefix: str = "") -> bytearray:
    message = error_map(error)
    if prefix and message.field:
        message.field = prefix + message.field
    return encode_message(stream, {"error": message})


def _internal_error(op: str, error: BaseException | None = None) -> ServiceError:
    """Log the exception being handled (or ``error``); the error the caller
    sees."""
    log.error(f"{op} failed", exc_info=error or True, extra=_fields(op=op))
    return ServiceError("internal error in the daemon; see its log")
