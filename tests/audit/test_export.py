"""Evidence packs: export a real log, verify it offline, and tamper with it.

The acceptance tests run the pack's own ``verify_pack.py`` with the python
of a fresh virtualenv that holds only ``cryptography`` (made once per test
session), as an auditor would; the rest call the same functions in process.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import venv

import pytest
from support import (
    SHIPPED_CONFIG,
    SHIPPED_POLICIES,
    RunningDaemon,
    SettableClock,
    daemon_config,
    small_refund,
)

from audit._support import make_record
from kynara_sidecar.audit.checkpoint import (
    CheckpointKind,
    decode_checkpoint,
    encode_checkpoint,
    sign_checkpoint,
)
from kynara_sidecar.audit.export import ExportError, export_pack, parse_time
from kynara_sidecar.audit.keys import generate_key, load_public_key, save_public_key
from kynara_sidecar.audit.record import (
    RECORD_VERSION,
    ApprovalEntry,
    AuditRecordV1,
    RecordKind,
    parse_timestamp,
)
from kynara_sidecar.audit.rotation import rotation_record
from kynara_sidecar.audit.store import AuditStore
from kynara_sidecar.audit.verify_pack import (
    MANIFEST_FILE,
    PackError,
    encode_manifest,
    key_id_of,
    verify_pack,
)

ORIGIN = "daemon-a"
# Decisions of the real run, minutes after 09:00Z on a Monday (business
# hours for the shipped policies).
RUN_MINUTES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
RANGE_ARGS = ("--from", "2026-12-07T09:00:00Z", "--to", "2026-12-07T10:00:00Z")


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="session")
def auditor_python(tmp_path_factory) -> pathlib.Path:
    """The python of a fresh virtualenv holding cryptography and nothing of
    ours, installed from the index pip is configured with for this project."""
    root = tmp_path_factory.mktemp("auditor-venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    python = root / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "cryptography"],
        check=True,
        capture_output=True,
    )
    probe = subprocess.run(
        [python, "-c", "import kynara_sidecar"], capture_output=True, cwd=root
    )
    assert probe.returncode != 0, "the auditor's venv must not see kynara_sidecar"
    return python


def run_script(
    python: pathlib.Path, pack: pathlib.Path, *keys, script=None, publishers=()
) -> tuple[int, str]:
    args = [python, script or pack / "verify_pack.py", pack]
    for key in keys:
        args += ["--trusted-key", key]
    for key in publishers:
        args += ["--publisher-key", key]
    # cwd outside the repository, so nothing of ours is importable by path.
    done = subprocess.run(args, capture_output=True, text=True, cwd=pack.parent)
    return done.returncode, done.stdout + done.stderr


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kynara_sidecar.cli", *map(str, args)],
        capture_output=True,
        text=True,
    )


def flip_byte(path: pathlib.Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def reseal_manifest(pack: pathlib.Path) -> None:
    """What a forger does after editing files: make the hashes match again."""
    manifest = json.loads((pack / MANIFEST_FILE).read_bytes())
    manifest["files"] = {
        path.relative_to(pack).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(pack.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    (pack / MANIFEST_FILE).write_bytes(encode_manifest(manifest))


def first_line(text: str) -> str:
    return text.strip().splitlines()[0]


def sealer(keys: list, log_id: str):
    """A seal function for the log ``log_id`` signing with keys[-1] (so a
    test can rotate)."""

    def seal(tree_size: int, root: bytes, chain: bytes):
        return sign_checkpoint(
            kind=CheckpointKind.CHECKPOINT,
            origin=ORIGIN,
            log_id=log_id,
            tree_size=tree_size,
            root=root,
            chain_hash=chain,
            time=parse_timestamp("2026-12-04T10:00:00Z"),
            key=keys[-1],
        )

    return seal


def build_log(path, batches, key, *, seal_last=True) -> None:
    """A log of ``batches`` (lists of records), each sealed into a segment."""
    store = AuditStore.open(path)
    try:
        for index, batch in enumerate(batches):
            sealing = seal_last or index < len(batches) - 1
            seal = sealer([key], store.log_id) if sealing else None
            store.append_batch(batch, seal=seal)
    finally:
        store.close()


def at(second: int) -> str:
    return f"2026-12-04T09:00:{second:02d}Z"


# ------------------------------------------------------- a real daemon run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A daemon's log: decisions over several segments, then a clean stop."""
    tmp = tmp_path_factory.mktemp("run")
    key_path = tmp / "keys" / "audit-key.pem"
    config = daemon_config(
        tmp,
        f"audit.signing_key={key_path}",
        "audit.create_signing_key=true",
        f"audit.witness_path={tmp / 'witness'}",
        "audit.segment_records=4",
    )
    clock = SettableClock("2026-12-07T09:00:00Z")
    running = RunningDaemon(config, clock)
    try:
        stub = running.stub()
        for minute in RUN_MINUTES:
            clock.set(f"2026-12-07T09:{minute:02d}:30Z")
            stub.Decide(small_refund())
    finally:
        running.stop()
    return tmp, key_path


