"""Clients for the daemon's ``DecisionService``: ``Client`` and ``AsyncClient``.

Both have the same shape. ``decide`` returns the ``Decision`` whatever it is
(a deny is an answer, not an error) and raises ``KynaraError`` only when no
answer was given; ``decide_batch`` answers each item on its own. The
decorator in ``kynara_sdk.decorator`` turns deny and require_approval into
exceptions.

The target is a gRPC target string: ``unix:///run/kynara/agent.sock`` or
``127.0.0.1:50151``. Without one the client reads ``KYNARA_TARGET``, then
falls back to ``DEFAULT_TARGET``.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from kynara.v1 import decision_pb2, decision_pb2_grpc

from kynara_sdk._wire import (
    WAIT_END_STATES,
    approval_error,
    build_request,
    decision_from_proto,
    error_from_rpc,
    outcome_from_item,
    update_from_proto,
    wait_error,
)
from kynara_sdk.decision import ApprovalUpdate, Decision, DecisionRequest
from kynara_sdk.errors import INTERNAL, KynaraError, KynaraUnavailable

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "SECRET_FILE_ENV",
    "TARGET_ENV",
    "AsyncClient",
    "Client",
    "resolve_target",
]

TARGET_ENV = "KYNARA_TARGET"
# A file holding this agent's bearer secret, for a daemon that serves several
# agents (identity.agents); each call then names its agent.
SECRET_FILE_ENV = "KYNARA_AGENT_SECRET_FILE"
# The socket a Kynara sidecar serves its agent on by convention (the shared
# volume mounted at /run/kynara in the Kubernetes manifests).
DEFAULT_TARGET = "unix:///run/kynara/agent.sock"
# Seconds per call. A durable decision waits for one synced LMDB commit (well
# under a millisecond); five seconds only trips on a stuck daemon, and a
# tripped deadline fails closed.
DEFAULT_TIMEOUT = 5.0


def resolve_target(target: str | None = None) -> str:
    """The target to dial: ``target``, else ``$KYNARA_TARGET``, else
    ``DEFAULT_TARGET``."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def _credential_metadata(secret_file: str | None) -> tuple[tuple[str, str], ...]:
    path = secret_file or os.environ.get(SECRET_FILE_ENV)
    if not path:
        return ()
    try:
        secret = pathlib.Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"secret_file: cannot read {path}: {err}") from None
    if not secret:
        raise ValueError(f"secret_file: {path} is empty")
    return (("authorization", f"Bearer {secret}"),)


class _Base:
    def __init__(
        self, target: str | None, timeout: float, secret_file: str | None = None
    ) -> None:
        self.timeout = _seconds(timeout)
        self.target = resolve_target(target)
        self._metadata = _credential_metadata(secret_file)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} for {self.target} is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"{type(self).__name__}(target={self.target!r}, {state})"


