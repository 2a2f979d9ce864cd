"""Signed directory updates: build, verify, every refusal kind, and that a
directory update and a policy bundle are never taken for each other."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from support import SHIPPED_POLICIES

from kynara_sidecar.audit.keys import encode_base64url, generate_key
from kynara_sidecar.decision import Timestamp
from kynara_sidecar.errors import PolicyError
from kynara_sidecar.policy.compiler import compile_directory, compute_revision
from kynara_sidecar.policy.loader import decode_document, load_policies
from kynara_sidecar.sync import MAX_DIRECTORY_BYTES
from kynara_sidecar.sync.bundle import (
    BundleError,
    build_bundle,
    canonical_json,
    pack_members,
    verify_bundle,
)
from kynara_sidecar.sync.directory import (
    DIRECTORY_FILE,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    DirectoryError,
    DirectoryProblem,
    build_directory_update,
    directory_content,
    directory_revision,
    verify_directory_update,
)

KEY = generate_key()
OTHER_KEY = generate_key()
TRUSTED = {KEY.key_id: KEY.public()}
CREATED = Timestamp(1_796_634_000, 5)
PRINCIPALS = [
    {"id": "zoe\u0308", "kind": "user", "roles": ["support", "employee", "support"]},
    {
        "id": "alice",
        "kind": "user",
        "roles": ["admin"],
        "attributes": {"region": "eu", "level": 3},
    },
    {"id": "bot-1", "kind": "agent", "roles": ["support"], "active": False},
]


@pytest.fixture(scope="module")
def content() -> bytes:
    return directory_content(PRINCIPALS)


@pytest.fixture(scope="module")
def update(content) -> bytes:
    return build_directory_update(content, KEY, CREATED)


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {info.name: tar.extractfile(info).read() for info in tar}


def _signed(manifest: dict, content: bytes, key=KEY, **extra: bytes) -> bytes:
    """An update with this manifest, signed by ``key``, as a careless or
    hostile builder would pack it."""
    manifest_bytes = canonical_json(manifest)
    signature = encode_base64url(key.sign(manifest_bytes)).encode()
    members = {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: signature}
    members[DIRECTORY_FILE] = content
    members.update(extra)
    return pack_members(members)


def _manifest(content: bytes, **changes) -> dict:
    manifest = {
        "v": 1,
        "kind": "directory",
        "revision": directory_revision(content),
        "created": "2026-12-07T09:00:00Z",
        "key_id": KEY.key_id,
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    manifest.update(changes)
    return manifest


def _refused(data: bytes, kind: DirectoryProblem, trusted=TRUSTED) -> DirectoryError:
    with pytest.raises(DirectoryError) as caught:
        verify_directory_update(data, trusted)
    assert caught.value.kind == kind, str(caught.value)
    assert str(caught.value).startswith(kind.value)
    return caught.value


# ------------------------------------------------------------------ content


def test_content_is_canonical_sorted_and_in_nfc(content):
    document = json.loads(content)

    assert (
        content
        == json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    assert document["format_version"] == 1 and document["kind"] == "directory"
    assert [p["id"] for p in document["principals"]] == ["alice", "bot-1", "zoë"]
    assert document["principals"][2]["roles"] == ["employee", "support"]
    assert document["principals"][1] == {
        "id": "bot-1",
        "kind": "agent",
        "roles": ["support"],
        "attributes": {},
        "active": False,
    }
    assert directory_content(reversed(PRINCIPALS)) == content


def test_content_is_a_directory_file_at_the_compilers_revision(content):
    source = decode_document(DIRECTORY_FILE, content)
    policy_set = load_policies(SHIPPED_POLICIES).policy_set

    directory = compile_directory(source, policy_set)

    assert directory.revision == compute_revision([source])
    assert directory.revision == directory_revision(content)
    assert directory.lookup("zoe\u0308").roles == ("employee", "support")
    assert directory.unknown_roles == frozenset()


@pytest.mark.parametrize(
    ("principals", "where", "match"),
    [
        (
            [{"id": "a", "kind": "user"}, {"id": "a", "kind": "agent"}],
            "[1].id",
            "unique",
        ),
        ([{"id": "a", "kind": "robot"}], "[0].kind", "'agent' or 'user'"),
        ([{"id": "a", "kind": "user", "email": "x"}], "[0]", "email"),
        ([{"id": "", "kind": "user"}], "[0]", "non-empty"),
        ([{"id": "a\u202eb", "kind": "user"}], "[0].id", "principal id"),
        ([{"id": "a", "kind": "user", "roles": ["bad role"]}], "[0].roles", "role"),
        ([{"id": "a", "kind": "user", "roles": "admin"}], "[0].roles", "list"),
        ([{"id": "a", "kind": "user", "active": "yes"}], "[0].active", "true or"),
        ([{"id": "a", "kind": "user", "attributes": {1: 2}}], "[0].attributes", "keys"),
        (
            [{"id": "a", "kind": "user", "attributes": {"m": {"x": None}}}],
            "[0].attributes.m.x",
            "no value",
        ),
        (
            [{"id": "a", "kind": "user", "attributes": {"l": [1, {"k\x00": 1}]}}],
            "[0].attributes.l[1]",
            "NUL",
        ),
        ([{"id": "a", "kind": "user", "attributes": {"x": float("nan")}}], "", "JSON"),
    ],
)
def test_content_refuses_what_no_directory_holds(principals, where, match):
    with pytest.raises(DirectoryError, match=match) as caught:
        directory_content(principals)

    assert caught.value.kind == DirectoryProblem.BAD_CONTENT
    assert caught.value.path.startswith("$") and caught.value.path.endswith(where)


# -------------------------------------------------------------- round trip


def test_round_trip(update, content):
    verified = verify_directory_update(update, TRUSTED)

    assert verified.content == content
    assert verified.revision == directory_revision(content)
    assert verified.created == "2026-12-07T09:00:00.000000005Z"
    assert verified.key_id == KEY.key_id
    assert verified.source.name == DIRECTORY_FILE
    assert [p.id for p in verified.source.document.principals] == [
        "alice",
        "bot-1",
        "zoë",
    ]
    assert build_directory_update(content, KEY, CREATED) == update
    assert set(_members(update)) == {MANIFEST_NAME, SIGNATURE_NAME, DIRECTORY_FILE}


def test_build_refuses_content_not_in_canonical_form(content):
    pretty = json.dumps(json.loads(content), indent=2).encode()

    with pytest.raises(DirectoryError, match="canonical") as caught:
        build_directory_update(pretty, KEY, CREATED)
    assert caught.value.kind == DirectoryProblem.BAD_CONTENT


# ----------------------------------------------------------------- refusals


def test_every_flipped_byte_is_refused(update):
    for position in range(len(update)):
        flipped = bytearray(update)
        flipped[position] ^= 0x01
        with pytest.raises(DirectoryError):
            verify_directory_update(bytes(flipped), TRUSTED)


@pytest.mark.parametrize("cut", [1, 512, 1024])
def test_a_truncated_update_is_malformed(update, cut):
    _refused(update[:-cut], DirectoryProblem.MALFORMED)


def test_trailing_bytes_are_malformed(update):
    _refused(update + bytes(512), DirectoryProblem.MALFORMED)
    _refused(update + b"x", DirectoryProblem.MALFORMED)


def test_garbage_is_malformed():
    _refused(b"not a tar at all" * 64, DirectoryProblem.MALFORMED)


def test_too_large_is_refused_before_reading():
    error = _refused(bytes(MAX_DIRECTORY_BYTES + 1), DirectoryProblem.TOO_LARGE)
    assert "MAX_DIRECTORY_BYTES" in str(error)


def test_an_unsafe_member_name_is_refused(content):
    data = _signed(_manifest(content), content, **{"../escape": b"x"})
    _refused(data, DirectoryProblem.UNSAFE_PATH)


def test_missing_and_extra_members(update, content):
    members = _members(update)
    del members[SIGNATURE_NAME]
    _refused(pack_members(members), DirectoryProblem.MISSING_FILE)
    _refused(
        _signed(_manifest(content), content, **{"extra.json": b"{}"}),
        DirectoryProblem.EXTRA_FILE,
    )


def test_unknown_key_and_bad_signature(update, content):
    _refused(
        update, DirectoryProblem.UNKNOWN_KEY, {OTHER_KEY.key_id: OTHER_KEY.public()}
    )
    forged = _signed(_manifest(content), content, key=OTHER_KEY)
    _refused(forged, DirectoryProblem.BAD_SIGNATURE)


def test_content_swapped_under_a_signed_manifest_is_a_hash_mismatch(update):
    members = _members(update)
    members[DIRECTORY_FILE] = directory_content([{"id": "mallory", "kind": "user"}])
    _refused(pack_members(members), DirectoryProblem.HASH_MISMATCH)


def test_a_signed_manifest_with_the_wrong_revision_is_refused(content):
    data = _signed(_manifest(content, revision="sha256:" + "0" * 64), content)
    _refused(data, DirectoryProblem.REVISION_MISMATCH)


def test_signed_content_not_in_canonical_form_is_bad_content(content):
    pretty = json.dumps(json.loads(content), indent=1).encode()
    _refused(_signed(_manifest(pretty), pretty), DirectoryProblem.BAD_CONTENT)
    policy = b'{"format_version":1,"kind":"policy","policies":[]}'
    _refused(_signed(_manifest(policy), policy), DirectoryProblem.BAD_CONTENT)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"v": True},
        {"kind": "bundle"},
        {"created": "yesterday"},
        {"created": "2026-12-07T09:00:00.500000000Z"},
        {"sha256": "ABC"},
        {"key_id": 7},
        {"extra": "x"},
    ],
)
def test_a_malformed_manifest_is_refused(content, changes):
    error = _refused(
        _signed(_manifest(content, **changes), content), DirectoryProblem.MALFORMED
    )
    assert error.path == MANIFEST_NAME


def test_a_manifest_not_in_canonical_json_is_malformed(update):
    members = _members(update)
    members[MANIFEST_NAME] = json.dumps(json.loads(members[MANIFEST_NAME])).encode()
    _refused(pack_members(members), DirectoryProblem.MALFORMED)


# ------------------------------------------------------ bundle vs directory


def test_a_policy_bundle_is_no_directory_update():
    bundle = build_bundle(SHIPPED_POLICIES, KEY, CREATED)

    error = _refused(bundle, DirectoryProblem.WRONG_KIND)
    assert "policy bundle" in str(error)


def test_a_directory_update_is_no_policy_bundle(update):
    with pytest.raises(BundleError, match="bundle.json"):
        verify_bundle(update, TRUSTED)


# ------------------------------------------------------------------ compile


def test_unknown_roles_are_refused_by_default_and_kept_on_request():
    content = directory_content(
        [
            {"id": "ann", "kind": "user", "roles": ["support", "auditor"]},
            {"id": "bot", "kind": "agent", "roles": ["scim.group-7"]},
        ]
    )
    source = decode_document(DIRECTORY_FILE, content)
    policy_set = load_policies(SHIPPED_POLICIES).policy_set

    with pytest.raises(PolicyError, match="auditor"):
        compile_directory(source, policy_set)
    kept = compile_directory(source, policy_set, unknown_roles="keep")

    assert kept.unknown_roles == frozenset({"auditor", "scim.group-7"})
    assert kept.lookup("ann").roles == ("auditor", "support")
    effective = policy_set.effective_roles(kept.lookup("ann").roles)
    assert effective == frozenset({"auditor", "support", "employee"})
    with pytest.raises(ValueError, match="unknown_roles"):
        compile_directory(source, policy_set, unknown_roles="ignore")


# --------------------------------------------------------------------- size


@pytest.mark.slow
def test_a_fleet_directory_of_100000_principals_fits_the_cap():
    principals = [
        {
            "id": f"user-{i:06d}@corp.example.com",
            "kind": "user",
            "roles": ["engineer", "support"],
            "attributes": {
                "department": "engineering",
                "email": f"user-{i:06d}@corp.example.com",
                "display_name": f"User Number {i:06d}",
            },
        }
        for i in range(100_000)
    ]
    content = directory_content(principals)
    update = build_directory_update(content, KEY, CREATED)

    verified = verify_directory_update(update, TRUSTED)

    assert len(update) < MAX_DIRECTORY_BYTES // 3
    assert len(verified.source.document.principals) == 100_000