def verify_export(pack: pathlib.Path, trusted_key, publishers=()):
    """``kynara verify-export`` of ``pack`` with one trusted key and the
    publisher keys given."""
    return run_cli(
        "verify-export",
        pack,
        "--trusted-key",
        trusted_key,
        *(arg for key in publishers for arg in ("--publisher-key", key)),
    )


def export_real(real_run, out: pathlib.Path, start: str, stop: str):
    tmp, key_path = real_run
    return run_cli(
        "export",
        "--config",
        SHIPPED_CONFIG,
        *(
            arg
            for override in (
                f"agent.socket={tmp / 'agent.sock'}",
                f"policy.source={SHIPPED_POLICIES}",
                f"audit.path={tmp / 'audit'}",
                f"audit.signing_key={key_path}",
                f"audit.witness_path={tmp / 'witness'}",
            )
            for arg in ("--set", override)
        ),
        "--from",
        start,
        "--to",
        stop,
        out,
    )


@pytest.fixture(scope="module")
def real_pack(real_run, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("packs") / "pack"
    done = export_real(real_run, out, "2026-12-07T09:00:00Z", "2026-12-07T10:00:00Z")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def pack_copy(real_pack, tmp_path) -> pathlib.Path:
    copy = tmp_path / "pack"
    shutil.copytree(real_pack, copy)
    return copy


@pytest.fixture(scope="module")
def real_key(real_run, tmp_path_factory) -> pathlib.Path:
    """The daemon's public key, as an auditor got it from the operator: the
    audit-key.pub the daemon wrote beside audit-key.pem."""
    public = real_run[1].with_name("audit-key.pub")
    assert public.is_file()
    return public


def test_export_of_real_run_verifies_with_only_the_standalone_script(
    real_run, real_pack, real_key, auditor_python
):
    store = AuditStore.open(real_run[0] / "audit", readonly=True)
    head, sizes = store.head().seq, [cp.tree_size for cp in store.iter_checkpoints()]
    store.close()

    code, out = run_script(auditor_python, real_pack, real_key)

    assert code == 0, out
    assert out.startswith("ok: support-bot-local log "), out
    assert f"{head} records (seq 1..{head})" in out
    assert f"trusted keys from --trusted-key: {key_id_of(_raw(real_key))}" in out
    manifest = json.loads((real_pack / MANIFEST_FILE).read_text())
    assert manifest["tree_sizes"]["checkpoints"] == sizes
    assert {entry["part"] for entry in manifest["policy_sets"]} == {
        "policy",
        "directory",
    }
    assert (real_pack / "records.jsonl").read_bytes().count(b"\n") == head


def _raw(public_key_path: pathlib.Path) -> bytes:
    from kynara_sidecar.audit.keys import load_public_key

    return load_public_key(public_key_path).raw


def test_script_says_when_it_trusts_the_packs_own_keys(real_pack, auditor_python):
    code, out = run_script(auditor_python, real_pack)

    assert code == 0, out
    assert "trusted keys from the pack (prefer --trusted-key)" in out


def test_exported_records_are_the_stored_bytes(real_run, real_pack):
    store = AuditStore.open(real_run[0] / "audit", readonly=True)
    stored = [record.record_bytes for record in store.iter_records()]
    cps = [encode_checkpoint(cp) for cp in store.iter_checkpoints()]
    store.close()

    lines = (real_pack / "records.jsonl").read_bytes().split(b"\n")[:-1]
    cp_lines = (real_pack / "checkpoints.jsonl").read_bytes().split(b"\n")[:-1]

    assert lines == stored
    assert cp_lines == cps


@pytest.mark.parametrize(
    "target",
    [
        "records.jsonl",
        "checkpoints.jsonl",
        "proofs.json",
        "keys",
        "manifest.json",
        "policy_sets",
        "export.json",
        "verify_pack.py",
    ],
)
def test_any_changed_byte_fails_the_standalone_script(
    pack_copy, real_pack, real_key, auditor_python, tmp_path, target
):
    path = pack_copy / target
    if path.is_dir():
        path = sorted(p for p in path.rglob("*") if p.is_file())[0]
    flip_byte(path)
    # A changed script cannot vouch for itself: the auditor runs a copy kept
    # apart from the pack (as they should), which the manifest then catches.
    script = None
    if target == "verify_pack.py":
        script = tmp_path / "verify_pack.py"
        shutil.copyfile(real_pack / "verify_pack.py", script)

    for keys in ((), (real_key,)):
        code, out = run_script(auditor_python, pack_copy, *keys, script=script)

        assert code == 1, out
        assert out.startswith("FAILED: "), out


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("records.jsonl", "chain"),
        ("checkpoints.jsonl", "bad_signature"),
        ("proofs.json", "consistency"),
        ("policy_sets", "policy_set"),
    ],
)
def test_a_forger_who_fixes_the_manifest_is_still_caught(pack_copy, target, kind):
    path = pack_copy / target
    if target == "records.jsonl":
        # Record 3 keeps its form and its seq: only its time is moved.
        lines = path.read_bytes().split(b"\n")
        lines[2] = lines[2].replace(b'"time":"2026', b'"time":"2027', 1)
        path.write_bytes(b"\n".join(lines))
    elif target == "checkpoints.jsonl":
        data = path.read_bytes()
        path.write_bytes(data.replace(b'"time":"2026', b'"time":"2027', 1))
    elif target == "proofs.json":
        proofs = json.loads(path.read_text())
        entry = next(e for e in proofs["consistency"] if e["proof"])
        entry["proof"][0] = "0" * 64
        path.write_text(json.dumps(proofs))
    else:
        file = sorted(p for p in path.rglob("*") if p.is_file())[0]
        file.write_bytes(file.read_bytes() + b"# appended\n")
    reseal_manifest(pack_copy)

    with pytest.raises(PackError) as info:
        verify_pack(pack_copy)

    assert info.value.kind == kind


