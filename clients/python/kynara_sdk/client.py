"""Clients for the Kynara daemon: ``Client`` and ``AsyncClient``.

Both have the same shape. ``decide`` returns the ``Decision`` whatever it is
(a deny is an answer, not an error) and raises ``KynaraError`` only when no
answer was given; ``decide_batch`` answers each item on its own. The
decorator in ``kynara_sdk.decorator`` turns deny and require_approval into
exceptions.

Two transports carry the same calls with the same answers and errors: the
fast path (framed MessagePack on the daemon's own Unix socket,
protos/fastpath.md; needs msgspec only) and gRPC (``kynara-sdk[grpc]``).
The target is ``unix:///run/kynara/agent.sock`` (gRPC, with the fast path's
socket named after it beside it: ``agent.fast.sock``),
``fast:///path/agent.fast.sock`` or ``127.0.0.1:50151`` (gRPC only). Without
one the client reads ``KYNARA_TARGET``, then falls back to
``DEFAULT_TARGET``. The rule that picks the transport is in
``kynara_sdk._target``: by default the fast path when its socket exists and
takes the connection, else gRPC; settled once a call reached a daemon.

A daemon serving several agents (``identity.agents``) knows each caller by
its credential: a bearer secret (``secret_file``), sent with every call on
any transport, or a client certificate (``cert_file``, ``key_file`` and the
daemon's CA in ``ca_file``), presented in the TLS handshake of the daemon's
TCP port (``agent.tls``); TLS is gRPC over TCP only.
"""

from __future__ import annotations

import math
import os
import pathlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kynara_sdk._fast import NoListener
from kynara_sdk._target import (
    AUTO,
    FAST,
    FAST_RETRY_SECONDS,
    FAST_SOCKET_NAME,
    GRPC,
    GRPC_EXTRA,
    TRANSPORT_ENV,
    Route,
    grpc_installed,
    route,
)
from kynara_sdk._wire import ApprovalWait, batch_items
from kynara_sdk.decision import ApprovalUpdate, Decision, DecisionRequest
from kynara_sdk.errors import KynaraError, KynaraUnavailable

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "FAST_SOCKET_NAME",
    "SECRET_FILE_ENV",
    "TARGET_ENV",
    "TRANSPORT_ENV",
    "AsyncClient",
    "Client",
    "resolve_target",
]

TARGET_ENV = "KYNARA_TARGET"
# A file holding this agent's bearer secret, for a daemon that serves several
# agents (identity.agents); each call then names its agent.
SECRET_FILE_ENV = "KYNARA_AGENT_SECRET_FILE"
# The socket a Kynara sidecar serves its agent on by convention (the shared
# volume mounted at /run/kynara in the Kubernetes manifests); the fast path's
# socket is agent.fast.sock beside it.
DEFAULT_TARGET = "unix:///run/kynara/agent.sock"
# Seconds per call. A durable decision waits for one synced LMDB commit (well
# under a millisecond); five seconds only trips on a stuck daemon, and a
# tripped deadline fails closed.
DEFAULT_TIMEOUT = 5.0


