"""The fuzz targets, as plain functions of bytes, for the harnesses.

Each target feeds its bytes to one front of the daemon and returns quietly
when the code under test ends in an answer or a named error (a
``KynaraError`` subclass). Any other exception propagates, and the harness
reports it as a finding; so does a violated contract (``AssertionError``).
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import msgspec
from kynara.v1 import decision_pb2 as pb

from kynara_sidecar.config import load_config
from kynara_sidecar.errors import ConfigError, InvalidRequest, PolicyError
from kynara_sidecar.pipeline import validate_request
from kynara_sidecar.policy.conditions import compile_condition
from kynara_sidecar.policy.loader import compile_documents, decode_document
from kynara_sidecar.server.decision_service import _decode
from kynara_sidecar.server.fastpath_wire import (
    Decide,
    DecideBatch,
    decode_batch_item,
    decode_frame,
    request_from_payload,
)
from kynara_sidecar.server.wire import request_from_proto

__all__ = [
    "CHECKS",
    "REPO_ROOT",
    "WORKDIR_ENV",
    "check_config",
    "check_fast_frame",
    "check_policy",
    "check_request",
    "seed_inputs",
]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED_POLICIES = REPO_ROOT / "config" / "policies"
SHIPPED_CONFIG = REPO_ROOT / "config" / "kynara.yaml"
POLICY_SUFFIXES = (".yaml", ".json", ".toml")
# A policy input's first byte picks what the rest is: a file of one of the
# suffixes, or a bare CEL condition.
CONDITION_MODE = len(POLICY_SUFFIXES)


def check_request(data: bytes) -> None:
    """Request bytes: translated and validated, or ``InvalidRequest``."""
    try:
        message = _decode(pb.DecideRequest, data)
    except InvalidRequest:
        # Undecodable: refused as a whole, there is no field to name.
        return
    try:
        validate_request(request_from_proto(message, peer="fuzz"))
    except InvalidRequest as err:
        assert err.field, f"no field named for a decodable request: {err}"


def check_fast_frame(data: bytes) -> None:
    """A fast path frame's payload: its op and request translated and
    validated, or ``InvalidRequest``; an error about a request that decoded
    names its field."""
    try:
        frame = decode_frame(data)
    except InvalidRequest:
        return  # undecodable, or a wrong type the message names
    if isinstance(frame, Decide):
        requests = [(frame.request, "request.")]
    elif isinstance(frame, DecideBatch):
        requests = []
        for raw in frame.request.items:
            try:
                requests.append((decode_batch_item(raw), ""))
            except InvalidRequest:
                continue
    else:
        return
    for request, prefix in requests:
        try:
            validate_request(request_from_payload(request, "unix:", "", prefix))
        except InvalidRequest as err:
            assert err.field, f"no field named for a decodable request: {err}"


def _shipped(name: str):
    path = SHIPPED_POLICIES / name
    return decode_document(str(path), path.read_bytes())


_ROLES = _shipped("roles.yaml")
_DIRECTORY = _shipped("directory.yaml")


def check_policy(data: bytes) -> None:
    """Policy bytes: a compiled set or ``PolicyError`` naming the path."""
    if not data:
        return
    mode, body = data[0] % (CONDITION_MODE + 1), data[1:]
    try:
        if mode == CONDITION_MODE:
            text = body.decode("utf-8", "replace")
            compile_condition(text, path="fuzz.yaml", location="$.c")
            return
        path = f"fuzz{POLICY_SUFFIXES[mode]}"
        document = decode_document(path, body)
        others = (
            [_ROLES]
            if document.document.kind == "directory"
            else [
                _ROLES,
                _DIRECTORY,
            ]
        )
        compile_documents([*others, document], root="policies")
    except PolicyError as err:
        assert err.path, f"no path named: {err}"


# run.py points this at its own temporary directory, removed after the run.
WORKDIR_ENV = "KYNARA_FUZZ_WORKDIR"
_config_file: list[pathlib.Path] = []


def _config_path() -> pathlib.Path:
    if not _config_file:
        directory = os.environ.get(WORKDIR_ENV) or tempfile.mkdtemp(
            prefix="kynara-fuzz-config-"
        )
        _config_file.append(pathlib.Path(directory) / "kynara.yaml")
    return _config_file[0]


def check_config(data: bytes) -> None:
    """Config bytes: file content, then ``--set`` lines after a NUL byte."""
    content, _, sets = data.partition(b"\x00")
    overrides = [line.decode("utf-8", "replace") for line in sets.split(b"\n") if line]
    path = _config_path()
    path.write_bytes(content)
    try:
        load_config(path, overrides)
    except ConfigError as err:
        assert str(err), "ConfigError without a message"


def seed_inputs(target: str) -> list[bytes]:
    """Good inputs to start from: the shipped files and a valid request."""
    if target == "request":
        return [_valid_request()]
    if target == "fastpath":
        return _valid_fast_frames()
    if target == "config":
        return [
            SHIPPED_CONFIG.read_bytes(),
            SHIPPED_CONFIG.read_bytes()
            + b"\x00audit.durability=deferred\nagent.port=0",
        ]
    seeds = []
    for path in sorted(SHIPPED_POLICIES.glob("*.yaml")):
        raw = msgspec.yaml.decode(path.read_bytes())
        seeds.append(bytes([0]) + path.read_bytes())
        seeds.append(bytes([1]) + msgspec.json.encode(raw))
    seeds.append(bytes([0]) + _LIMITS_SEED)
    seeds.append(bytes([CONDITION_MODE]) + b'env.now.getHours("Europe/Berlin") < 17')
    seeds.append(bytes([CONDITION_MODE]) + b"resource.attr.amount <= 50000")
    seeds.append(
        bytes([CONDITION_MODE])
        + b"limits.cap.exceeded || limits.total.sum + resource.attr.amount > 9"
    )
    return seeds


# A policy declaring limits of both kinds and windows, read by its rules.
_LIMITS_SEED = b"""\
format_version: 1
kind: policy
name: limits
limits:
  cap:
    actions: [payments.refund.issue]
    key: [user, context.shop]
    window: {calendar: day, time_zone: Europe/Berlin}
    ceiling: 5
  total:
    actions: [payments.*]
    resources: [payments.refund]
    decisions: [allow, approved]
    sum: resource.attr.amount
    key: [agent]
    window: {rolling: 1w2d}
    ceiling: 100000