@pytest.mark.slow
def test_every_byte_of_the_manifest_is_checked(pack_copy):
    manifest = pack_copy / MANIFEST_FILE
    original = manifest.read_bytes()

    passed = []
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01
        manifest.write_bytes(bytes(data))
        try:
            verify_pack(pack_copy)
        except PackError:
            continue
        passed.append(offset)

    assert passed == []


def test_a_manifest_naming_another_log_id_fails(pack_copy):
    manifest = json.loads((pack_copy / MANIFEST_FILE).read_bytes())
    signed_for, other = manifest["log_id"], "f" * 32
    manifest["log_id"] = other
    (pack_copy / MANIFEST_FILE).write_bytes(encode_manifest(manifest))
    reseal_manifest(pack_copy)
    first = (pack_copy / "checkpoints.jsonl").read_bytes().split(b"\n")[0]

    with pytest.raises(PackError) as info:
        verify_pack(pack_copy)

    assert signed_for != other
    assert info.value.kind == "log_id"
    assert str(info.value) == (
        f"log_id: checkpoint at tree size {json.loads(first)['tree_size']} is "
        f"of log {signed_for}, the manifest says {other}"
    )


def test_attacker_keys_fail_against_the_auditors_trusted_key(
    pack_copy, real_key, auditor_python, tmp_path
):
    attacker = generate_key()
    cps = (pack_copy / "checkpoints.jsonl").read_bytes().split(b"\n")[:-1]
    forged = []
    for line in cps:
        cp = decode_checkpoint(line)
        forged.append(
            encode_checkpoint(
                sign_checkpoint(
                    kind=cp.kind,
                    origin=cp.origin,
                    log_id=cp.log_id,
                    tree_size=cp.tree_size,
                    root=bytes.fromhex(cp.root),
                    chain_hash=bytes.fromhex(cp.chain_hash),
                    time=parse_timestamp(cp.time),
                    key=attacker,
                )
            )
        )
    (pack_copy / "checkpoints.jsonl").write_bytes(b"".join(f + b"\n" for f in forged))
    shutil.rmtree(pack_copy / "keys")
    (pack_copy / "keys").mkdir()
    name = attacker.key_id.replace(":", "-") + ".pem"
    save_public_key(attacker.public(), pack_copy / "keys" / name)
    manifest = json.loads((pack_copy / MANIFEST_FILE).read_text())
    manifest["keys"] = [{"file": f"keys/{name}", "key_id": attacker.key_id}]
    (pack_copy / MANIFEST_FILE).write_bytes(encode_manifest(manifest))
    reseal_manifest(pack_copy)

    self_vouched = run_script(auditor_python, pack_copy)
    trusted = run_script(auditor_python, pack_copy, real_key)

    # The pack's own keys prove only that someone signed it...
    assert self_vouched[0] == 0, self_vouched[1]
    # ...the key the auditor got from the operator exposes the forgery.
    assert trusted[0] == 1, trusted[1]
    assert trusted[1].startswith("FAILED: unknown_key: "), trusted[1]
    assert attacker.key_id in trusted[1]


