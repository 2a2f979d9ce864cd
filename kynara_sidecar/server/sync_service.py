"""The admin listener's ``kynara.v1.SyncService``: sync with the central
store now.

``SyncNow`` is served when the daemon follows signed bundles
(``policy.source``), the collector's signed directory (``directory.store``),
or both. Each call is authorized first (an ``operator`` credential, see
``admin``), then runs ``Followers.sync_now``: the directory's follower,
then the bundles', each on the same path as its background loop and
SIGHUP, so the answer is the true outcome, and a refusal leaves the
previous revision active. The bundle's outcome fills the response's own
fields and the directory's its ``directory`` message, so a refused
directory never hides how the bundle fared, nor the reverse.

``ShipNow`` seals the open audit segment and ships everything sealed,
waiting a bounded time for the store's acknowledgement: what a Kubernetes
preStop hook runs (``kynara-sidecar sync ship``) so the last decisions
reach the store before the pod and its volume go. It runs the shipper's own
rounds (``SegmentShipper.ship_through``), serialized with the background
ones, so a segment is never sent twice at once.

Admin calls are not audited; the sync itself is logged and counted by the
follower, the shipping by the shipper, and the seal is a ``seal`` marker
record in the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import grpc
from kynara.v1 import sync_pb2 as pb
from kynara.v1 import sync_pb2_grpc

from kynara_sidecar.config import AdminRole
from kynara_sidecar.errors import (
    AuditUnavailable,
    ErrorCode,
    InvalidRequest,
    KynaraError,
    RequestError,
    ServiceError,
)
from kynara_sidecar.server.admin import AdminCredentials, authorization_of
from kynara_sidecar.server.status import abort_with
from kynara_sidecar.sync import StoreUnavailable
from kynara_sidecar.sync.follower import Followers, LastSync
from kynara_sidecar.sync.shipper import SegmentShipper

__all__ = ["MAX_SHIP_WAIT_SECONDS", "SyncService"]

log = logging.getLogger("kynara.server")

# A preStop hook's whole budget is the pod's termination grace period; ten
# minutes is past any sensible one, and bounds a call that would hold an
# admin connection open.
MAX_SHIP_WAIT_SECONDS = 600.0


class NotShipping(RequestError):
    """ShipNow on a daemon that ships no segments: no central store, or
    ``sync.ship_segments`` off (or the log down, so shipping never started).
    """

    # The request is one this daemon's config cannot serve: invalid_request,
    # with FAILED_PRECONDITION (not INVALID_ARGUMENT) since the same call
    # succeeds on a daemon with a store; the message names the keys.
    code = ErrorCode.INVALID_REQUEST
    status = grpc.StatusCode.FAILED_PRECONDITION


class NotAcknowledged(AuditUnavailable):
    """The store did not acknowledge the sealed segments in time; the
    records are safe in the local log and ship later."""


class SyncService(sync_pb2_grpc.SyncServiceServicer):
    """Serves SyncService to operators: SyncNow over the daemon's bundle
    and directory followers, ShipNow over its segment shipper.

    Args:
        follower: the daemon's followers of ``policy.source`` and
            ``directory.store``; None when it follows neither
            (``policy.source`` is a directory of policy files and
            ``directory.store`` is unset: SyncNow is then UNIMPLEMENTED).
        credentials: the admin credentials.
        store: the central store's URL ("" for none), for ShipNow's errors.
        shipper: returns the daemon's segment shipper, None while it ships
            nothing.
        seal: seals the open segment; returns the log's sealed size.
        default_wait: ShipNow's wait when the request gives none
            (``sync.timeout_seconds``).
    """

    def __init__(
        self,
        follower: Followers | None,
        credentials: AdminCredentials,
        *,
        store: str = "",
        shipper: Callable[[], SegmentShipper | None] = lambda: None,
        seal: Callable[[], Awaitable[int]] | None = None,
        default_wait: float = 5.0,
    ):
        self._follower = follower
        self._credentials = credentials
        self._store = store
        self._shipper = shipper
        self._seal = seal
        self._default_wait = default_wait

    def register(self, server: grpc.aio.Server) -> None:
        """Serve this service on ``server``."""
        sync_pb2_grpc.add_SyncServiceServicer_to_server(self, server)

    async def SyncNow(  # noqa: N802 (gRPC method name)
        self, request: pb.SyncNowRequest, context: grpc.aio.ServicerContext
    ) -> pb.SyncNowResponse:
        follower = self._follower
        if follower is None:
            # As before ShipNow joined the service: nothing followed, no
            # SyncNow.
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "this daemon follows no bundles and no signed directory: its "
                "policy.source is a directory and directory.store is not set",
            )
        try:
            self._credentials.authorize(
                authorization_of(context), AdminRole.OPERATOR, "SyncService.SyncNow"
            )
            assert follower is not None
            result = await follower.sync_now(force=request.force)
        except KynaraError as err:
            await abort_with(context, err)
            raise AssertionError("unreachable: abort_with raises") from err
        except Exception as err:
            await self._internal(context, "SyncNow", err)
            raise AssertionError("unreachable: abort_with raises") from err
        bundle = {} if result.bundle is None else _sync_fields(result.bundle)
        directory = (
            pb.DirectorySync()
            if result.directory is None
            else pb.DirectorySync(configured=True, **_sync_fields(result.directory))
        )
        return pb.SyncNowResponse(**bundle, directory=directory)

    async def ShipNow(  # noqa: N802 (gRPC method name)
        self, request: pb.ShipNowRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShipNowResponse:
        try:
            self._credentials.authorize(
                authorization_of(context), AdminRole.OPERATOR, "SyncService.ShipNow"
            )
            wait = self._wait_of(request)
            shipper = self._shipping()
            assert self._seal is not None  # _shipping checked it
            since = await shipper.acknowledged()
            sealed = await self._seal()
            try:
                shipped = await shipper.ship_through(sealed, wait, since)
            except StoreUnavailable as err:
                status = await shipper.refresh()
                raise NotAcknowledged(
                    f"{err}; {status.backlog_records} audit records "
                    f"({status.backlog_segments} sealed segments) are not yet "
                    "acknowledged by the store (kynara_audit_shipping_backlog_"
                    "records); they ship in the background, or after the next "
                    "start if the log survives"
                ) from err
            status = await shipper.refresh()
        except KynaraError as err:
            await abort_with(context, err)
            raise AssertionError("unreachable: abort_with raises") from err
        except Exception as err:
            await self._internal(context, "ShipNow", err)
            raise AssertionError("unreachable: abort_with raises") from err
        log.info(
            "sealed and shipped on request",
            extra={
                "fields": {
                    "component": "server",
                    "call": "ShipNow",
                    "sealed_tree_size": sealed,
                    "shipped_segments": shipped,
                    "backlog_records": status.backlog_records,
                }
            },
        )
        return pb.ShipNowResponse(
            sealed_tree_size=sealed,
            shipped_segments=shipped,
            backlog_records=status.backlog_records,
            shipped_tree_size=status.shipped_tree_size,
        )

    def _wait_of(self, request: pb.ShipNowRequest) -> float:
        wait = request.wait_seconds
        if not math.isfinite(wait) or not 0 <= wait <= MAX_SHIP_WAIT_SECONDS:
            raise InvalidRequest(
                f"wait_seconds: expected 0..{MAX_SHIP_WAIT_SECONDS:g} seconds "
                f"(0: sync.timeout_seconds), got {wait}",
                field="wait_seconds",
            )
        return wait or self._default_wait

    def _shipping(self) -> SegmentShipper:
        if not self._store:
            raise NotShipping(
                "this daemon has no central store to ship to: set sync.store "
                "(or policy.source to a store URL)"
            )
        shipper = self._shipper()
        if shipper is None or self._seal is None:
            raise NotShipping(
                f"this daemon ships no audit segments to {self._store}: "
                "sync.ship_segments is off, or the audit log is down (see its "
                "health and log)"
            )
        return shipper

    async def _internal(
        self, context: grpc.aio.ServicerContext, call: str, err: Exception
    ) -> None:
        log.error(
            "admin call failed",
            exc_info=err,
            extra={"fields": {"component": "server", "call": call}},
        )
        await abort_with(context, ServiceError("internal error; see its log"))


def _sync_fields(sync: LastSync) -> dict[str, str]:
    """One follower's outcome as the fields SyncNowResponse and
    DirectorySync share."""
    return {
        "outcome": str(sync.outcome),
        "revision": sync.revision,
        "previous_revision": sync.previous_revision,
        "error": sync.error,
        "digest": sync.digest,
    }
