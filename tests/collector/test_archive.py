"""The archive: a directory with atomic renames, and S3 through boto3
against moto's standalone S3 server on loopback."""

from __future__ import annotations

import pytest

from kynara_sidecar.collector.archive import (
    log_prefix,
    open_archive,
    segment_key,
    tree_size_of,
)
from kynara_sidecar.errors import ConfigError

LOG_ID = "0123456789abcdef0123456789abcdef"


def _exercise(archive) -> None:
    for size in (12, 4, 8, 100):
        archive.put(segment_key("bot-1", LOG_ID, size), f"segment {size}".encode())
    archive.put(segment_key("bot-2", LOG_ID, 4), b"other daemon")
    archive.put(segment_key("bot-1", LOG_ID, 8), b"segment 8")  # idempotent

    keys = archive.list(log_prefix("bot-1", LOG_ID))

    assert [tree_size_of(k) for k in keys] == [4, 8, 12, 100]
    assert archive.get(keys[1]) == b"segment 8"
    assert archive.get(segment_key("bot-1", LOG_ID, 5)) is None
    assert archive.list(log_prefix("bot-3", LOG_ID)) == []


def test_dir_archive_lists_a_logs_segments_in_order(tmp_path):
    archive = open_archive(f"dir://{tmp_path / 'archive'}")

    _exercise(archive)

    leftovers = [p for p in (tmp_path / "archive").rglob(".tmp-*")]
    assert leftovers == []


def test_s3_archive_lists_a_logs_segments_in_order(s3_bucket):
    endpoint, bucket = s3_bucket
    archive = open_archive(f"s3://{bucket}/fleet/eu", endpoint_url=endpoint)

    _exercise(archive)

    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    assert all(item["Key"].startswith("fleet/eu/") for item in listed["Contents"])


def test_s3_archive_lists_past_one_page(s3_bucket):
    endpoint, bucket = s3_bucket
    archive = open_archive(f"s3://{bucket}", endpoint_url=endpoint)
    for size in range(1, 1003):
        archive.put(segment_key("bot-1", LOG_ID, size), b"x")

    keys = archive.list(log_prefix("bot-1", LOG_ID))

    assert [tree_size_of(k) for k in keys] == list(range(1, 1003))


def test_segment_key_pads_the_tree_size():
    assert segment_key("bot-1", LOG_ID, 42).endswith(f"/{LOG_ID}/{42:020d}.segment")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///tmp/a", "expected dir://PATH or s3://BUCKET/PREFIX"),
        ("dir://", "expected dir://PATH or s3://BUCKET/PREFIX"),
        ("s3://", "expected dir://PATH or s3://BUCKET/PREFIX"),
        ("s3:///prefix", "'s3:///prefix': expected s3://BUCKET/PREFIX"),
    ],
)
def test_unknown_archive_url_is_refused(url, expected):
    with pytest.raises(ConfigError, match=expected):
        open_archive(url)
