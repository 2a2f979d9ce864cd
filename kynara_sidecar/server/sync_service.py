"""The admin listener's ``kynara.v1.SyncService``: sync policy bundles now.

Served only when the daemon follows signed bundles. Each call is
authorized first (an ``operator`` credential, see ``admin``), then runs
``BundleFollower.sync_now``: the same path as the background loop and
SIGHUP, so the answer is the true outcome, and a refusal leaves the
previous revision active. Admin calls are not audited; the sync itself is
logged and counted by the follower.
"""

from __future__ import annotations

import logging

import grpc
from kynara.v1 import sync_pb2 as pb
from kynara.v1 import sync_pb2_grpc

from kynara_sidecar.config import AdminRole
from kynara_sidecar.errors import KynaraError, ServiceError
from kynara_sidecar.server.admin import AdminCredentials, authorization_of
from kynara_sidecar.server.status import abort_with
from kynara_sidecar.sync.follower import BundleFollower

__all__ = ["SyncService"]

log = logging.getLogger("kynara.server")


class SyncService(sync_pb2_grpc.SyncServiceServicer):
    """Serves SyncService over the daemon's bundle follower to operators.

    Args:
        follower: the daemon's follower of ``policy.source``.
        credentials: the admin credentials.
    """

    def __init__(self, follower: BundleFollower, credentials: AdminCredentials):
        self._follower = follower
        self._credentials = credentials

    def register(self, server: grpc.aio.Server) -> None:
        """Serve this service on ``server``."""
        sync_pb2_grpc.add_SyncServiceServicer_to_server(self, server)

    async def SyncNow(  # noqa: N802 (gRPC method name)
        self, request: pb.SyncNowRequest, context: grpc.aio.ServicerContext
    ) -> pb.SyncNowResponse:
        try:
            self._credentials.authorize(
                authorization_of(context), AdminRole.OPERATOR, "SyncService.SyncNow"
            )
            result = await self._follower.sync_now(force=request.force)
        except KynaraError as err:
            await abort_with(context, err)
            raise AssertionError("unreachable: abort_with raises") from err
        except Exception as err:
            log.exception(
                "admin call failed",
                extra={"fields": {"component": "server", "call": "SyncNow"}},
            )
            await abort_with(context, ServiceError("internal error; see its log"))
            raise AssertionError("unreachable: abort_with raises") from err
        return pb.SyncNowResponse(
            outcome=str(result.outcome),
            revision=result.revision,
            previous_revision=result.previous_revision,
            error=result.error,
            digest=result.digest,
        )