rules:
  - id: cap
    effect: deny
    actions: [payments.refund.issue]
    resources: [payments.refund]
    roles: [support]
    condition: limits.cap.exceeded || limits.total.remaining < 0
"""


def _valid_request() -> bytes:
    return pb.DecideRequest(
        asserted_chain=["alice"],
        action="payments.refund.issue",
        resource=pb.Resource(
            kind="payments.refund",
            id="rf_1",
            attributes={"amount": pb.Value(int_value=1200)},
        ),
        context={
            "region": pb.Value(string_value="DE"),
            "when": pb.Value(list_value=pb.ListValue(values=[pb.Value()])),
        },
    ).SerializeToString()


def _valid_fast_frames() -> list[bytes]:
    request = {
        "asserted_chain": ["alice"],
        "action": "payments.refund.issue",
        "resource": {
            "kind": "payments.refund",
            "id": "rf_1",
            "attributes": {"amount": 1200},
        },
        "context": {
            "region": "DE",
            "when": msgspec.msgpack.Ext(-1, (1_796_374_800).to_bytes(4, "big")),
            "limits": [1, 2.5, msgspec.msgpack.Ext(1, (1).to_bytes(8, "big"))],
        },
    }
    return [
        msgspec.msgpack.encode({"op": "decide", "timeout_ms": 50, "request": request}),
        msgspec.msgpack.encode(
            {"op": "decide_batch", "request": {"items": [request, request]}}
        ),
        msgspec.msgpack.encode(
            {"op": "wait_approval", "request": {"approval_id": "a"}}
        ),
    ]


# The targets by name, for the harness and the runner.
CHECKS = {
    "request": check_request,
    "policy": check_policy,
    "config": check_config,
    "fastpath": check_fast_frame,
}