@pytest.mark.parametrize("tamper", ["none", "record", "manifest", "keys"])
def test_verify_export_agrees_with_the_script(
    pack_copy, real_key, auditor_python, tamper
):
    if tamper == "record":
        flip_byte(pack_copy / "records.jsonl")
    elif tamper == "manifest":
        flip_byte(pack_copy / MANIFEST_FILE, 30)
    elif tamper == "keys":
        flip_byte(next((pack_copy / "keys").iterdir()), 40)
        reseal_manifest(pack_copy)

    script = run_script(auditor_python, pack_copy, real_key)
    cli = verify_export(pack_copy, real_key)

    assert (cli.returncode, first_line(cli.stdout)) == (
        script[0],
        first_line(script[1]),
    )
    assert cli.returncode == (0 if tamper == "none" else 1)


def test_export_leaves_a_non_empty_directory_alone(real_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    done = export_real(real_run, out, "2026-12-07T09:00:00Z", "2026-12-07T10:00:00Z")

    assert done.returncode == 1
    assert "never overwritten" in done.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_takes_the_log_path_and_keys_instead_of_config(
    real_run, real_key, tmp_path
):
    out = tmp_path / "out"

    done = run_cli(
        "export",
        real_run[0] / "audit",
        "--from",
        "2026-12-07T10:05:00+01:00",
        "--to",
        "2026-12-07T09:06:00Z",
        "--key",
        real_key,
        out,
    )

    assert done.returncode == 0, done.stderr
    assert verify_pack(out).manifest["records"]["count"] > 0
    records = (out / "records.jsonl").read_bytes().split(b"\n")[:-1]
    times = [json.loads(r)["time"] for r in records]
    assert "2026-12-07T09:05:30Z" in times
    assert "2026-12-07T09:00:30Z" not in times  # outside the segments asked for


def test_export_creates_only_the_pack_directory_not_its_parents(
    real_run, real_key, tmp_path
):
    out = tmp_path / "no" / "such" / "pack"

    done = run_cli("export", real_run[0] / "audit", "--key", real_key, *RANGE_ARGS, out)

    assert done.returncode == 1
    assert f"expected its parent directory {out.parent} to exist" in done.stderr
    assert not (tmp_path / "no").exists()


def test_export_refuses_a_log_path_and_a_config_together(real_run, tmp_path):
    done = run_cli(
        "export",
        real_run[0] / "audit",
        "--config",
        SHIPPED_CONFIG,
        *RANGE_ARGS,
        tmp_path / "out",
    )

    assert done.returncode == 2
    assert f"AUDIT_PATH {real_run[0] / 'audit'} and --config" in done.stderr
    assert not (tmp_path / "out").exists()


def test_export_with_a_config_takes_the_public_half_beside_the_key(
    real_run, real_key, tmp_path
):
    """An exporter may hold no private key: the .pub beside its path will do."""
    shutil.copy(real_key, tmp_path / "audit-key.pub")
    out = tmp_path / "out"

    done = export_real(
        (real_run[0], tmp_path / "audit-key.pem"),
        out,
        "2026-12-07T09:00:00Z",
        "2026-12-07T10:00:00Z",
    )

    assert done.returncode == 0, done.stderr
    # Trusting only the pack's own keys: the key went in.
    report = verify_pack(out)
    assert report.signers == [key_id_of(_raw(real_key))]
    assert not (tmp_path / "audit-key.pem").exists()


# ------------------------------------------------- logs built in the test


def test_the_range_widens_to_whole_sealed_segments(tmp_path):
    key = generate_key()
    batches = [[make_record(n) for n in range(b * 5 + 1, b * 5 + 6)] for b in range(4)]
    build_log(tmp_path / "log", batches, key)

    summary = export_pack(
        tmp_path / "log",
        tmp_path / "out",
        parse_time(at(7)),
        parse_time(at(12)),
        [key.public()],
    )
    report = verify_pack(tmp_path / "out")

    # Records 7..12 lie in segments (5, 10] and (10, 15]: base checkpoint 5.
    assert (summary.first_seq, summary.last_seq) == (6, 15)
    assert report.manifest["tree_sizes"] == {
        "checkpoints": [5, 10, 15],
        "first": 5,
        "last": 15,
    }


def test_records_after_the_last_checkpoint_are_not_exported(tmp_path):
    key = generate_key()
    batches = [[make_record(n) for n in range(1, 6)], [make_record(6), make_record(7)]]
    build_log(tmp_path / "log", batches, key, seal_last=False)

    summary = export_pack(
        tmp_path / "log",
        tmp_path / "out",
        parse_time(at(0)),
        parse_time(at(59)),
        [key.public()],
    )

    assert (summary.last_seq, summary.unsealed, summary.sealed_through) == (5, 2, 5)
    export = json.loads((tmp_path / "out" / "export.json").read_text())
    assert export["unsealed_records_in_range"] == 2
    verify_pack(tmp_path / "out")


def test_nothing_sealed_in_range_is_an_error(tmp_path):
    key = generate_key()
    build_log(
        tmp_path / "log", [[make_record(1)], [make_record(2)]], key, seal_last=False
    )

    with pytest.raises(ExportError, match="no sealed record .* 1 of them are in range"):
        export_pack(
            tmp_path / "log", tmp_path / "out", parse_time(at(2)), parse_time(at(3))
        )

    assert not (tmp_path / "out").exists()


def approval(kind: RecordKind, n: int, approval_id: str) -> AuditRecordV1:
    return AuditRecordV1(
        v=RECORD_VERSION,
        kind=kind,
        time=at(n),
        daemon_id=ORIGIN,
        approval=ApprovalEntry(id=approval_id),
    )


def test_approval_records_are_listed_in_the_manifest(tmp_path):
    key = generate_key()
    batch = [
        make_record(1),
        approval(RecordKind.APPROVAL_REQUESTED, 2, "ap-1"),
        approval(RecordKind.APPROVAL_RESOLVED, 3, "ap-1"),
    ]
    build_log(tmp_path / "log", [batch], key)

    export_pack(
        tmp_path / "log",
        tmp_path / "out",
        parse_time(at(0)),
        parse_time(at(5)),
        [key.public()],
    )

    assert verify_pack(tmp_path / "out").manifest["approvals"] == [
        {"approval_id": "ap-1", "kind": "approval_requested", "seq": 2},
        {"approval_id": "ap-1", "kind": "approval_resolved", "seq": 3},
    ]


def rotated_log(path: pathlib.Path, *, forged: bool) -> tuple:
    """Segment 1 signed by old; a rotation record (signed by old, or by a
    forger); segment 2 signed by new."""
    old, new, forger = generate_key(), generate_key(), generate_key()
    store = AuditStore.open(path)
    signing = [old]
    try:
        store.append_batch(
            [make_record(1), make_record(2)], seal=sealer(signing, store.log_id)
        )
        rotation = rotation_record(
            forger if forged else old,
            new.public(),
            origin=ORIGIN,
            log_id=store.log_id,
            time=at(3),
        )
        signing.append(new)
        store.append_batch(
            [rotation, make_record(4)], seal=sealer(signing, store.log_id)
        )
    finally:
        store.close()
    return old, new


@pytest.mark.parametrize("forged", [False, True])
def test_a_rotation_record_extends_trust_only_from_a_trusted_key(tmp_path, forged):
    old, new = rotated_log(tmp_path / "log", forged=forged)
    export_pack(
        tmp_path / "log", tmp_path / "out", parse_time(at(0)), parse_time(at(9))
    )
    old_pub = tmp_path / "old.pub"
    save_public_key(old.public(), old_pub)

    if forged:
        with pytest.raises(PackError) as info:
            verify_pack(tmp_path / "out", [old_pub])
        assert info.value.kind == "unknown_key"
        assert new.key_id in str(info.value)
    else:
        report = verify_pack(tmp_path / "out", [old_pub])
        assert report.signers == [old.key_id, new.key_id]


def test_a_pruned_log_exports_from_its_seam(tmp_path):
    key = generate_key()
    batches = [[make_record(n) for n in range(b * 3 + 1, b * 3 + 4)] for b in range(3)]
    build_log(tmp_path / "log", batches, key)
    store = AuditStore.open(tmp_path / "log")
    store.prune(3)
    store.close()

    summary = export_pack(
        tmp_path / "log",
        tmp_path / "out",
        parse_time(at(0)),
        parse_time(at(59)),
        [key.public()],
    )

    assert (summary.first_seq, summary.last_seq) == (4, 9)
    assert verify_pack(tmp_path / "out").manifest["tree_sizes"]["first"] == 3


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-12-04T09:00:00Z", 1796374800),
        ("2026-12-04T10:00:00+01:00", 1796374800),
        ("2026-12-04T09:00:00.000000001Z", 1796374800),
    ],
)
def test_times_are_rfc_3339_with_a_zone(text, seconds):
    assert parse_time(text).seconds == seconds


