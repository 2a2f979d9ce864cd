"""The witness: signed checkpoints kept outside the LMDB environment.

A log cannot vouch for its own tail: whoever can rewrite the LMDB file can
cut its newest records together with their checkpoints and the stored head,
and what is left still verifies on its own. So every sealed checkpoint, and
the head signed at each clean stop, is also written to a witness location
that the log's own volume does not hold (another volume here; the central
store once there is one). Verification then compares the log with the
largest tree the witness saw.

Layout, one directory per log (``origin`` is the daemon id, ``log_id`` the
log's random id, so a new chain after a break never overwrites the old
chain's evidence)::

    <root>/<origin>/<log_id>/checkpoint-<tree_size, 20 digits>.json
    <root>/<origin>/<log_id>/head.json

Each file holds the exact bytes of ``encode_checkpoint``. Files are written
to a temporary name, synced, renamed into place and the directory synced,
so a crash leaves the old file or the new one, never a torn one.
Checkpoint files are written once; ``head.json`` is replaced at each stop.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

from kynara_sidecar.audit.checkpoint import (
    CheckpointError,
    CheckpointKind,
    CheckpointV1,
    decode_checkpoint,
    encode_checkpoint,
    verify_checkpoint,
)
from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.errors import AuditUnavailable

__all__ = ["HEAD_FILE", "Witness", "WitnessError", "witnessed_logs"]

HEAD_FILE = "head.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{20})\.json$")
# Origins are printable ASCII; a path separator or a dot name would escape
# the witness root, so those characters are spelled out in the directory.
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9._@+=-]|^\.+$")


class WitnessError(AuditUnavailable):
    """The witness location cannot be written or holds a bad file."""


def _safe_name(name: str) -> str:
    return _UNSAFE_RE.sub(lambda match: f"%{ord(match.group()[0]):02x}", name)


class Witness:
    """The witness directory of one log.

    Args:
        root: the witness location (``audit.witness_path``).
        origin: the log's origin, the daemon id.
        log_id: the log's id (``AuditStore.log_id``).
    """

    def __init__(self, root: str | os.PathLike[str], origin: str, log_id: str):
        self.root = pathlib.Path(root)
        self.origin = origin
        self.log_id = log_id
        self.path = self.root / _safe_name(origin) / _safe_name(log_id)

    def write(self, checkpoint: CheckpointV1) -> pathlib.Path:
        """Write a checkpoint (or head) durably; return the file written.

        Raises:
            WitnessError: the location cannot be written; names the setting.
        """
        if checkpoint.kind == CheckpointKind.HEAD:
            name = HEAD_FILE
        else:
            name = f"checkpoint-{checkpoint.tree_size:020d}.json"
        target = self.path / name
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_atomically(target, encode_checkpoint(checkpoint))
        except OSError as err:
            raise WitnessError(
                f"cannot write witness file {target} ({err.strerror or err}): "
                "check audit.witness_path and its volume"
            ) from err
        return target

    def checkpoints(self) -> list[CheckpointV1]:
        """The witnessed segment checkpoints, by ascending tree size.

        Raises:
            WitnessError: a file cannot be read or does not decode.
        """
        try:
            names = sorted(
                entry.name
                for entry in self.path.iterdir()
                if _CHECKPOINT_RE.match(entry.name)
            )
        except FileNotFoundError:
            return []
        except OSError as err:
            raise WitnessError(f"cannot list witness {self.path}: {err}") from err
        statements = [self._read(self.path / name) for name in names]
        for name, statement in zip(names, statements, strict=True):
            named = int(_CHECKPOINT_RE.match(name).group(1))
            if statement.tree_size != named:
                raise WitnessError(
                    f"witness file {self.path / name} holds the checkpoint of "
                    f"tree size {statement.tree_size}: it was renamed or replaced"
                )
        return statements

    def sizes(self) -> set[int]:
        """The tree sizes of the witnessed checkpoints, from file names only.

        Raises:
            WitnessError: the directory cannot be listed.
        """
        try:
            names = [entry.name for entry in self.path.iterdir()]
        except FileNotFoundError:
            return set()
        except OSError as err:
            raise WitnessError(f"cannot list witness {self.path}: {err}") from err
        return {
            int(match.group(1))
            for name in names
            if (match := _CHECKPOINT_RE.match(name))
        }

    def head(self) -> CheckpointV1 | None:
        """The head witnessed at the last clean stop, or ``None``."""
        path = self.path / HEAD_FILE
        if not path.exists():
            return None
        return self._read(path)

    def latest(self) -> CheckpointV1 | None:
        """The witnessed statement with the largest tree size, or ``None``.

        A head and a checkpoint of the same size are equivalent; the
        checkpoint is returned.
        """
        statements = self.checkpoints()
        head = self.head()
        if head is not None:
            statements.append(head)
        if not statements:
            return None
        return max(statements, key=lambda cp: (cp.tree_size, cp.kind != "head"))

    def other_logs(self) -> list[str]:
        """The ids of this origin's other logs that the witness holds
        statements of: earlier chains, or a log that was deleted.

        Raises:
            WitnessError: the origin's directory cannot be listed or a file
                does not decode.
        """
        logs = witnessed_logs(self.root, self.origin)
        return sorted(log_id for log_id in logs if log_id != self.path.name)

    def _read(self, path: pathlib.Path) -> CheckpointV1:
        try:
            return decode_checkpoint(path.read_bytes())
        except OSError as err:
            raise WitnessError(f"cannot read witness file {path}: {err}") from err
        except CheckpointError as err:
            raise WitnessError(
                f"witness file {path} is not a checkpoint: {err}"
            ) from err


def witnessed_logs(
    root: str | os.PathLike[str],
    origin: str,
    trusted: Mapping[str, PublicKey] | None = None,
) -> dict[str, CheckpointV1]:
    """Each log of ``origin`` the witness holds statements of, with its
    latest statement (by tree size).

    With ``trusted``, only logs whose latest statement is signed by one of
    those keys count: a directory planted without a key is not a log.

    Raises:
        WitnessError: the origin's directory cannot be listed or a file does
            not decode.
    """
    origin_dir = pathlib.Path(root) / _safe_name(origin)
    try:
        entries = [entry for entry in origin_dir.iterdir() if entry.is_dir()]
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise WitnessError(
            f"cannot list witness {origin_dir}: {err.strerror or err}: check "
            "audit.witness_path"
        ) from err
    logs = {}
    for entry in entries:
        latest = Witness(root, origin, entry.name).latest()
        if latest is None or latest.log_id != entry.name:
            continue
        if trusted is not None:
            try:
                verify_checkpoint(latest, dict(trusted))
            except CheckpointError:
                continue
        logs[entry.name] = latest
    return logs


def _write_atomically(target: pathlib.Path, data: bytes) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
