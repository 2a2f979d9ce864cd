"""The fast path: framed MessagePack on the daemon's own Unix socket.

The contract is protos/fastpath.md (version 1): frames of ``length: u32 BE,
stream: u32 BE, payload``, a hello on stream 0, then requests pipelined on
stream ids of the client's choosing, answered in any order. Only msgspec and
the standard library are used: no protobuf, no grpc.

One connection per client carries every call of every thread or task. Stream
ids count up and are never reused on a connection (2**32 - 1 of them), so a
late answer to a call that gave up cannot reach another call: it is dropped.

``FastTransport`` (blocking) has no reader thread: the calling thread whose
answer is outstanding reads the socket itself and hands other threads'
answers to them (leader and followers), so a lone caller pays no thread
switch. ``AsyncFastTransport`` reads in a callback of its event loop.

A connection that breaks fails the calls in flight on it with
``daemon_unreachable``; the next call dials again. A request that could not
be written at all (the daemon closed the idle connection, e.g. it
restarted) is sent once more on a new connection: it never reached a daemon.

A socket nobody listens on raises ``NoListener`` (a ``KynaraUnavailable``),
so that ``auto`` can pass over a fast socket left by a daemon that stopped.
A frame longer than the client accepts (``MAX_ANSWER_BYTES``; the hello's
answer ``MAX_HELLO_BYTES``) ends the connection with an error naming the
socket instead of reading on toward 4 GiB.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import errno
import itertools
import math
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from kynara_sdk._values import DURATION_EXT, UINT64_EXT, to_packable_map
from kynara_sdk._wire import (
    ApprovalWait,
    batch_requests,
    batch_size_error,
    request_subject,
)
from kynara_sdk.decision import (
    Approval,
    ApprovalUpdate,
    ConditionError,
    Decision,
    DecisionRequest,
    MatchedRule,
)
from kynara_sdk.errors import INTERNAL, KynaraError, KynaraUnavailable

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_HELLO_BYTES",
    "PROTOCOL_VERSION",
    "AsyncFastTransport",
    "FastTransport",
    "NoListener",
]

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">II")
_HEADER_SIZE = _HEADER.size
_MAX_STREAM = 2**32 - 1
_READ_SIZE = 256 * 1024
# The longest a blocking call sleeps at once. A signal the kernel hands to
# another thread (grpc's, the application's) only sets a flag; the main
# thread runs its handler (Ctrl-C's KeyboardInterrupt) when it wakes, so a
# wait of minutes for a reviewer wakes this often to let it.
_SLEEP_SLICE = 0.2
# The longest answer frame a client reads. The contract sets no limit on
# answers; the largest real one, a decide_batch of 256 decisions, is well
# under a megabyte, so this only trips on a peer that is not a Kynara daemon
# or sends garbage. The hello's answer is a few dozen bytes.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_HELLO_BYTES = 64 * 1024
# connect() errors that mean nothing listens there: no request was sent.
_NO_LISTENER_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT})
# Codes with which the fast path says no daemon answered in time, as gRPC's
# DEADLINE_EXCEEDED and CANCELLED statuses do; both transports raise them as
# daemon_unreachable.
_NO_ANSWER_CODES = frozenset({"deadline_exceeded", "cancelled"})
_EFFECTS = frozenset({"allow", "deny", "require_approval"})


# -- answers, as the fast path writes them (unknown keys are ignored) --------


class _Matched(msgspec.Struct):
    policy: str = ""
    rule: str = ""
    effect: str = "unspecified"
    principal: str = ""
    shadow: bool = False


class _ConditionError(msgspec.Struct):
    policy: str = ""
    rule: str = ""
    principal: str = ""
    message: str = ""


class _Approval(msgspec.Struct):
    id: str = ""
    url: str = ""
    expires_at: datetime.datetime | None = None
    state: str = ""
    reviewers: list[str] = []
    risk_score: int = 0


class _Decision(msgspec.Struct):
    decision: str = "unspecified"
    decision_id: str = ""
    matched_rules: list[_Matched] = []
    reason_code: str = ""
    reason: str = ""
    policy_revision: str = ""
    directory_revision: str = ""
    audit_sequence: int = 0
    record_hash: str = ""
    approval: _Approval | None = None
    condition_errors: list[_ConditionError] = []
    chain: list[str] = []
    request_id: str = ""


class _Error(msgspec.Struct):
    code: str = ""
    message: str = ""
    field: str = ""


class _DecideAnswer(msgspec.Struct):
    ok: _Decision | None = None
    error: _Error | None = None


class _BatchItem(msgspec.Struct):
    decision: _Decision | None = None
    error: _Error | None = None


class _Batch(msgspec.Struct):
    items: list[_BatchItem] = []


class _BatchAnswer(msgspec.Struct):
    ok: _Batch | None = None
    error: _Error | None = None


class _Update(msgspec.Struct):
    approval_id: str = ""
    state: str = ""
    approvals: int = 0
    approvals_needed: int = 0
    expires_at: datetime.datetime | None = None
    reviewers: list[str] = []
    comment: str = ""


class _WaitAnswer(msgspec.Struct):
    ok: dict[str, Any] | None = None
    error: _Error | None = None
    update: _Update | None = None


class _Hello(msgspec.Struct):
    version: int = 0
    max_message_bytes: int = 0
    # Requests in flight on one connection at most; 0: not told.
    max_in_flight: int = 0


class _HelloAnswer(msgspec.Struct):
    ok: _Hello | None = None
    error: _Error | None = None


def _ext_hook(code: int, data: memoryview) -> Any:
    # Answers carry no extension values today; read the two the contract
    # defines should a later answer hold one.
    if code == UINT64_EXT:
        return struct.unpack(">Q", data)[0]
    if code == DURATION_EXT:
        seconds, nanos = struct.unpack(">qi", data)
        return datetime.timedelta(seconds=seconds, microseconds=nanos // 1000)
    return msgspec.msgpack.Ext(code, bytes(data))


_ENCODER = msgspec.msgpack.Encoder()
_DECIDE = msgspec.msgpack.Decoder(_DecideAnswer, ext_hook=_ext_hook)
_BATCH = msgspec.msgpack.Decoder(_BatchAnswer, ext_hook=_ext_hook)
_WAIT = msgspec.msgpack.Decoder(_WaitAnswer, ext_hook=_ext_hook)
_HELLO = msgspec.msgpack.Decoder(_HelloAnswer, ext_hook=_ext_hook)
_CANCEL = {"op": "cancel", "request": {}}


def _frame(payload: dict[str, Any], stream: int) -> bytearray:
    out = bytearray(_HEADER_SIZE)
    _ENCODER.encode_into(payload, out, _HEADER_SIZE)
    _HEADER.pack_into(out, 0, len(out) - _HEADER_SIZE, stream)
    return out


def _hello(authorization: str | None) -> bytearray:
    hello: dict[str, Any] = {"op": "hello", "versions": [PROTOCOL_VERSION]}
    if authorization:
        hello["authorization"] = authorization
    return _frame(hello, 0)


def _timeout_ms(remaining: float) -> int:
    return max(1, math.ceil(remaining * 1000))


def request_map(item: DecisionRequest) -> dict[str, Any]:
    """The fast path's map form of ``DecideRequest`` for ``item``.

    Raises:
        TypeError, ValueError: a value has no wire form, or the subject is
            malformed; the message names the key path or argument.
    """
    subject = request_subject(item)
    request: dict[str, Any] = {
        "action": item.action,
        "resource": {
            "kind": item.resource_kind,
            "id": item.resource_id,
            "attributes": to_packable_map(item.attributes, "resource.attributes"),
        },
    }
    if item.context is not None:
        request["context"] = to_packable_map(item.context, "context")
    if subject is not None:
        if subject.chain:
            request["asserted_chain"] = list(subject.chain)
        if subject.token:
            request["delegation_token"] = subject.token
    if item.request_id:
        request["request_id"] = item.request_id
    if item.approval_id:
        request["approval_id"] = item.approval_id
    return request


def _decision(wire: _Decision) -> Decision:
    if wire.decision not in _EFFECTS:
        raise KynaraError(
            INTERNAL,
            "expected a decision of allow, deny or require_approval,"
            f" got {wire.decision!r}",
            "decision",
        )
    approval = wire.approval
    return Decision(
        decision=wire.decision,  # type: ignore[arg-type]
        decision_id=wire.decision_id,
        reason_code=wire.reason_code,
        reason=wire.reason,
        matched_rules=tuple(
            MatchedRule(r.policy, r.rule, r.effect, r.principal, r.shadow)
            for r in wire.matched_rules
        ),
        policy_revision=wire.policy_revision,
        directory_revision=wire.directory_revision,
        audit_sequence=wire.audit_sequence,
        record_hash=wire.record_hash,
        approval=None
        if approval is None
        else Approval(
            id=approval.id,
            url=approval.url,
            expires_at=approval.expires_at,
            state=approval.state,
            reviewers=tuple(approval.reviewers),
            risk_score=approval.risk_score,
        ),
        chain=tuple(wire.chain),
        condition_errors=tuple(
            ConditionError(e.policy, e.rule, e.principal, e.message)
            for e in wire.condition_errors
        ),
        request_id=wire.request_id,
    )


def _update(wire: _Update) -> ApprovalUpdate:
    return ApprovalUpdate(
        approval_id=wire.approval_id,
        state=wire.state,
        approvals=wire.approvals,
        approvals_needed=wire.approvals_needed,
        expires_at=wire.expires_at,
        reviewers=tuple(wire.reviewers),
        comment=wire.comment,
    )


class NoListener(KynaraUnavailable):
    """Nothing listens on the fast path's socket (connect() was refused, or
    the socket is gone): no request reached any daemon."""


class _BadFrame(Exception):
    # The peer broke the framing (a frame longer than the client accepts).
    pass


def _looks_like_http2(received: bytes | bytearray) -> bool:
    # A gRPC server opens with an HTTP/2 SETTINGS frame: 24-bit length, type
    # 4, flags 0 or 1, stream 0. A fast path hello answer cannot look so: its
    # ninth byte starts a MessagePack map, never 0.
    return (
        len(received) >= 9
        and received[3] == 0x04
        and received[4] in (0, 1)
        and received[5:9] == b"\0\0\0\0"
    )


def _connect_failed(route: _Route, err: OSError) -> KynaraUnavailable:
    # Say what is at the path, so "connection refused" says why.
    path = route.path
    try:
        mode: int | None = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is None:
        what = "no such socket"
    elif stat.S_ISDIR(mode):
        what = "it is a directory, not a daemon's fast socket"
    elif not stat.S_ISSOCK(mode):
        what = "it is not a socket"
    elif err.errno == errno.ECONNREFUSED:
        what = "nothing listens on it: a socket left by a daemon that stopped?"
    else:
        what = ""
    why = f"cannot connect: [Errno {err.errno}] {err.strerror}"
    why = f"{why}; {what}" if what else why
    kind = NoListener if err.errno in _NO_LISTENER_ERRNOS else KynaraUnavailable
    return kind(f"no answer from the Kynara daemon at {route.target} ({why})")


def _hello_answer(route: _Route, received: bytearray) -> tuple[_Hello, int] | None:
    """The daemon's hello answer and the bytes of ``received`` it took, once
    ``received`` holds all of it, else None.

    Raises:
        KynaraUnavailable: the peer does not speak the fast path.
        KynaraError: the daemon refused the hello, or answered it on a
            stream other than 0.
    """
    if _looks_like_http2(received):
        raise route.mismatch("it answered in HTTP/2: a gRPC socket?")
    if len(received) < _HEADER_SIZE:
        return None
    length, stream = _HEADER.unpack_from(received)
    if length > MAX_HELLO_BYTES:
        raise route.mismatch(
            f"its first frame says {length} bytes, more than the"
            f" {MAX_HELLO_BYTES} a hello's answer may have"
        )
    end = _HEADER_SIZE + length
    if len(received) < end:
        return None
    if stream != 0:
        raise KynaraError(
            INTERNAL,
            f"expected the hello's answer on stream 0, got stream {stream}",
        )
    return route.read_hello(bytes(received[_HEADER_SIZE:end])), end


@contextlib.contextmanager
def _closed_on_failure(route: _Route, sock: socket.socket) -> Iterator[None]:
    # Dialling and the hello: the socket is closed on any failure, and a
    # timeout or a socket error becomes the error that names the daemon.
    try:
        yield
    except TimeoutError:
        sock.close()
        raise route.unreachable("no answer to the hello in time") from None
    except OSError as err:
        sock.close()
        raise route.unreachable(f"cannot connect: {err}") from None
    except BaseException:
        sock.close()
        raise


def _frames(buffer: bytearray) -> Iterator[tuple[int, bytes]]:
    """Each whole answer frame at the front of ``buffer``, as (stream,
    payload), cut off the buffer once the caller has taken them all.

    Raises:
        _BadFrame: a frame is longer than ``MAX_ANSWER_BYTES``.
    """
    size = len(buffer)
    offset = 0
    try:
        while size - offset >= _HEADER_SIZE:
            length, stream = _HEADER.unpack_from(buffer, offset)
            if length > MAX_ANSWER_BYTES:
                raise _BadFrame(_too_long(length, stream))
            end = offset + _HEADER_SIZE + length
            if end > size:
                break
            yield stream, bytes(buffer[offset + _HEADER_SIZE : end])
            offset = end
    finally:
        if offset:
            del buffer[:offset]


class _Route:
    """What both transports share: where they dial, how they name it in
    errors, and how an answer becomes a result or an error."""

    def __init__(self, path: str, timeout: float, authorization: str | None):
        self.path = path
        self.target = f"fast://{path}"
        self.timeout = timeout
        self.hello = _hello(authorization)

    def unreachable(self, why: str) -> KynaraUnavailable:
        return KynaraUnavailable(
            f"no answer from the Kynara daemon at {self.target} ({why})"
        )

    def timed_out(self, timeout: float) -> KynaraUnavailable:
        return self.unreachable(f"no answer within {timeout:g} s")

    def mismatch(self, why: str) -> KynaraUnavailable:
        """The peer at the socket is not a Kynara fast path."""
        return KynaraUnavailable(
            f"no answer from the Kynara daemon at {self.target} ({why}; not a"
            " Kynara daemon's fast socket (protocol mismatch). A gRPC socket is"
            " given as unix:///path, not fast:///path)",
            not_a_daemon=True,
        )

    def ended(self, received: bytearray) -> KynaraUnavailable:
        """The peer closed the connection before answering the hello."""
        if received:
            return self.mismatch(
                f"it closed the connection after {len(received)} bytes that"
                " are no hello answer"
            )
        return self.unreachable("the daemon closed the connection")

    def broke(self, broken: BaseException | None) -> KynaraError:
        """The error for a call whose connection broke with ``broken``."""
        if isinstance(broken, _BadFrame):
            return KynaraError(
                INTERNAL, f"the daemon at {self.target} broke the protocol: {broken}"
            )
        return self.unreachable("the connection broke")

    def error(self, wire: _Error | None) -> KynaraError:
        """The ``KynaraError`` for an ``error`` answer: the daemon's code as
        is (unknown ones too), its deadline and cancel as daemon_unreachable
        like gRPC's statuses."""
        if wire is None:
            return KynaraError(INTERNAL, "expected ok or error, got neither", "")
        if wire.code in _NO_ANSWER_CODES:
            return self.unreachable(f"{wire.code}: {wire.message}")
        return KynaraError(wire.code or INTERNAL, wire.message, _field(wire.field))

    def unreadable(self, err: Exception) -> KynaraError:
        return KynaraError(
            INTERNAL, f"unreadable answer from the daemon at {self.target}: {err}"
        )

    def read_decision(self, raw: bytes) -> Decision:
        try:
            answer = _DECIDE.decode(raw)
        except msgspec.MsgspecError as err:
            raise self.unreadable(err) from None
        if answer.ok is not None:
            return _decision(answer.ok)
        raise self.error(answer.error)

    def read_batch(self, raw: bytes, sent: int) -> list[Decision | KynaraError]:
        try:
            answer = _BATCH.decode(raw)
        except msgspec.MsgspecError as err:
            raise self.unreadable(err) from None
        if answer.ok is None:
            raise self.error(answer.error)
        items = answer.ok.items
        if len(items) != sent:
            raise batch_size_error(sent, len(items))
        out: list[Decision | KynaraError] = []
        for item in items:
            if item.decision is not None:
                try:
                    out.append(_decision(item.decision))
                except KynaraError as err:
                    out.append(err)
            elif item.error is not None:
                error = item.error
                out.append(
                    KynaraError(error.code or INTERNAL, error.message, error.field)
                )
            else:
                out.append(
                    KynaraError(
                        INTERNAL, "expected a decision or an error, got neither"
                    )
                )
        return out

    def read_wait(self, raw: bytes, wait: ApprovalWait) -> ApprovalUpdate | None:
        """One message of a wait: the approved update that ends it, or None
        while it goes on.

        Raises:
            ApprovalError, KynaraError: the wait ended otherwise.
        """
        try:
            answer = _WAIT.decode(raw)
        except msgspec.MsgspecError as err:
            raise self.unreadable(err) from None
        if answer.update is not None:
            return wait.take(_update(answer.update))
        if answer.ok is not None:
            raise wait.ended_early()
        error = answer.error
        if error is not None and error.code == "deadline_exceeded":
            raise wait.timed_out()
        mapped = self.error(error)
        if isinstance(mapped, KynaraUnavailable) or error is None:
            raise mapped
        raise wait.refused(mapped)

    def read_hello(self, raw: bytes) -> _Hello:
        """The daemon's answer to the hello: version and limits.

        Raises:
            KynaraError: the daemon refused the hello (``unsupported_version``,
                ...), or answered a version this client does not speak.
        """
        try:
            answer = _HELLO.decode(raw)
        except msgspec.MsgspecError as err:
            raise self.unreadable(err) from None
        if answer.ok is None:
            raise self.error(answer.error)
        if answer.ok.version != PROTOCOL_VERSION:
            raise KynaraError(
                "unsupported_version",
                f"the daemon at {self.target} chose fast path version"
                f" {answer.ok.version}; this client speaks {PROTOCOL_VERSION}",
            )
        return answer.ok