class Client(_Base):
    """A blocking client; thread-safe, one channel shared by all threads.

    Args:
        target: ``unix:///path/agent.sock`` or ``host:port`` on loopback;
            default ``$KYNARA_TARGET``, then ``DEFAULT_TARGET``.
        timeout: seconds each call may take before it fails with
            ``daemon_unreachable``.
        secret_file: this agent's bearer secret, sent with every call, for a
            daemon serving several agents; default ``$KYNARA_AGENT_SECRET_FILE``.

    Raises:
        TypeError, ValueError: ``timeout`` is not a positive number, or the
            secret file cannot be read.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        secret_file: str | None = None,
    ) -> None:
        super().__init__(target, timeout, secret_file)
        # TODO(#11): client certificates as the other per-agent credential;
        # only local insecure channels (Unix socket, loopback) are dialled.
        self._channel = grpc.insecure_channel(self.target)
        self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)

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
        request = build_request(
            DecisionRequest(
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
        )
        try:
            response = self._stub.Decide(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return decision_from_proto(response)

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
        batch = _build_batch(requests)
        try:
            response = self._stub.DecideBatch(
                batch, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return _read_batch(batch, response)

    def wait_approval(
        self, approval_id: str, timeout: float, *, decision_id: str = ""
    ) -> ApprovalUpdate:
        """Wait until a reviewer resolves one of this agent's approvals.

        Streams the daemon's ``WaitApproval``: the approval's state at once,
        then each change. Ending the wait, by timeout or otherwise, never
        changes the approval.

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
        wait = _Wait(self.target, approval_id, timeout, decision_id)
        stream = self._stub.WaitApproval(
            wait.request, timeout=wait.timeout, metadata=self._metadata
        )
        try:
            for message in stream:
                resolved = wait.take(message)
                if resolved is not None:
                    return resolved
        except grpc.RpcError as err:
            raise wait.failed(err) from err
        finally:
            stream.cancel()
        raise wait.ended_early()

    def close(self) -> None:
        """Close the channel; later calls raise ``RuntimeError``. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_Base):
    """An asyncio client with the same methods as ``Client``, awaited.

    The channel is opened on first use in the running event loop; used from
    another loop later (a second ``asyncio.run``), it opens a new one there,
    since a grpc.aio channel belongs to the loop that made it.

    Args:
        target, timeout, secret_file: as ``Client``.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        secret_file: str | None = None,
    ) -> None:
        super().__init__(target, timeout, secret_file)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stub: decision_pb2_grpc.DecisionServiceStub | None = None

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
        request = build_request(
            DecisionRequest(
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
        )
        try:
            response = await self._stub_here().Decide(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return decision_from_proto(response)

    async def decide_batch(
        self, requests: Iterable[DecisionRequest | Mapping[str, Any]]
    ) -> list[Decision | KynaraError]:
        """As ``Client.decide_batch``, awaited."""
        self._check_open()
        batch = _build_batch(requests)
        try:
            response = await self._stub_here().DecideBatch(
                batch, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.target) from err
        return _read_batch(batch, response)

    async def wait_approval(
        self, approval_id: str, timeout: float, *, decision_id: str = ""
    ) -> ApprovalUpdate:
        """As ``Client.wait_approval``, awaited."""
        self._check_open()
        wait = _Wait(self.target, approval_id, timeout, decision_id)
        stream = self._stub_here().WaitApproval(
            wait.request, timeout=wait.timeout, metadata=self._metadata
        )
        try:
            async for message in stream:
                resolved = wait.take(message)
                if resolved is not None:
                    return resolved
        except grpc.RpcError as err:
            raise wait.failed(err) from err
        finally:
            stream.cancel()
        raise wait.ended_early()

    async def aclose(self) -> None:
        """Close the channel; later calls raise ``RuntimeError``. Idempotent."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _stub_here(self) -> decision_pb2_grpc.DecisionServiceStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # NOTE: a channel left behind on an earlier loop is dropped, not
            # closed: its loop is gone (or not ours to run), and closing it
            # from here would block on that loop.
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = decision_pb2_grpc.DecisionServiceStub(self._channel)
            self._loop = loop
        return self._stub


def _seconds(timeout: float) -> float:
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise TypeError(
            f"timeout: expected seconds as a number, got {type(timeout).__name__}"
        )
    if not timeout > 0:
        raise ValueError(f"timeout: expected seconds > 0, got {timeout}")
    return float(timeout)


class _Wait:
    """One ``wait_approval`` call: what the blocking and the asyncio loops
    over its stream share (the request, the last update, the errors)."""

    def __init__(
        self, target: str, approval_id: str, timeout: float, decision_id: str
    ) -> None:
        self.target = target
        self.approval_id = approval_id
        self.timeout = _seconds(timeout)
        self.decision_id = decision_id
        self.request = decision_pb2.WaitApprovalRequest(approval_id=approval_id)
        self.last: ApprovalUpdate | None = None

    def take(self, message: decision_pb2.ApprovalUpdate) -> ApprovalUpdate | None:
        """The approved update that ends the wait, None while it goes on.

        Raises:
            ApprovalError, KynaraError: as ``approval_error`` for an end
                other than approved.
        """
        self.last = update_from_proto(message)
        if self.last.state not in WAIT_END_STATES:
            return None
        error = approval_error(self.last, self.decision_id)
        if error is not None:
            raise error
        return self.last

    def failed(self, err: grpc.RpcError) -> KynaraError:
        return wait_error(
            err,
            self.target,
            self.approval_id,
            self.timeout,
            self.decision_id,
            self.last,
        )

    def ended_early(self) -> KynaraUnavailable:
        # The daemon closed the stream before a final state: it is stopping.
        return KynaraUnavailable(
            f"the Kynara daemon at {self.target} ended the wait on approval "
            f"{self.approval_id} before it was resolved; wait again"
        )


def _build_batch(
    requests: Iterable[DecisionRequest | Mapping[str, Any]],
) -> decision_pb2.DecideBatchRequest:
    items = []
    for index, item in enumerate(requests):
        if isinstance(item, Mapping):
            try:
                item = DecisionRequest(**item)
            except TypeError as err:
                raise TypeError(f"requests[{index}]: {err}") from None
        elif not isinstance(item, DecisionRequest):
            raise TypeError(
                f"requests[{index}]: expected a DecisionRequest or a dict,"
                f" got {type(item).__name__}"
            )
        try:
            items.append(build_request(item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"requests[{index}]: {err}") from err
    return decision_pb2.DecideBatchRequest(items=items)


def _read_batch(
    batch: decision_pb2.DecideBatchRequest,
    response: decision_pb2.DecideBatchResponse,
) -> list[Decision | KynaraError]:
    if len(response.items) != len(batch.items):
        raise KynaraError(
            INTERNAL,
            f"expected one answer per request ({len(batch.items)}),"
            f" got {len(response.items)}",
            "items",
        )
    return [outcome_from_item(item) for item in response.items]
