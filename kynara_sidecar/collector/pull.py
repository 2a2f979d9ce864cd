"""Pulling segments from a daemon's admin ``AuditService``.

Each poll:

1. ``GetHead``: the daemon's latest checkpoint. For the log the collector
   accepted, past the accepted tree size ``N``, ``GetConsistencyProof(N,
   head)`` first: only checkpoints are at hand here, so the proof (checked
   with ``verifier.verify_head``) shows the daemon's tree still extends the
   accepted one before anything is streamed. A head at or below ``N`` is
   current (identical), a ``rollback`` or a ``fork``, and refused without
   streaming.
2. ``StreamSegments(after=N)`` (0 for another log, which must then be a new
   chain): every message goes through the same intake as the store's
   deliveries, so a pulled segment is verified, archived and committed
   exactly like a shipped one.

A daemon already refused is not pulled: each poll would only repeat the
refusal. A failed call (the daemon is down, the credential refused) is
logged and counted, and the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from kynara.v1 import audit_pb2 as pb
from kynara.v1 import audit_pb2_grpc

from kynara_sidecar.collector.config import PullConfig
from kynara_sidecar.collector.intake import Intake
from kynara_sidecar.collector.metrics import CollectorMetrics
from kynara_sidecar.collector.verifier import HeadStep, Verdict, verify_head

__all__ = ["Puller"]

log = logging.getLogger("kynara.collector")

# Segments can be large: accept messages up to 64 MiB (the daemon sends at
# most 1 MiB of records a message, plus one record).
MAX_RECEIVE_BYTES = 64 << 20


class _Pulled:
    """A pulled message for the intake: nothing to acknowledge; a nak stops
    this stream, and the next poll pulls from the frontier again."""

    def __init__(self, daemon_id: str, data: bytes):
        self.daemon_id = daemon_id
        self.data = data
        self.naked = False

    async def ack(self) -> None:
        return None

    async def nak(self) -> None:
        self.naked = True


class Puller:
    """Pulls one daemon (a ``pull`` entry) into the intake."""

    def __init__(
        self,
        config: PullConfig,
        secret: bytes,
        intake: Intake,
        metrics: CollectorMetrics,
        *,
        roots: bytes | None = None,
    ):
        self._config = config
        # TLS to the admin port when the certificates to trust are given.
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates=roots)
            if roots is not None
            else None
        )
        self._metadata = (("authorization", f"Bearer {secret.decode()}"),)
        self._intake = intake
        self._metrics = metrics
        self._fields = {
            "component": "collector",
            "daemon": config.daemon_id,
            "target": config.target,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.pull_once()
            except grpc.aio.AioRpcError as err:
                self._metrics.failures.labels("pull").inc()
                fields = {
                    **self._fields,
                    "error": f"{err.code().name}: {err.details()}",
                }
                hint = self._hint(err)
                if hint:
                    fields["hint"] = hint
                log.warning("pull failed; retrying", extra={"fields": fields})
            try:
                await asyncio.wait_for(stop.wait(), self._config.poll_seconds)
            except TimeoutError:
                pass

    def _hint(self, err: grpc.aio.AioRpcError) -> str:
        """What to change when a TLS pull fails on the certificate's name:
        the target's host (an address, say) is not a name the daemon's
        certificate carries."""
        details = (err.details() or "").lower()
        if self._credentials is None or "hostname verification" not in details:
            return ""
        return (
            "the daemon's certificate does not name the target's host: set "
            "this pull entry's server_name to a name it carries (e.g. its "
            "subjectAltName DNS entry)"
        )

    async def pull_once(self) -> int:
        """One poll; returns the number of segments settled.

        Raises:
            grpc.aio.AioRpcError: a call failed.
        """
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._config.target, options=options)
        else:
            if self._config.server_name:
                name = self._config.server_name
                options.append(("grpc.ssl_target_name_override", name))
            channel = grpc.aio.secure_channel(
                self._config.target, self._credentials, options=options
            )
        async with channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            after = await self._check_head(stub)
            if after is None:
                return 0
            return await self._stream(stub, after)

    async def _check_head(self, stub: audit_pb2_grpc.AuditServiceStub) -> int | None:
        daemon = self._config.daemon_id
        timeout = self._config.timeout_seconds
        state = self._intake.state
        frontier = state.frontier(daemon)
        if frontier.refused:
            log.debug("refused daemon not pulled", extra={"fields": self._fields})
            return None
        head = await stub.GetHead(
            pb.GetHeadRequest(), metadata=self._metadata, timeout=timeout
        )
        if not head.HasField("checkpoint"):
            return None
        checkpoint, proof = head.checkpoint.json, None
        n, h = frontier.tree_size, head.checkpoint.tree_size
        if head.checkpoint.log_id == frontier.log_id and h > n > 0:
            reply = await stub.GetConsistencyProof(
                pb.GetConsistencyProofRequest(old_size=n, new_size=h),
                metadata=self._metadata,
                timeout=timeout,
            )
            checkpoint = reply.new_checkpoint.json
            proof = (reply.old_checkpoint.json, list(reply.consistency_proof))
        verdict = verify_head(
            frontier,
            checkpoint,
            self._intake.keys_for(daemon),
            state.history(daemon),
            proof,
        )
        if verdict.step == HeadStep.REFUSED:
            assert verdict.outcome is not None
            await self._intake.refuse(daemon, verdict.outcome, checkpoint)
            return None
        if verdict.step == HeadStep.CURRENT:
            return None
        return verdict.after_tree_size

    async def _stream(self, stub: audit_pb2_grpc.AuditServiceStub, after: int) -> int:
        settled = 0
        call = stub.StreamSegments(
            pb.StreamSegmentsRequest(after_tree_size=after),
            metadata=self._metadata,
            timeout=self._config.timeout_seconds,
        )
        try:
            async for message in call:
                pulled = _Pulled(self._config.daemon_id, message.SerializeToString())
                outcome = await self._intake.receive(pulled)
                if pulled.naked:
                    return settled
                if outcome is None:
                    continue
                settled += 1
                if outcome.verdict == Verdict.REFUSED:
                    return settled
        finally:
            call.cancel()
        return settled