@pytest.mark.parametrize("text", ["2026-12-04T09:00:00", "2026-12-04", "yesterday"])
def test_times_without_a_zone_are_refused(text):
    with pytest.raises(ExportError, match="expected an RFC 3339 time with a zone"):
        parse_time(text, where="--from")


def test_the_script_imports_only_stdlib_and_cryptography():
    import ast

    import kynara_sidecar.audit.verify_pack as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
        )
    }

    assert imported - set(sys.stdlib_module_names) == {"cryptography"}


# ------------------------------------------- signed directory updates, bundles


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory):
    """A daemon's log under a signed bundle and the collector's signed
    directory (dir:// store), with a directory change mid-run."""
    from sync._bundles import KEY, policy_dir, public_key_file
    from sync.test_daemon_directory import (
        DIRECTORY_KEY,
        directory_overrides,
        publish,
        revision_in,
        update,
        wait_until,
    )

    from kynara_sidecar.sync.bundle import build_bundle

    tmp = tmp_path_factory.mktemp("signed-run")
    (tmp / "store").mkdir()
    store = f"dir://{tmp / 'store'}"
    bundle = tmp / "policies.bundle"
    bundle.write_bytes(
        build_bundle(policy_dir(tmp, "signed"), KEY, parse_time("2026-12-07T08:00:00Z"))
    )
    first, second = update(seconds=0), update(seconds=10, drop=("bob",))
    publish(store, first)
    key_path = tmp / "keys" / "audit-key.pem"
    config = daemon_config(
        tmp,
        *directory_overrides(tmp, store),
        f"policy.source={bundle}",
        f"policy.trusted_keys=[{public_key_file(tmp)}]",
        f"audit.signing_key={key_path}",
        "audit.create_signing_key=true",
        f"audit.witness_path={tmp / 'witness'}",
        "audit.segment_records=4",
    )
    clock = SettableClock("2026-12-07T09:00:00Z")
    running = RunningDaemon(config, clock)
    try:
        stub = running.stub()
        for minute in (0, 1, 2):
            clock.set(f"2026-12-07T09:{minute:02d}:30Z")
            stub.Decide(small_refund())
        publish(store, second)
        wait_until(
            lambda: (
                stub.Decide(small_refund()).directory_revision == revision_in(second)
            ),
            "the second directory",
        )
        for minute in (5, 6, 7):
            clock.set(f"2026-12-07T09:{minute:02d}:30Z")
            stub.Decide(small_refund())
    finally:
        running.stop()
    keys = tmp / "publishers"
    keys.mkdir()
    save_public_key(DIRECTORY_KEY.public(), keys / "directory.pub")
    save_public_key(KEY.public(), keys / "bundle.pub")
    out = tmp / "pack"
    export_pack(
        tmp / "audit",
        out,
        parse_time("2026-12-07T09:00:00Z"),
        parse_time("2026-12-07T10:00:00Z"),
        [load_public_key(key_path.with_name("audit-key.pub"))],
    )
    return out, key_path.with_name("audit-key.pub"), keys, (first, second)