def _too_long(length: int, stream: int) -> str:
    return (
        f"a frame of {length} bytes on stream {stream}, more than the"
        f" {MAX_ANSWER_BYTES} this client accepts"
    )


def _field(field: str) -> str:
    # The fast path names a field from its frame (``request.resource.kind``);
    # the SDK names it within the request, as on gRPC (``resource.kind``).
    return field.removeprefix("request.") if field != "request" else ""


def _batch_request(items: list[DecisionRequest]) -> dict[str, Any]:
    return {"items": batch_requests(items, request_map)}


class _NotSent(Exception):
    # The request was not written at all: safe to send on a new connection.
    pass


class _Broken(Exception):
    # The connection broke with this call in flight.
    pass


_BROKEN = object()  # put in a call's inbox when its connection breaks


# -- blocking --------------------------------------------------------------


class _Call:
    __slots__ = ("event", "inbox", "streaming")

    def __init__(self, streaming: bool) -> None:
        self.inbox: collections.deque = collections.deque()
        # Made only when the caller has to wait for another thread to read.
        self.event: threading.Event | None = None
        self.streaming = streaming


class _Connection:
    """One blocking connection, after its hello; thread-safe."""

    def __init__(self, sock: socket.socket, hello: _Hello) -> None:
        self.sock = sock
        self.max_message_bytes = hello.max_message_bytes
        self.broken: BaseException | None = None
        self._pending: dict[int, _Call] = {}
        self._streams = itertools.count(1)
        self._writing = threading.Lock()
        self._reading = threading.Lock()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._buffer = bytearray()

    @classmethod
    def open(cls, route: _Route, deadline: float) -> _Connection:
        """Dial and say hello within ``deadline``.

        Raises:
            KynaraUnavailable: no daemon answered.
            KynaraError: the daemon refused the hello.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _closed_on_failure(route, sock):
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.connect(route.path)
            except TimeoutError:
                raise
            except OSError as err:
                raise _connect_failed(route, err) from None
            sock.sendall(route.hello)
            buffer = bytearray()
            while (answered := _hello_answer(route, buffer)) is None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(_READ_SIZE)
                if not chunk:
                    raise route.ended(buffer)
                buffer += chunk
            sock.settimeout(None)
        hello, used = answered
        conn = cls(sock, hello)
        conn._buffer += buffer[used:]
        return conn

    def start(self, payload: dict[str, Any], streaming: bool) -> tuple[int, _Call]:
        """Send a request on a new stream.

        Raises:
            _NotSent: nothing was written; the connection is broken.
            _Broken: part was written and the connection broke.
        """
        stream = next(self._streams)
        if stream > _MAX_STREAM:
            # Worn out: a new connection starts its ids afresh.
            self._fail(OSError("stream ids used up"))
            raise _NotSent
        # TODO(#9): the hello's max_in_flight is not waited for here as the
        # asyncio client does; a blocking call holds its thread, so only
        # more than that many threads on one Client (1024 by default) pass
        # it, and they get the daemon's invalid_request naming the stream.
        call = _Call(streaming)
        self._pending[stream] = call
        frame = _frame(payload, stream)
        with self._writing:
            if self.broken is not None:
                raise _NotSent
            try:
                sent = self.sock.send(frame)
            except OSError as err:
                self._fail(err)
                raise _NotSent from err
            if sent < len(frame):
                try:
                    self.sock.sendall(memoryview(frame)[sent:])
                except OSError as err:
                    self._fail(err)
                    raise _Broken from err
        return stream, call

    def cancel(self, stream: int) -> None:
        """Forget a call that stopped waiting and tell the daemon, best effort."""
        self._pending.pop(stream, None)
        if self.broken is not None:
            return
        frame = _frame(_CANCEL, stream)
        with self._writing:
            try:
                self.sock.sendall(frame)
            except OSError as err:
                self._fail(err)

    def finish(self, stream: int) -> None:
        """Forget a streaming call whose answers the caller no longer reads."""
        self._pending.pop(stream, None)

    def next_message(self, call: _Call, deadline: float) -> bytes | None:
        """The call's next answer, or None when ``deadline`` passed first.

        Raises:
            _Broken: the connection broke first.
        """
        inbox = call.inbox
        while True:
            if inbox:
                message = inbox.popleft()
                if message is _BROKEN:
                    raise _Broken
                return message
            if self._reading.acquire(blocking=False):
                try:
                    self._lead(call, deadline)
                finally:
                    self._reading.release()
                    self._wake_followers()
                if not inbox:
                    return None
                continue
            if call.event is None:
                # Made before trying once more, so that a leader that lets
                # go after this point sees it and wakes this caller.
                call.event = threading.Event()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            call.event.wait(min(remaining, _SLEEP_SLICE))
            call.event.clear()

    def _lead(self, call: _Call, deadline: float) -> None:
        # Read frames, handing each to its call, until ``call`` has one, the
        # deadline passes or the connection breaks.
        inbox = call.inbox
        while not inbox:
            if self.broken is not None:
                return
            if self._dispatch():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                if not self._poll.poll(min(remaining, _SLEEP_SLICE) * 1000):
                    continue
                chunk = self.sock.recv(_READ_SIZE)
            except OSError as err:
                self._fail(err)
                return
            if not chunk:
                self._fail(ConnectionResetError("the daemon closed the connection"))
                return
            self._buffer += chunk

    def _dispatch(self) -> bool:
        # Hand out every whole frame in the buffer; True when there was one
        # (or the connection broke on a bad one).
        pending = self._pending
        handed = False
        try:
            for stream, payload in _frames(self._buffer):
                handed = True
                call = pending.get(stream)
                if call is not None:
                    call.inbox.append(payload)
                    if not call.streaming:
                        del pending[stream]
                    if call.event is not None:
                        call.event.set()
        except _BadFrame as err:
            self._fail(err)
            return True
        return handed

    def _wake_followers(self) -> None:
        # Whoever is still waiting may have to read now that nobody does.
        if self._pending:
            for call in list(self._pending.values()):
                if call.event is not None:
                    call.event.set()

    def _fail(self, err: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = err
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.inbox.append(_BROKEN)
            if call.event is not None:
                call.event.set()

    def close(self) -> None:
        self._fail(ConnectionAbortedError("the client closed the connection"))
        self.sock.close()


class FastTransport:
    """The blocking fast path for ``Client``: one connection, shared by all
    threads, dialled on first use and again after it breaks."""

    name = "fast"

    def __init__(self, path: str, timeout: float, authorization: str | None) -> None:
        self._route = _Route(path, timeout, authorization)
        self.target = self._route.target
        self._conn: _Connection | None = None
        self._dialling = threading.Lock()
        self._closed = False

    def decide(self, item: DecisionRequest) -> Decision:
        request = request_map(item)
        return self._route.read_decision(self._ask("decide", request))

    def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        raw = self._ask("decide_batch", _batch_request(items))
        return self._route.read_batch(raw, len(items))

    def wait_approval(self, wait: ApprovalWait) -> ApprovalUpdate:
        deadline = time.monotonic() + wait.timeout
        payload = {
            "op": "wait_approval",
            "timeout_ms": _timeout_ms(wait.timeout),
            "request": {"approval_id": wait.approval_id},
        }
        conn, stream, call = self._start(payload, deadline, streaming=True)
        try:
            while True:
                try:
                    raw = conn.next_message(call, deadline)
                except _Broken:
                    raise self._route.broke(conn.broken) from None
                if raw is None:
                    conn.cancel(stream)
                    raise wait.timed_out()
                resolved = self._route.read_wait(raw, wait)
                if resolved is not None:
                    return resolved
        finally:
            conn.finish(stream)

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _ask(self, op: str, request: dict[str, Any]) -> bytes:
        timeout = self._route.timeout
        deadline = time.monotonic() + timeout
        payload = {"op": op, "timeout_ms": _timeout_ms(timeout), "request": request}
        conn, stream, call = self._start(payload, deadline, streaming=False)
        try:
            raw = conn.next_message(call, deadline)
        except _Broken:
            raise self._route.broke(conn.broken) from None
        if raw is None:
            conn.cancel(stream)
            raise self._route.timed_out(timeout)
        return raw

    def _start(
        self, payload: dict[str, Any], deadline: float, streaming: bool
    ) -> tuple[_Connection, int, _Call]:
        for attempt in (1, 2):
            conn = self._connection(deadline)
            try:
                stream, call = conn.start(payload, streaming)
            except _NotSent:
                # A connection the daemon closed while idle: it never saw
                # the request, so a fresh connection may carry it, once.
                if attempt == 2:
                    raise self._route.unreachable("the connection broke") from None
                continue
            except _Broken:
                raise self._route.unreachable("the connection broke") from None
            return conn, stream, call
        raise AssertionError("unreachable")

    def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.broken is None:
            return conn
        with self._dialling:
            conn = self._conn
            if conn is not None and conn.broken is None:
                return conn
            if self._closed:
                raise RuntimeError(f"the client for {self.target} is closed")
            fresh = _Connection.open(self._route, deadline)
            self._conn = fresh
        if conn is not None:
            conn.close()
        return fresh


# -- asyncio ---------------------------------------------------------------


class _Expired(Exception):
    pass


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


class _AsyncConnection:
    """One connection on one event loop, after its hello; read by a reader
    callback of that loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        hello: _Hello,
        buffer: bytearray,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.max_message_bytes = hello.max_message_bytes
        self.max_in_flight = hello.max_in_flight
        # Callers waiting for a request in flight to end (max_in_flight).
        self._room: collections.deque[asyncio.Future] = collections.deque()
        self.broken: BaseException | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._queues: dict[int, asyncio.Queue] = {}
        self._streams = itertools.count(1)
        self._buffer = buffer
        self._unsent = bytearray()
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._on_readable)
        if buffer:
            self._dispatch()

    @classmethod
    async def open(cls, route: _Route, deadline: float) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        with _closed_on_failure(route, sock):
            async with asyncio.timeout_at(loop.time() + (deadline - time.monotonic())):
                try:
                    await loop.sock_connect(sock, route.path)
                except TimeoutError:
                    raise
                except OSError as err:
                    raise _connect_failed(route, err) from None
                await loop.sock_sendall(sock, route.hello)
                buffer = bytearray()
                while (answered := _hello_answer(route, buffer)) is None:
                    chunk = await loop.sock_recv(sock, _READ_SIZE)
                    if not chunk:
                        raise route.ended(buffer)
                    buffer += chunk
        hello, used = answered
        return cls(loop, sock, hello, buffer[used:])

    def start(self, payload: dict[str, Any], future: asyncio.Future | None) -> int:
        """Send a request on a new stream; its answer goes to ``future``, or
        with ``future`` None to a queue (``queue(stream)``).

        Raises:
            _NotSent: nothing was written; the connection is broken.
        """
        if self.broken is not None:
            raise _NotSent
        stream = next(self._streams)
        if stream > _MAX_STREAM:
            self._fail(OSError("stream ids used up"))
            raise _NotSent
        if future is not None:
            self._futures[stream] = future
        else:
            self._queues[stream] = asyncio.Queue()
        if not self._write(_frame(payload, stream)):
            self._futures.pop(stream, None)
            self._queues.pop(stream, None)
            raise _NotSent
        return stream

    def queue(self, stream: int) -> asyncio.Queue:
        return self._queues[stream]

    def full(self) -> bool:
        """True when another request would pass the daemon's max_in_flight."""
        limit = self.max_in_flight
        return bool(limit) and len(self._futures) + len(self._queues) >= limit

    async def room(self) -> None:
        """Wait until a request in flight ends (or the connection breaks)."""
        while self.full() and self.broken is None:
            waiter = self.loop.create_future()
            self._room.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Pass the wake-up on: this caller no longer wants the room.
                if waiter.done() and not waiter.cancelled():
                    self._freed()
                raise

    def _freed(self) -> None:
        # A request in flight ended: let one waiting caller send.
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def cancel(self, stream: int) -> None:
        """Forget a call that stopped waiting and tell the daemon, best effort."""
        self._futures.pop(stream, None)
        self._queues.pop(stream, None)
        if self._room:
            self._freed()
        if self.broken is None:
            self._write(_frame(_CANCEL, stream))

    def finish(self, stream: int) -> None:
        if self._queues.pop(stream, None) is not None and self._room:
            self._freed()

    def _write(self, frame: bytearray) -> bool:
        # False when nothing could be written: the connection is broken.
        if self._unsent:
            self._unsent += frame
            return True
        try:
            sent = self.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._fail(err)
            return False
        if sent < len(frame):
            self._unsent += memoryview(frame)[sent:]
            self.loop.add_writer(self._fd, self._on_writable)
        return True

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._fail(err)
            return
        del self._unsent[:sent]
        if not self._unsent:
            self.loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        try:
            chunk = self.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._fail(err)
            return
        if not chunk:
            self._fail(ConnectionResetError("the daemon closed the connection"))
            return
        self._buffer += chunk
        self._dispatch()

    def _dispatch(self) -> None:
        futures = self._futures
        try:
            for stream, payload in _frames(self._buffer):
                future = futures.pop(stream, None)
                if future is not None:
                    if self._room:
                        self._freed()
                    if not future.done():
                        future.set_result(payload)
                else:
                    queue = self._queues.get(stream)
                    if queue is not None:
                        queue.put_nowait(payload)
        except _BadFrame as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = err
        self._detach()
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(_Broken())
        room, self._room = self._room, collections.deque()
        for waiter in room:
            if not waiter.done():
                waiter.set_result(None)
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            queue.put_nowait(_BROKEN)

    def _detach(self) -> None:
        # Stop watching the socket and close it.
        if self.sock.fileno() == -1:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
        self.sock.close()

    def close(self) -> None:
        """Close from this connection's loop."""
        self._fail(ConnectionAbortedError("the client closed the connection"))

    def discard(self) -> None:
        """Close from any thread: the connection's loop may be gone, or
        running elsewhere."""
        loop = self.loop
        if loop.is_closed() or not loop.is_running():
            self.broken = self.broken or ConnectionAbortedError("discarded")
            if not loop.is_closed():
                loop.remove_reader(self._fd)
                loop.remove_writer(self._fd)
            self.sock.close()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.close()
        else:
            loop.call_soon_threadsafe(self.close)