def resolve_target(target: str | None = None) -> str:
    """The target to dial: ``target``, else ``$KYNARA_TARGET``, else
    ``DEFAULT_TARGET``."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def _read_pem(option: str, path: str) -> bytes:
    try:
        content = pathlib.Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{option}: cannot read {path}: {err}") from None
    if b"-----BEGIN " not in content:
        raise ValueError(f"{option}: expected PEM in {path}, got none")
    return content


def _tls(
    target: str,
    cert_file: str | None,
    key_file: str | None,
    ca_file: str | None,
) -> tuple[bytes | None, bytes, bytes] | None:
    # (CA PEM or None for the system's roots, key PEM, certificate PEM) for
    # a TLS channel with a client certificate, or None without TLS.
    if not (cert_file or key_file or ca_file):
        return None
    if not cert_file or not key_file:
        missing = "key_file" if cert_file else "cert_file"
        raise ValueError(
            f"{missing}: expected a path with cert_file and key_file together"
            " (the daemon's TLS port requires a client certificate), got none"
        )
    if target.startswith(("unix:", "unix-abstract:", "fast:")):
        raise ValueError(
            f"cert_file: TLS is for the daemon's TCP port (host:port), got the"
            f" socket target {target!r}; a Unix socket carries no TLS"
        )
    return (
        _read_pem("ca_file", ca_file) if ca_file else None,
        _read_pem("key_file", key_file),
        _read_pem("cert_file", cert_file),
    )


def _credential(secret_file: str | None) -> str | None:
    # The authorization value ("Bearer <secret>"), or None without a secret.
    path = secret_file or os.environ.get(SECRET_FILE_ENV)
    if not path:
        return None
    try:
        secret = pathlib.Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"secret_file: cannot read {path}: {err}") from None
    if not secret:
        raise ValueError(f"secret_file: {path} is empty")
    return f"Bearer {secret}"


class _Base:
    def __init__(
        self,
        target: str | None,
        timeout: float,
        secret_file: str | None,
        transport: str | None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.timeout = _seconds(timeout)
        self.target = resolve_target(target)
        self._route: Route = route(self.target, transport)
        self._authorization = _credential(secret_file)
        self._tls = _tls(self.target, cert_file, key_file, ca_file)
        # The transport settled on: the one whose call last reached a daemon
        # (auto settles on gRPC only where there is no fast socket).
        self._impl: Any = None
        # Each transport, made on first use and kept until close.
        self._fast: Any = None
        self._grpc: Any = None
        self._has_grpc: bool | None = None
        # When (time.monotonic) the fast socket last refused the connection.
        self._refused_at = -math.inf
        self._closed = False

    @property
    def transport(self) -> str:
        """``"fast"`` or ``"grpc"`` once settled (a call reached a daemon
        over it), else the choice as asked: ``"auto"``, ``"fast"`` or
        ``"grpc"``."""
        if self._impl is not None:
            return self._impl.name
        return self._route.transport

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.target} is closed")

    def _grpc_installed(self) -> bool:
        if self._has_grpc is None:
            self._has_grpc = grpc_installed()
        return self._has_grpc

    def _choose(self, asynchronous: bool) -> Any:
        """The transport for a call while none is settled; no I/O beyond a
        stat. ``auto`` takes the fast path when its socket exists (unless
        it refused the connection within ``FAST_RETRY_SECONDS`` and gRPC is
        there instead), else gRPC.

        Raises:
            KynaraUnavailable: ``auto`` found no fast path's socket and gRPC
                is not installed, or ``grpc`` was asked without the extra.
        """
        chosen = self._route.transport
        if chosen == AUTO:
            recent = time.monotonic() - self._refused_at < FAST_RETRY_SECONDS
            fast_here = self._route.fast_socket_exists()
            use_fast = fast_here and not (recent and self._grpc_installed())
            chosen = FAST if use_fast else GRPC
        if chosen == FAST:
            if self._fast is None:
                self._fast = self._make_fast(asynchronous)
            return self._fast
        if self._grpc is None:
            self._grpc = self._make_grpc(asynchronous)
        return self._grpc

    def _make_fast(self, asynchronous: bool) -> Any:
        from kynara_sdk._fast import AsyncFastTransport, FastTransport

        kind = AsyncFastTransport if asynchronous else FastTransport
        return kind(self._route.fast_socket, self.timeout, self._authorization)

    def _make_grpc(self, asynchronous: bool) -> Any:
        if not self._grpc_installed():
            looked = (
                f"the fast path's socket {self._route.fast_socket} does not exist and "
                if self._route.transport == AUTO and self._route.fast_socket
                else ""
            )
            raise KynaraUnavailable(
                f"no transport to the Kynara daemon at {self.target}: {looked}"
                f"gRPC is not installed ({GRPC_EXTRA}, after kynara-protos"
                " from the Kynara repository's protos/)"
            )
        from kynara_sdk._grpc import AsyncGrpcTransport, GrpcTransport

        kind = AsyncGrpcTransport if asynchronous else GrpcTransport
        metadata = (
            (("authorization", self._authorization),) if self._authorization else ()
        )
        return kind(self._route.grpc_target, self.timeout, metadata, self._tls)

    def _reached(self, impl: Any) -> None:
        """A call over ``impl`` reached a daemon: settle on it. Not on gRPC
        in ``auto`` while a fast socket is there (it refused the connection;
        it is dialled again later)."""
        if self._impl is impl:
            return
        if (
            impl is self._grpc
            and self._route.transport == AUTO
            and self._route.fast_socket_exists()
        ):
            return
        self._impl = impl

    def _instead(self, refused: Any) -> Any | None:
        """After the fast socket refused the connection (nothing was sent):
        in ``auto`` with gRPC installed, the gRPC transport to carry the call
        instead; else None (the refusal is the answer)."""
        if self._route.transport != AUTO or not self._grpc_installed():
            return None
        self._refused_at = time.monotonic()
        if self._impl is refused:
            self._impl = None
        return self._choose(self._asynchronous)

    _asynchronous = False

    def _transports(self) -> list[Any]:
        # Every transport made, for close; forgets them.
        made = [t for t in (self._fast, self._grpc) if t is not None]
        self._impl = self._fast = self._grpc = None
        return made

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"{type(self).__name__}(target={self.target!r},"
            f" transport={self.transport!r}, {state})"
        )


class Client(_Base):
    """A blocking client; thread-safe, one connection shared by all threads.

    Args:
        target: ``unix:///path/agent.sock``, ``fast:///path/agent.fast.sock``
            or ``host:port`` on loopback; default ``$KYNARA_TARGET``, then
            ``DEFAULT_TARGET``.
        timeout: seconds each call may take before it fails with
            ``daemon_unreachable``; the daemon is told the same deadline.
        secret_file: this agent's bearer secret, sent with every call, for a
            daemon serving several agents; default ``$KYNARA_AGENT_SECRET_FILE``.
        transport: ``"auto"`` (the fast path when its socket exists and
            takes the connection, else gRPC), ``"fast"`` or ``"grpc"``;
            default ``$KYNARA_TRANSPORT`` (any case), then ``"auto"``.
        cert_file, key_file: this agent's client certificate (PEM, leaf
            first) and its unencrypted private key, for the daemon's TLS
            port (``agent.tls``; a ``host:port`` target); both or neither.
        ca_file: the CA certificate(s) that signed the daemon's serving
            certificate, in PEM; default the system's roots.

    Raises:
        TypeError, ValueError: ``timeout`` is not a positive number, the
            secret or a certificate file cannot be read, only one of
            ``cert_file`` and ``key_file`` is given, TLS is asked of a Unix
            socket target, or the transport does not suit the target (a TCP
            target is gRPC only).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        secret_file: str | None = None,
        transport: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        super().__init__(
            target, timeout, secret_file, transport, cert_file, key_file, ca_file
        )
        self._choosing = threading.Lock()

    def decide(
        self,
        action: str,
        *,
        resource_kind: str,
        resource_id: str = "",
        attributes: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        user: str | None = None,
        chain: Sequence[str] | None = None,
        token: str | None = None,
        request_id: str | None = None,
        approval_id: str | None = None,
    ) -> Decision:
        """Ask whether the subject may do ``action`` on the resource.

        Args:
            action: dotted action name, e.g. ``payments.refund.issue``.
            resource_kind: dotted resource kind, e.g. ``payments.refund``.
            resource_id: the resource's id within its kind.
            attributes: resource attributes (policies see
                ``resource.attr``); values as ``kynara_sdk`` converts them.
            context: caller context (policies see ``context``).
            user, chain, token: the subject for this call only, overriding
                ``acting_for``; at most one.
            request_id: echoed in the answer and the audit record.
            approval_id: retry with an approved approval's grant (the id of
                ``ApprovalRequired`` or ``Decision.approval``): the same
                request, decided again, is allowed once with reason
                ``approval_granted``; a request that differs, a second use,
                a rejected or expired approval is a deny saying which.

        Returns:
            The ``Decision``: allow, deny or require_approval.

        Raises:
            KynaraUnavailable: no answer (code ``daemon_unreachable``).
            KynaraError: the daemon gave no answer; ``code`` says why.
            TypeError, ValueError: a value or the subject is malformed
                (nothing was sent).
            RuntimeError: the client is closed.
        """
        self._check_open()
        item = DecisionRequest(
            action,
            resource_kind,
            resource_id,
            attributes,
            context,
            user,
            chain,
            token,
            request_id,
            approval_id,
        )
        return self._run("decide", item)

    def decide_batch(
        self, requests: Iterable[DecisionRequest | Mapping[str, Any]]
    ) -> list[Decision | KynaraError]:
        """Ask about several requests in one call; each is answered on its own.

        Args:
            requests: ``DecisionRequest`` items, or dicts of ``decide``'s
                keyword arguments (with ``action``).

        Returns:
            One entry per request, in order: its ``Decision``, or the
            ``KynaraError`` saying why that item got no answer.

        Raises:
            KynaraError: the batch as a whole got no answer.
            TypeError, ValueError: an item is malformed (nothing was sent).
            RuntimeError: the client is closed.
        """
        self._check_open()
        items = batch_items(requests)
        return self._run("decide_batch", items)

    def wait_approval(
        self, approval_id: str, timeout: float, *, decision_id: str = ""
    ) -> ApprovalUpdate:
        """Wait until a reviewer resolves one of this agent's approvals.

        Streams the approval's state from the daemon: at once, then each
        change. Ending the wait, by timeout or otherwise, never changes the
        approval.

        Args:
            approval_id: the approval (``ApprovalRequired.approval_id``).
            timeout: seconds to wait at most.
            decision_id: the require_approval decision, attached to errors.

        Returns:
            The ``approved`` update: retry with ``decide(...,
            approval_id=approval_id)`` to use the grant.

        Raises:
            ApprovalTimeout: no reviewer resolved it in time; it stays
                pending (code ``approval_timeout``, never a rejection).
            ApprovalRejected, ApprovalExpired: it was rejected or expired.
            ApprovalError: code ``approval_used``: another request used it.
            KynaraError: no approval of this agent has that id
                (``not_found``), or no answer (``daemon_unreachable``, ...).
            RuntimeError: the client is closed.
        """
        self._check_open()
        wait = ApprovalWait(self.target, approval_id, _seconds(timeout), decision_id)
        return self._run("wait_approval", wait)

    def close(self) -> None:
        """Close the connection; later calls raise ``RuntimeError``. Idempotent."""
        if not self._closed:
            self._closed = True
            with self._choosing:
                made = self._transports()
            for impl in made:
                impl.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, method: str, argument: Any) -> Any:
        # Carry one call over the settled transport, or the one chosen now;
        # a fast socket nobody listens on hands the call to gRPC in auto.
        impl = self._impl or self._pick()
        try:
            return self._over(impl, method, argument)
        except NoListener:
            with self._choosing:
                self._check_open()
                instead = self._instead(impl)
            if instead is None:
                raise
        return self._over(instead, method, argument)

    def _over(self, impl: Any, method: str, argument: Any) -> Any:
        try:
            result = getattr(impl, method)(argument)
        except KynaraUnavailable:
            raise
        except KynaraError:
            self._reached(impl)  # the daemon answered with an error
            raise
        self._reached(impl)
        return result

    def _pick(self) -> Any:
        with self._choosing:
            self._check_open()
            return self._impl or self._choose(asynchronous=False)


