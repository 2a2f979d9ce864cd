"""Signed checkpoints: canonical bytes, signing, and every way to fail."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointKind,
    CheckpointProblem,
    CheckpointV1,
    decode_checkpoint,
    encode_checkpoint,
    sign_checkpoint,
    signed_bytes,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import generate_key
from kynara_sidecar.decision import Timestamp

KEY = generate_key()
OTHER_KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}
ROOT = hashlib.sha256(b"root").digest()
CHAIN_HASH = hashlib.sha256(b"chain").digest()
LOG_ID = "0123456789abcdef" * 2


def make_checkpoint(key=KEY, **changes) -> CheckpointV1:
    fields = {
        "kind": CheckpointKind.CHECKPOINT,
        "origin": "support-bot@host-1",
        "log_id": LOG_ID,
        "tree_size": 1000,
        "root": ROOT,
        "chain_hash": CHAIN_HASH,
        "time": Timestamp(1_796_374_800, 500_000_000),
        "key": key,
    }
    return sign_checkpoint(**{**fields, **changes})


def problem_of(cp, trusted=TRUSTED) -> CheckpointProblem:
    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(cp, trusted)
    return caught.value.kind


def test_signed_checkpoint_verifies_and_carries_its_fields():
    cp = make_checkpoint(kind=CheckpointKind.HEAD)

    verify_checkpoint(cp, TRUSTED)

    assert (cp.v, cp.kind, cp.tree_size, cp.log_id) == (1, "head", 1000, LOG_ID)
    assert (cp.root, cp.chain_hash) == (ROOT.hex(), CHAIN_HASH.hex())
    assert cp.time == "2026-12-04T09:00:00.5Z"
    assert cp.key_id == KEY.key_id


def test_checkpoint_survives_encode_and_decode():
    cp = make_checkpoint()

    decoded = decode_checkpoint(encode_checkpoint(cp))

    assert decoded == cp
    verify_checkpoint(decoded, TRUSTED)


def test_signed_bytes_are_what_any_sorted_compact_json_encoder_writes():
    cp = make_checkpoint()
    fields = json.loads(encode_checkpoint(cp))
    signature = fields.pop("signature")

    portable = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    assert portable == signed_bytes(cp)
    assert KEY.public().verify(portable, _b64(signature))


def _b64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", CheckpointKind.HEAD),
        ("origin", "support-bot@host-2"),
        ("log_id", "f" * 32),
        ("tree_size", 1001),
        ("root", hashlib.sha256(b"other").hexdigest()),
        ("chain_hash", hashlib.sha256(b"other").hexdigest()),
        ("time", "2026-12-04T09:00:01.5Z"),
    ],
)
def test_a_changed_field_is_a_bad_signature(field, value):
    cp = msgspec.structs.replace(make_checkpoint(), **{field: value})

    assert problem_of(cp) == CheckpointProblem.BAD_SIGNATURE


def test_a_changed_signature_is_a_bad_signature():
    cp = make_checkpoint()
    flipped = "B" if cp.signature[0] != "B" else "C"

    cp = msgspec.structs.replace(cp, signature=flipped + cp.signature[1:])

    assert problem_of(cp) == CheckpointProblem.BAD_SIGNATURE


def test_signature_by_another_key_under_a_trusted_key_id_is_a_bad_signature():
    forged = make_checkpoint(key=OTHER_KEY)
    forged = msgspec.structs.replace(forged, key_id=KEY.key_id)
    forged = msgspec.structs.replace(
        forged, signature=_b64url(OTHER_KEY.sign(signed_bytes(forged)))
    )

    assert problem_of(forged) == CheckpointProblem.BAD_SIGNATURE


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_checkpoint_by_an_untrusted_key_is_an_unknown_key():
    cp = make_checkpoint(key=OTHER_KEY)

    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(cp, TRUSTED)

    assert caught.value.kind == CheckpointProblem.UNKNOWN_KEY
    assert str(caught.value) == (
        f"unknown_key: key_id {OTHER_KEY.key_id} is not among the trusted keys "
        f"['{KEY.key_id}']"
    )


def test_no_trusted_keys_means_every_key_is_unknown():
    assert problem_of(make_checkpoint(), trusted={}) == CheckpointProblem.UNKNOWN_KEY


SIG = make_checkpoint().signature


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("signature", "", "signature: expected 64 bytes, got 0"),
        ("signature", SIG[:-2], "signature: expected 64 bytes, got 63"),
        (
            "signature",
            SIG + "==",
            f"signature: expected unpadded base64url, got '{SIG}=='",
        ),
        (
            "signature",
            "+/" + SIG[2:],
            "signature: expected unpadded base64url, got '+/",
        ),
        ("signature", "é" + SIG[1:], "signature: expected unpadded base64url, got 'é"),
        ("v", 2, "v: expected 1, got 2"),
        ("origin", "", "origin: expected 1..253 printable ASCII characters"),
        ("origin", 'a"b', "origin: expected 1..253 printable ASCII characters"),
        ("origin", "bot\n", "origin: expected 1..253 printable ASCII characters"),
        ("origin", "bøt", "origin: expected 1..253 printable ASCII characters"),
        ("log_id", "", "log_id: expected 32 lowercase hex digits, got ''"),
        ("log_id", "AB" * 16, "log_id: expected 32 lowercase hex digits, got 'ABAB"),
        ("log_id", "ab" * 17, "log_id: expected 32 lowercase hex digits, got 'abab"),
        ("tree_size", -1, "tree_size: expected an integer >= 0, got -1"),
        ("tree_size", True, "tree_size: expected an integer >= 0, got True"),
        ("root", "AB" * 32, "root: expected 64 lowercase hex digits, got 'ABAB"),
        ("chain_hash", "ab", "chain_hash: expected 64 lowercase hex digits, got 'ab'"),
        ("time", "2026-12-04 09:00:00Z", "time: expected an RFC 3339 UTC timestamp"),
        (
            "time",
            "2026-12-04T09:00:00.50Z",
            "time: expected the canonical form '2026-12-04T09:00:00.5Z'",
        ),
        ("key_id", "rsa:0123456789abcdef", "key_id: expected 'ed25519:' and 16"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 12 else None,
)
def test_malformed_checkpoint_names_the_field(field, value, message):
    cp = msgspec.structs.replace(make_checkpoint(), **{field: value})

    with pytest.raises(CheckpointError) as caught:
        verify_checkpoint(cp, TRUSTED)

    assert caught.value.kind == CheckpointProblem.MALFORMED
    assert str(caught.value).startswith(f"malformed: {message}")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{", "malformed: Input data was truncated"),
        (b"[]", "malformed: Expected `object`, got `array`"),
        (b'{"v":1}', "malformed: Object missing required field `kind`"),
    ],
    ids=["truncated", "array", "missing-field"],
)
def test_undecodable_checkpoint_is_malformed(data, message):
    with pytest.raises(CheckpointError, match=rf"^{message}"):
        decode_checkpoint(data)


def test_unknown_field_is_refused_because_no_signature_covers_it():
    fields = json.loads(encode_checkpoint(make_checkpoint()))
    fields["extra"] = "x"

    with pytest.raises(CheckpointError, match=r"^malformed: Object contains unknown"):
        decode_checkpoint(json.dumps(fields))


def test_signing_a_bad_field_is_refused():
    with pytest.raises(ValueError, match=r"^cannot sign checkpoint: origin: expected"):
        make_checkpoint(origin="")


def test_signing_without_a_well_formed_log_id_is_refused():
    with pytest.raises(ValueError, match=r"^cannot sign checkpoint: log_id: expected"):
        make_checkpoint(log_id="not-a-log-id")


ENCODED = encode_checkpoint(make_checkpoint())


@given(
    position=st.integers(0, len(ENCODED) - 1),
    value=st.integers(0, 255),
)
def test_any_changed_byte_of_an_encoded_checkpoint_fails(position, value):
    data = bytearray(ENCODED)
    if data[position] == value:
        value ^= 1
    data[position] = value

    with pytest.raises(CheckpointError):
        verify_checkpoint(decode_checkpoint(bytes(data)), TRUSTED)
