"""Where the collector keeps verified segments: a directory or S3.

Layout, the same for both (keys are ``/``-separated; the daemon token is
``sync.daemon_token``, which never holds ``/``)::

    <daemon_token>/<log_id>/<tree_size, 20 digits>.segment

Each object holds one whole segment as one ``kynara.v1.Segment`` message
(the checkpoint, ``previous_tree_size``, ``first_seq`` and every record),
however many messages it arrived in. The zero-padded tree size makes the
lexicographic order of the keys the log's order, so listing a log's prefix
(what both backends do, sorted) gives its segments in sequence; each
segment's ``previous_tree_size`` is the tree size of the one before it.

- ``dir://PATH``: files written to a temporary name in the same directory,
  synced, renamed into place, and the directory synced: a reader sees the
  whole segment or none.
- ``s3://BUCKET/PREFIX``: objects put whole (S3 never shows part of a
  put), through boto3 (the ``collector`` extra:
  ``pip install 'kynara-sidecar[collector]'``), with ``archive.s3.endpoint_url``
  for S3-compatible storage and credentials from the usual AWS variables
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, or a profile). The tests
  run against moto's standalone S3 server on loopback, since no real S3
  runs here.

Writing a key again writes the same bytes (a re-delivered segment the
collector accepts again after a crash), so every put is idempotent. Calls
are blocking; the collector makes them from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Any, Protocol

from kynara_sidecar.errors import ConfigError, KynaraError
from kynara_sidecar.sync import daemon_token

__all__ = [
    "Archive",
    "ArchiveError",
    "DirArchive",
    "S3Archive",
    "log_prefix",
    "open_archive",
    "segment_key",
    "tree_size_of",
]

SEGMENT_SUFFIX = ".segment"
TREE_SIZE_DIGITS = 20


class ArchiveError(KynaraError):
    """The archive cannot be read or written; names it and what failed."""


class Archive(Protocol):
    """A place for segment objects, by key."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` whole, replacing what was there."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object under ``key``, or None."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""
        ...


def log_prefix(daemon_id: str, log_id: str) -> str:
    """The prefix of one log's segments."""
    return f"{daemon_token(daemon_id)}/{log_id}/"


def segment_key(daemon_id: str, log_id: str, tree_size: int) -> str:
    """The key of the segment whose checkpoint is at ``tree_size``."""
    return f"{log_prefix(daemon_id, log_id)}{tree_size:0{TREE_SIZE_DIGITS}d}.segment"


def tree_size_of(key: str) -> int | None:
    """The tree size a segment key names, or None for another key."""
    name = key.rsplit("/", 1)[-1]
    digits = name.removesuffix(SEGMENT_SUFFIX)
    if name == digits or len(digits) != TREE_SIZE_DIGITS or not digits.isdigit():
        return None
    return int(digits)


class DirArchive:
    """Segments as files under a directory."""

    def __init__(self, url: str, root: str):
        self.url = url
        self.root = pathlib.Path(root)

    def _path(self, key: str) -> pathlib.Path:
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ArchiveError(f"{self.url}: expected a relative key, got {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _sync_dir(path.parent)
        except OSError as err:
            raise ArchiveError(
                f"{self.url}: cannot write {key}: {err}; check archive.url"
            ) from err

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ArchiveError(f"{self.url}: cannot read {key}: {err}") from err

    def list(self, prefix: str) -> list[str]:
        directory, _, start = prefix.rpartition("/")
        base = self._path(directory) if directory else self.root
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ArchiveError(f"{self.url}: cannot list {prefix}: {err}") from err
        head = f"{directory}/" if directory else ""
        return sorted(
            head + name
            for name in names
            if name.startswith(start) and not name.startswith(".tmp-")
        )


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Archive:
    """Segments as objects in an S3 bucket, under a key prefix."""

    def __init__(
        self, url: str, bucket: str, prefix: str, *, endpoint_url: str, region: str
    ):
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise ConfigError(
                f"archive.url {url!r}: S3 needs boto3; install it with "
                "pip install 'kynara-sidecar[collector]'"
            ) from None
        self.url = url
        self._bucket = bucket
        self._prefix = prefix
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region or None,
            config=BotoConfig(retries={"max_attempts": 3, "mode": "standard"}),
        )

    def _call(self, what: str, key: str, call: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(Bucket=self._bucket, **kw)
        except ClientError as err:
            if what == "read" and err.response.get("Error", {}).get("Code") in (
                "NoSuchKey",
                "404",
            ):
                return None
            raise ArchiveError(
                f"{self.url}: cannot {what} {key}: {err}; check archive.url, "
                "archive.s3 and the AWS credentials"
            ) from err
        except BotoCoreError as err:
            raise ArchiveError(
                f"{self.url}: cannot {what} {key}: {err}; check archive.s3.endpoint_url"
            ) from err

    def put(self, key: str, data: bytes) -> None:
        self._call(
            "write", key, self._client.put_object, Key=self._prefix + key, Body=data
        )

    def get(self, key: str) -> bytes | None:
        reply = self._call("read", key, self._client.get_object, Key=self._prefix + key)
        return None if reply is None else reply["Body"].read()

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict[str, str] = {}
        while True:
            reply = self._call(
                "list",
                prefix,
                self._client.list_objects_v2,
                Prefix=self._prefix + prefix,
                **token,
            )
            cut = len(self._prefix)
            keys.extend(item["Key"][cut:] for item in reply.get("Contents", ()))
            if not reply.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": reply["NextContinuationToken"]}


def open_archive(url: str, *, endpoint_url: str = "", region: str = "") -> Archive:
    """The archive ``url`` names.

    Args:
        url: ``dir:///abs/path``, ``dir://rel/path`` or ``s3://bucket/prefix``.
        endpoint_url: for S3-compatible storage (``archive.s3.endpoint_url``).
        region: the S3 region (``archive.s3.region``).

    Raises:
        ConfigError: an unknown scheme, no path or bucket, or no boto3.
    """
    scheme, sep, rest = url.partition("://")
    if scheme == "dir" and sep and rest:
        return DirArchive(url, rest)
    if scheme == "s3" and sep and rest:
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConfigError(f"archive.url {url!r}: expected s3://BUCKET/PREFIX")
        prefix = prefix.strip("/")
        return S3Archive(
            url,
            bucket,
            f"{prefix}/" if prefix else "",
            endpoint_url=endpoint_url,
            region=region,
        )
    raise ConfigError(
        f"archive.url: expected dir://PATH or s3://BUCKET/PREFIX, got {url!r}"
    )