class AsyncClient(_Base):
    """An asyncio client with the same methods as ``Client``, awaited.

    Its fast path connection is opened on first use in the running event
    loop and shared by all tasks there; used from another loop later (a
    second ``asyncio.run``), it opens a new one there. Its gRPC channel
    serves every loop. A call cancelled by its caller is cancelled at the
    daemon too.

    Args:
        target, timeout, secret_file, transport, cert_file, key_file,
        ca_file: as ``Client``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        secret_file: str | None = None,
        transport: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        super().__init__(
            target, timeout, secret_file, transport, cert_file, key_file, ca_file
        )

    async def decide(
        self,
        action: str,
        *,
        resource_kind: str,
        resource_id: str = "",
        attributes: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        user: str | None = None,
        chain: Sequence[str] | None = None,
        token: str | None = None,
        request_id: str | None = None,
        approval_id: str | None = None,
    ) -> Decision:
        """As ``Client.decide``, awaited."""
        self._check_open()
        item = DecisionRequest(
            action,
            resource_kind,
            resource_id,
            attributes,
            context,
            user,
            chain,
            token,
            request_id,
            approval_id,
        )
        return await self._run("decide", item)

    async def decide_batch(
        self, requests: Iterable[DecisionRequest | Mapping[str, Any]]
    ) -> list[Decision | KynaraError]:
        """As ``Client.decide_batch``, awaited."""
        self._check_open()
        items = batch_items(requests)
        return await self._run("decide_batch", items)

    async def wait_approval(
        self, approval_id: str, timeout: float, *, decision_id: str = ""
    ) -> ApprovalUpdate:
        """As ``Client.wait_approval``, awaited."""
        self._check_open()
        wait = ApprovalWait(self.target, approval_id, _seconds(timeout), decision_id)
        return await self._run("wait_approval", wait)

    async def aclose(self) -> None:
        """Close the connection; later calls raise ``RuntimeError``. Idempotent."""
        self._closed = True
        for impl in self._transports():
            await impl.aclose()

    def discard(self) -> None:
        """Close without awaiting, from any thread: for a client whose event
        loop may be gone (``close_default_clients``)."""
        self._closed = True
        for impl in self._transports():
            impl.discard()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    _asynchronous = True

    async def _run(self, method: str, argument: Any) -> Any:
        # As Client._run, awaited. Choosing does no I/O and does not await,
        # so the tasks of one loop need no lock around it.
        impl = self._impl or self._choose(asynchronous=True)
        try:
            return await self._over(impl, method, argument)
        except NoListener:
            self._check_open()
            instead = self._instead(impl)
            if instead is None:
                raise
        return await self._over(instead, method, argument)

    async def _over(self, impl: Any, method: str, argument: Any) -> Any:
        try:
            result = await getattr(impl, method)(argument)
        except KynaraUnavailable:
            raise
        except KynaraError:
            self._reached(impl)
            raise
        self._reached(impl)
        return result


def _seconds(timeout: float) -> float:
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(
            f"timeout: expected seconds as a number, got {type(timeout).__name__}"
        )
    if not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout}")
    return float(timeout)