class AsyncFastTransport:
    """The asyncio fast path for ``AsyncClient``: one connection per event
    loop, shared by all tasks, dialled on first use and again after it
    breaks. A call its caller cancels sends ``cancel`` for its stream."""

    name = "fast"

    def __init__(self, path: str, timeout: float, authorization: str | None) -> None:
        self._route = _Route(path, timeout, authorization)
        self.target = self._route.target
        self._conn: _AsyncConnection | None = None
        self._dialling: asyncio.Lock | None = None
        self._dialling_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def decide(self, item: DecisionRequest) -> Decision:
        request = request_map(item)
        return self._route.read_decision(await self._ask("decide", request))

    async def decide_batch(
        self, items: list[DecisionRequest]
    ) -> list[Decision | KynaraError]:
        raw = await self._ask("decide_batch", _batch_request(items))
        return self._route.read_batch(raw, len(items))

    async def wait_approval(self, wait: ApprovalWait) -> ApprovalUpdate:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait.timeout
        payload = {
            "op": "wait_approval",
            "timeout_ms": _timeout_ms(wait.timeout),
            "request": {"approval_id": wait.approval_id},
        }
        conn, stream = await self._start(payload, None, deadline)
        queue = conn.queue(stream)
        try:
            async with asyncio.timeout_at(loop.time() + wait.timeout):
                while True:
                    raw = await queue.get()
                    if raw is _BROKEN:
                        raise self._route.broke(conn.broken)
                    resolved = self._route.read_wait(raw, wait)
                    if resolved is not None:
                        return resolved
        except TimeoutError:
            conn.cancel(stream)
            raise wait.timed_out() from None
        except asyncio.CancelledError:
            conn.cancel(stream)
            raise
        finally:
            conn.finish(stream)

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.discard()

    def discard(self) -> None:
        """Close from outside any loop (``close_default_clients``)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.discard()

    async def _ask(self, op: str, request: dict[str, Any]) -> bytes:
        timeout = self._route.timeout
        deadline = time.monotonic() + timeout
        payload = {"op": op, "timeout_ms": _timeout_ms(timeout), "request": request}
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        conn, stream = await self._start(payload, future, deadline)
        timer = loop.call_later(max(deadline - time.monotonic(), 0), _expire, future)
        try:
            return await future
        except _Expired:
            conn.cancel(stream)
            raise self._route.timed_out(timeout) from None
        except _Broken:
            raise self._route.broke(conn.broken) from None
        except asyncio.CancelledError:
            conn.cancel(stream)
            raise
        finally:
            timer.cancel()

    async def _start(
        self, payload: dict[str, Any], future: asyncio.Future | None, deadline: float
    ) -> tuple[_AsyncConnection, int]:
        for attempt in (1, 2):
            conn = await self._connection(deadline)
            while conn.full():
                # Rare: more calls at once than the daemon takes on one
                # connection; wait for one to end, within this call's time.
                loop = asyncio.get_running_loop()
                try:
                    async with asyncio.timeout_at(
                        loop.time() + deadline - time.monotonic()
                    ):
                        await conn.room()
                except TimeoutError:
                    raise self._route.timed_out(self._route.timeout) from None
                conn = await self._connection(deadline)
            try:
                return conn, conn.start(payload, future)
            except _NotSent:
                if attempt == 2:
                    raise self._route.unreachable("the connection broke") from None
        raise AssertionError("unreachable")

    async def _connection(self, deadline: float) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is not None and conn.broken is None and conn.loop is loop:
            return conn
        if self._dialling is None or self._dialling_loop is not loop:
            self._dialling = asyncio.Lock()
            self._dialling_loop = loop
        async with self._dialling:
            conn = self._conn
            if conn is not None and conn.broken is None and conn.loop is loop:
                return conn
            if self._closed:
                raise RuntimeError(f"the client for {self.target} is closed")
            fresh = await _AsyncConnection.open(self._route, deadline)
            self._conn = fresh
        if conn is not None:
            conn.discard()
        return fresh