def test_the_pack_holds_the_signed_update_of_each_cited_directory(signed_run):
    from sync.test_daemon_directory import revision_in

    pack, audit_key, keys, updates = signed_run
    manifest = json.loads((pack / MANIFEST_FILE).read_bytes())
    signed = manifest["signed"]

    directories = [e for e in signed if e["part"] == "directory"]
    assert sorted(e["revision"] for e in directories) == sorted(
        revision_in(data) for data in updates
    )
    for entry in directories:
        data = (pack / entry["file"]).read_bytes()
        assert data in updates
        assert entry["file"].endswith(hashlib.sha256(data).hexdigest() + ".tar")
    bundles = [e for e in signed if e["part"] == "policy"]
    assert len(bundles) == 1
    assert all(e["file"] in manifest["files"] for e in signed)


def test_signed_updates_are_checked_with_the_publisher_keys_and_reported_without(
    signed_run, auditor_python
):
    pack, audit_key, keys, _ = signed_run
    publishers = (keys / "directory.pub", keys / "bundle.pub")

    only_audit = verify_pack(pack, [audit_key])
    every = verify_pack(pack, [audit_key], publishers)
    code, text = run_script(auditor_python, pack, audit_key, publishers=publishers)
    cli = verify_export(pack, audit_key, publishers)

    assert len(only_audit.unchecked) == 3
    assert "signed updates: 0 of 3 checked" in only_audit.summary()
    assert "pass its key with --publisher-key" in only_audit.summary()
    assert every.unchecked == []
    assert "signed updates: 3 of 3 checked" in every.summary()
    assert code == 0 and "3 of 3 checked" in text, text
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "3 of 3 checked" in cli.stdout


