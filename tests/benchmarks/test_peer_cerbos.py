"""The Cerbos policies of the peer benchmark decide as Kynara's do.

A real daemon (the shipped config, subprocess, Unix socket) and a real
Cerbos PDP (installed from npm once, gRPC on a Unix socket) are asked the
benchmark's request mix and a few more: for the whole chain Cerbos is asked
once per principal and the answers combined as Kynara combines a chain, and
for the mix the benchmark's own single question (the chain's user) must give
Kynara's decision too. Both read the real clock, so the CRM read is decided
for the same hour by both.
"""

from __future__ import annotations

import pathlib
import sys

import grpc
import pytest
import uvloop
from kynara.v1 import decision_pb2 as pb

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS / "peer_cerbos"))
import cerbos_pdp  # noqa: E402
import decide_bench  # noqa: E402

AGENT_ID = "support-bot"  # identity.agent_id of config/kynara.yaml


def _request(user: str, action: str, kind: str, attributes=None, region="DE"):
    return pb.DecideRequest(
        asserted_chain=[user],
        action=action,
        resource=pb.Resource(kind=kind, id="r1", attributes=attributes or {}),
        context={"region": pb.Value(string_value=region)} if region else {},
    )


def _refund(user: str, amount: int, region: str = "DE"):
    amount_value = {"amount": pb.Value(int_value=amount)}
    return _request(
        user, "payments.refund.issue", "payments.refund", amount_value, region
    )


EXTRA = {
    "blocked region refund": _refund("alice", 1200, "kp"),
    "negative refund": _refund("alice", -5),
    "refund without amount": _request(
        "alice", "payments.refund.issue", "payments.refund"
    ),
    "refund amount as text": _request(
        "alice",
        "payments.refund.issue",
        "payments.refund",
        {"amount": pb.Value(string_value="12")},
    ),
    "admin large refund": _refund("carol", 120000),
    "employee refund": _refund("erin", 1200),
    "admin crm read in blocked region": _request(
        "carol", "crm.contact.read", "crm.contact", region="IR"
    ),
    "no region crm read": _request("bob", "crm.contact.read", "crm.contact", region=""),
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("peer")
    binary = cerbos_pdp.ensure_cerbos()
    cerbos = cerbos_pdp.start_cerbos(binary, scratch / "cerbos")
    daemon = decide_bench.start_daemon(
        scratch / "daemon",
        "config/kynara.yaml",
        [f"agent.fast_socket={scratch / 'daemon' / 'fast.sock'}"],
    )
    translator = cerbos_pdp.CerbosTranslator(cerbos_pdp.compile_messages(scratch))
    try:
        first = translator.check_request(_refund("alice", 1), "alice")
        uvloop.run(decide_bench.wait_answering(cerbos, first))
        uvloop.run(
            decide_bench.wait_answering(daemon, _refund("alice", 1).SerializeToString())
        )
        yield daemon, cerbos, translator
    finally:
        decide_bench.stop_server(daemon)
        decide_bench.stop_server(cerbos)


def _kynara(daemon, decide) -> str:
    with grpc.insecure_channel(daemon.targets["unix"]) as channel:
        call = channel.unary_unary(
            decide_bench.DECIDE_METHOD,
            response_deserializer=pb.DecideResponse.FromString,
        )
        answer = call(decide.SerializeToString(), timeout=30)
    return pb.Decision.Name(answer.decision).removeprefix("DECISION_").lower()


def _cerbos(cerbos, translator, decide, principal: str) -> str:
    with grpc.insecure_channel(cerbos.targets["unix"]) as channel:
        call = channel.unary_unary(cerbos_pdp.CHECK_METHOD)
        answer = call(translator.check_request(decide, principal), timeout=30)
    return translator.decision_of(answer, decide.action)


def _mix():
    return {
        name: pb.DecideRequest.FromString(raw)
        for name, raw in decide_bench.request_mix()
    }


@pytest.mark.parametrize("name", [*_mix(), *EXTRA])
def test_cerbos_decides_the_chain_as_kynara(servers, name):
    daemon, cerbos, translator = servers
    decide = {**_mix(), **EXTRA}[name]

    kynara = _kynara(daemon, decide)
    per_principal = [
        _cerbos(cerbos, translator, decide, principal)
        for principal in cerbos_pdp.chain_of(decide, AGENT_ID)
    ]

    assert cerbos_pdp.combine_chain(per_principal) == kynara


@pytest.mark.parametrize("name", list(_mix()))
def test_the_benchmarks_single_question_gets_kynaras_decision(servers, name):
    daemon, cerbos, translator = servers
    decide = _mix()[name]

    user_only = _cerbos(cerbos, translator, decide, decide.asserted_chain[0])

    assert user_only == _kynara(daemon, decide)


def test_the_mix_covers_allow_and_require_approval(servers):
    daemon, _, _ = servers

    decided = {name: _kynara(daemon, decide) for name, decide in _mix().items()}

    assert decided["small refund"] == "allow"
    assert decided["large refund"] == "require_approval"


def test_combine_chain_is_kynaras_intersection():
    assert cerbos_pdp.combine_chain(["allow", "allow"]) == "allow"
    assert cerbos_pdp.combine_chain(["allow", "require_approval"]) == (
        "require_approval"
    )
    assert cerbos_pdp.combine_chain(["require_approval", "deny"]) == "deny"
    assert cerbos_pdp.combine_chain([]) == "deny"
