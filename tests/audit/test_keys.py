"""Audit signing keys: ids, signatures, key files and their permissions."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from kynara_sidecar.audit import keys
from kynara_sidecar.audit.keys import (
    PublicKey,
    generate_key,
    load_public_key,
    load_signing_key,
    load_trusted_keys,
    parse_public_key,
    save_public_key,
    save_signing_key,
)
from kynara_sidecar.errors import ConfigError

CLI = [sys.executable, "-m", "kynara_sidecar.cli"]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_id_is_prefixed_sha256_of_the_raw_public_key():
    key = generate_key()

    expected = "ed25519:" + hashlib.sha256(key.public().raw).hexdigest()[:16]

    assert key.key_id == expected == key.public().key_id


def test_signature_verifies_with_own_key_only():
    key, other = generate_key(), generate_key()

    signature = key.sign(b"checkpoint")

    assert key.public().verify(b"checkpoint", signature)
    assert not key.public().verify(b"checkpoinT", signature)
    assert not other.public().verify(b"checkpoint", signature)


def test_signing_key_round_trips_through_a_0600_file(tmp_path):
    key = generate_key()
    path = tmp_path / "audit-key.pem"

    save_signing_key(key, path)
    loaded = load_signing_key(path)

    assert mode_of(path) == 0o600
    assert loaded.key_id == key.key_id
    assert key.public().verify(b"x", loaded.sign(b"x"))


def test_public_key_round_trips_as_pem_file_and_base64url(tmp_path):
    public = generate_key().public()
    path = tmp_path / "audit-key.pub"

    save_public_key(public, path)

    assert load_public_key(path) == public
    assert parse_public_key(public.to_base64url()) == public
    assert len(public.to_base64url()) == 43


@pytest.mark.parametrize("save", [save_signing_key, save_public_key])
def test_key_files_are_never_overwritten(tmp_path, save):
    path = tmp_path / "key"
    path.write_bytes(b"old")
    key = generate_key()
    material = key if save is save_signing_key else key.public()

    with pytest.raises(ConfigError, match=r"key file already exists; expected a new"):
        save(material, path)

    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o610, 0o601])
def test_signing_key_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "audit-key.pem"
    save_signing_key(generate_key(), path)
    os.chmod(path, mode)

    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)

    assert str(caught.value) == (
        f"{path}: private key permissions {mode:04o} are too open; expected 0600 "
        f"(owner only), e.g. chmod 600 {path}"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", r"expected an unencrypted PKCS#8 PEM Ed25519 private key"),
        (b"", r"expected an unencrypted PKCS#8 PEM Ed25519 private key"),
    ],
    ids=["garbage", "empty"],
)
def test_signing_key_file_that_is_no_key_is_refused(tmp_path, content, message):
    path = tmp_path / "audit-key.pem"
    path.write_bytes(content)
    os.chmod(path, 0o600)

    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_signing_key(path)


def test_signing_key_of_another_algorithm_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)

    with pytest.raises(ConfigError, match=r"PEM Ed25519 private key, got a "):
        load_signing_key(path)


def test_missing_signing_key_names_the_file(tmp_path):
    path = tmp_path / "absent.pem"

    with pytest.raises(ConfigError, match=rf"^{path}: cannot read private key file"):
        load_signing_key(path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not base64!",
        "AAAA",
        "A" * 43 + "=",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    ],
    ids=["empty", "bad-alphabet", "too-short", "padded", "bad-pem"],
)
def test_malformed_public_key_is_refused(text):
    with pytest.raises(ConfigError, match=r"^trusted: expected an Ed25519 public"):
        parse_public_key(text, where="trusted")


def test_trusted_keys_are_indexed_by_key_id_from_files_and_inline(tmp_path):
    first, second = generate_key().public(), generate_key().public()
    save_public_key(first, tmp_path / "first.pub")

    trusted = load_trusted_keys(
        [tmp_path / "first.pub"],
        inline=[second.to_base64url(), first.to_pem().decode()],
    )

    assert trusted == {first.key_id: first, second.key_id: second}


def test_two_keys_with_one_key_id_are_refused(monkeypatch):
    first, second = generate_key().public(), generate_key().public()
    # A 64-bit id collision cannot be found honestly; ids of zero digits collide.
    monkeypatch.setattr(keys, "KEY_ID_HEX_DIGITS", 0)

    with pytest.raises(ConfigError, match=r"is already used by a different key"):
        load_trusted_keys([], inline=[first.to_base64url(), second.to_base64url()])


def test_keygen_writes_a_0600_private_and_a_public_key_matching_the_id(tmp_path):
    out = tmp_path / "keys"

    result = subprocess.run(
        [*CLI, "keygen", "--out", str(out)], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert mode_of(out / "audit-key.pem") == 0o600
    assert not mode_of(out / "audit-key.pub") & 0o022
    public = load_public_key(out / "audit-key.pub")
    assert result.stdout.splitlines()[-1] == f"key id: {public.key_id}"
    assert load_signing_key(out / "audit-key.pem").public() == public


def test_keygen_refuses_to_overwrite_existing_keys(tmp_path):
    (tmp_path / "audit-key.pub").write_text("old")

    result = subprocess.run(
        [*CLI, "keygen", "--out", str(tmp_path)], capture_output=True, text=True
    )

    assert result.returncode == 1
    assert "audit-key.pub: already exists" in result.stderr
    assert not (tmp_path / "audit-key.pem").exists()
    assert (tmp_path / "audit-key.pub").read_text() == "old"


def test_public_key_equality_is_by_raw_bytes():
    public = generate_key().public()

    assert PublicKey.from_raw(public.raw) == public


def test_keygen_names_a_bundle_key_pair_and_refuses_a_path_as_name(tmp_path):
    named = subprocess.run(
        [*CLI, "keygen", "--out", str(tmp_path), "--name", "bundle-key"],
        capture_output=True,
        text=True,
    )
    pathlike = subprocess.run(
        [*CLI, "keygen", "--out", str(tmp_path), "--name", "../x"],
        capture_output=True,
        text=True,
    )

    assert named.returncode == 0, named.stderr
    public = load_public_key(tmp_path / "bundle-key.pub")
    assert load_signing_key(tmp_path / "bundle-key.pem").public() == public
    assert pathlike.returncode == 1
    assert "--name: expected a file name without a directory" in pathlike.stderr
    assert not (tmp_path.parent / "x.pem").exists()


# -- a key setting pointed at the wrong file


@pytest.mark.parametrize(
    "content",
    [
        b"hunter2-correct-horse\n",
        b"-----BEGIN PUBLIC KEY-----\nhunter2-correct-horse\n-----END PUBLIC KEY-----",
        "hunter2-\u00e9\n".encode(),
        b"aHVudGVyMi1jb3JyZWN0LWhvcnNl\n",
    ],
    ids=["password", "pem-shaped", "not-ascii", "base64url-of-the-wrong-size"],
)
def test_trusted_key_file_that_is_no_key_is_named_never_shown(tmp_path, content):
    path = tmp_path / "db-password"
    path.write_bytes(content)

    with pytest.raises(ConfigError) as caught:
        load_trusted_keys([path])

    message = str(caught.value)
    assert message.startswith(f"{path}: expected an Ed25519 public key, as PEM")
    assert f"a file of {len(content)} bytes" in message
    assert "unpadded base64url of 32 bytes (43 characters)" in message
    assert "hunter2" not in message and "aHVudGVy" not in message
    # Nor in a traceback: no chained exception quotes the file.
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_inline_key_that_is_no_key_is_described_never_shown():
    with pytest.raises(ConfigError) as caught:
        load_trusted_keys(inline=["hunter2-correct-horse"])

    assert str(caught.value) == (
        "inline key 0: expected an Ed25519 public key, as PEM ('-----BEGIN PUBLIC "
        "KEY-----') or as unpadded base64url of 32 bytes (43 characters); got 21 "
        "characters in neither form (content not shown)"
    )


def test_private_key_listed_as_a_trusted_key_is_named_private_never_shown(tmp_path):
    path = tmp_path / "bundle-key.pem"
    key = generate_key()
    save_signing_key(key, path)
    body = key.to_pem().decode().splitlines()[1]

    with pytest.raises(ConfigError) as caught:
        load_trusted_keys([path])

    message = str(caught.value)
    assert message == (
        f"{path}: expected an Ed25519 public key, got a private key (a file of "
        f"{path.stat().st_size} bytes, PEM 'PRIVATE KEY'; content not shown): list "
        "the public key (made by keygen as NAME.pub beside NAME.pem) and keep the "
        "private key with its signer"
    )
    assert body not in message


@pytest.mark.parametrize("form", ["pem", "base64url"])
def test_signing_key_pointed_at_a_public_key_says_so_before_permissions(tmp_path, form):
    key = generate_key()
    save_signing_key(key, tmp_path / "directory-key.pem")
    path = tmp_path / "directory-key.pub"
    if form == "pem":
        save_public_key(key.public(), path)
    else:
        path.write_text(key.public().to_base64url() + "\n")
    os.chmod(path, 0o644)

    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)

    assert str(caught.value) == (
        f"{path}: this is a public key; expected the private key (made by keygen "
        f"as NAME.pem beside NAME.pub); e.g. {tmp_path / 'directory-key.pem'}"
    )


def test_signing_key_pointed_at_a_public_key_without_its_pair_names_no_file(
    tmp_path,
):
    path = tmp_path / "from-elsewhere.key"
    save_public_key(generate_key().public(), path)

    with pytest.raises(ConfigError) as caught:
        load_signing_key(path)

    assert str(caught.value) == (
        f"{path}: this is a public key; expected the private key (made by keygen "
        "as NAME.pem beside NAME.pub)"
    )