def test_publisher_keys_given_as_trusted_keys_check_no_signed_update(signed_run):
    pack, audit_key, keys, _ = signed_run

    # The old way of passing them: beside the audit key, as trusted keys.
    report = verify_pack(pack, [audit_key, keys / "directory.pub", keys / "bundle.pub"])

    assert len(report.unchecked) == 3
    assert "signed updates: 0 of 3 checked" in report.summary()


def test_a_directory_key_given_as_a_publisher_key_does_not_vouch_for_checkpoints(
    signed_run, tmp_path, auditor_python
):
    from sync.test_daemon_directory import DIRECTORY_KEY

    pack = tmp_path / "pack"
    shutil.copytree(signed_run[0], pack)
    audit_key, keys = signed_run[1], signed_run[2]
    publishers = (keys / "directory.pub", keys / "bundle.pub")
    # Checkpoints re-signed with the collector's directory key.
    lines = (pack / "checkpoints.jsonl").read_bytes().split(b"\n")[:-1]
    forged = []
    for line in lines:
        cp = decode_checkpoint(line)
        forged.append(
            encode_checkpoint(
                sign_checkpoint(
                    kind=cp.kind,
                    origin=cp.origin,
                    log_id=cp.log_id,
                    tree_size=cp.tree_size,
                    root=bytes.fromhex(cp.root),
                    chain_hash=bytes.fromhex(cp.chain_hash),
                    time=parse_timestamp(cp.time),
                    key=DIRECTORY_KEY,
                )
            )
        )
    (pack / "checkpoints.jsonl").write_bytes(b"".join(f + b"\n" for f in forged))
    reseal_manifest(pack)

    with pytest.raises(PackError) as with_audit_key:
        verify_pack(pack, [audit_key], publishers)
    code, text = run_script(auditor_python, pack, audit_key, publishers=publishers)
    cli = verify_export(pack, audit_key, publishers)

    assert with_audit_key.value.kind == "unknown_key"
    assert DIRECTORY_KEY.key_id in str(with_audit_key.value)
    assert code == 1 and text.startswith("FAILED: unknown_key: "), text
    assert cli.returncode == 1 and cli.stdout.startswith("FAILED: unknown_key: ")
    # It is only the separation that fails it: as a trusted key it would pass.
    assert verify_pack(pack, [keys / "directory.pub"]).signers == [DIRECTORY_KEY.key_id]


