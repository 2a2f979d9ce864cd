"""The bundle follower says when its watch is back after a store outage
("watching bundles again", at info, as status and shipping say theirs),
and only then. A real directory store in tmp_path."""

from __future__ import annotations

import logging
import shutil

from ._bundles import policy_dir, revision_of, signed
from .test_follower import Harness, run, wait_until

AGAIN = "watching bundles again"


def _again(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == AGAIN]


def test_a_watch_back_after_an_outage_is_logged_once_at_info(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kynara")

    async def scenario(h: Harness):
        shutil.rmtree(h.root)
        h.follower.start()
        await wait_until(lambda: h.count("unreachable") >= 2, "failed attempts")
        assert _again(caplog) == []

        h.root.mkdir()
        await h.store.connect()
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        r1 = revision_of(policy_dir(tmp_path, "r1"))
        await wait_until(lambda: h.activated == [r1], "r1 to activate")
        await wait_until(lambda: _again(caplog), AGAIN)

    run(tmp_path, scenario)

    (line,) = _again(caplog)
    assert line.levelno == logging.INFO
    assert line.fields["component"] == "sync"
    assert line.fields["source"].startswith("dir://")


def test_a_watch_that_never_failed_logs_no_recovery(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kynara")

    async def scenario(h: Harness):
        await h.store.publish_bundle(signed(tmp_path, "r1"))
        h.follower.start()
        r1 = revision_of(policy_dir(tmp_path, "r1"))
        await wait_until(lambda: h.activated == [r1], "r1 to activate")

    run(tmp_path, scenario)

    assert _again(caplog) == []