def test_an_update_under_a_key_id_outside_the_publisher_keys_fails(
    signed_run, tmp_path, auditor_python
):
    from kynara_sidecar.audit.keys import load_signing_key
    from kynara_sidecar.decision import Timestamp
    from kynara_sidecar.sync.directory import build_directory_update

    pack = tmp_path / "pack"
    shutil.copytree(signed_run[0], pack)
    audit_key, keys = signed_run[1], signed_run[2]
    audit_signing = load_signing_key(audit_key.with_name("audit-key.pem"))
    manifest = json.loads((pack / MANIFEST_FILE).read_bytes())
    entry = next(e for e in manifest["signed"] if e["part"] == "directory")
    kept = pack / "policy_sets" / "directory" / entry["revision"].replace(":", "-")
    content = (kept / "directory.json").read_bytes()
    # The same directory, signed by the daemon's audit key.
    forged = build_directory_update(content, audit_signing, Timestamp(1_796_634_000, 0))
    (pack / entry["file"]).unlink()
    entry["file"] = f"signed/directory/sha256-{hashlib.sha256(forged).hexdigest()}.tar"
    (pack / entry["file"]).write_bytes(forged)
    manifest["signed"] = sorted(
        manifest["signed"], key=lambda e: (e["part"], e["file"])
    )
    (pack / MANIFEST_FILE).write_bytes(encode_manifest(manifest))
    reseal_manifest(pack)

    publishers = (keys / "directory.pub", keys / "bundle.pub")

    with pytest.raises(PackError) as failed:
        verify_pack(pack, [audit_key], publishers)
    code, text = run_script(auditor_python, pack, audit_key, publishers=publishers)
    cli = verify_export(pack, audit_key, publishers)
    without_publishers = verify_pack(pack, [audit_key])

    # The audit key does not vouch for it: with publisher keys given, a
    # signer outside them is a failure, named, not a gap.
    assert failed.value.kind == "unknown_key"
    assert entry["file"] in str(failed.value)
    assert audit_signing.key_id in str(failed.value)
    assert code == 1 and text.startswith("FAILED: unknown_key: "), text
    assert entry["file"] in text
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout.startswith("FAILED: unknown_key: ")
    # Without any publisher key nothing is checked, and it is only reported.
    assert len(without_publishers.unchecked) == 3
    assert "signed updates: 0 of 3 checked" in without_publishers.summary()


def test_a_forged_directory_update_fails_under_the_collectors_key(signed_run, tmp_path):
    from sync.test_daemon_directory import OTHER_KEY

    from kynara_sidecar.audit.keys import encode_base64url
    from kynara_sidecar.sync.bundle import pack_members, unpack_members

    pack = tmp_path / "pack"
    shutil.copytree(signed_run[0], pack)
    audit_key, keys = signed_run[1], signed_run[2]
    manifest = json.loads((pack / MANIFEST_FILE).read_bytes())
    entry = next(e for e in manifest["signed"] if e["part"] == "directory")
    members = unpack_members((pack / entry["file"]).read_bytes())
    # Signed by another key but naming the collector's key id.
    members["directory-update.sig"] = encode_base64url(
        OTHER_KEY.sign(members["directory-update.json"])
    ).encode()
    forged = pack_members(members)
    (pack / entry["file"]).unlink()
    entry["file"] = f"signed/directory/sha256-{hashlib.sha256(forged).hexdigest()}.tar"
    (pack / entry["file"]).write_bytes(forged)
    manifest["signed"] = sorted(
        manifest["signed"], key=lambda e: (e["part"], e["file"])
    )
    (pack / MANIFEST_FILE).write_bytes(encode_manifest(manifest))
    reseal_manifest(pack)

    with pytest.raises(PackError) as failed:
        verify_pack(pack, [audit_key], [keys / "directory.pub", keys / "bundle.pub"])
    unchecked = verify_pack(pack, [audit_key])

    assert failed.value.kind == "bad_signature"
    assert entry["file"] in str(failed.value)
    assert len(unchecked.unchecked) == 3


def test_scan_signed_inside_reading_sees_the_pinned_snapshot(tmp_path):
    import threading

    from kynara_sidecar.audit.store import DIRECTORIES_DB, directory_changes
    from kynara_sidecar.sync.follower import bundle_digest

    first, later = b"first update", b"later update"
    store = AuditStore.open(tmp_path / "audit", map_size=1 << 24)
    try:
        store.append_batch([], directory_changes(bundle_digest(first), first))
        with store.reading():
            # Committed by another thread after the snapshot was pinned.
            writer = threading.Thread(
                target=store.append_batch,
                args=([], directory_changes(bundle_digest(later), later)),
            )
            writer.start()
            writer.join()
            pinned = store.scan_signed(DIRECTORIES_DB, bytes)
        after = store.scan_signed(DIRECTORIES_DB, bytes)
    finally:
        store.close()

    assert pinned == [(bundle_digest(first), first)]
    assert sorted(after) == sorted(
        [(bundle_digest(first), first), (bundle_digest(later), later)]
    )
