"""SIGHUP with a broken certificate renewal on disk: a real daemon process
whose http.tls key was replaced by another certificate's. The served
certificate is watched on its own (it stays); a reload must still apply a
changed policy and the live settings."""

from __future__ import annotations

from ops_daemon import (
    CALL_TIMEOUT,
    DaemonProcess,
    refund,
    wait_for_new_revision,
)
from tls_support import self_signed, stray_key, write_pair


def test_sighup_applies_policy_and_log_level_despite_a_broken_tls_renewal(tmp_path):
    pair = write_pair(tmp_path, self_signed("127.0.0.1"), stem="http")
    daemon = DaemonProcess(tmp_path, {"http.tls": pair.settings()})

    try:
        with daemon.channel() as channel:
            stub = daemon.stub(channel)
            before = stub.Decide(refund(), timeout=CALL_TIMEOUT).policy_revision
            # A renewal gone wrong: the key of another certificate.
            pair.key_file.write_bytes(stray_key())
            daemon.change_payments_policy("new")
            daemon.set(**{"log.level": "debug"})
            reloaded = daemon.reload_and_wait("the reload")
            wait_for_new_revision(stub, before, "the new policy")
    finally:
        exit_code = daemon.stop()

    assert reloaded["msg"] == "config reloaded"
    assert "log.level" in reloaded["applied"]
    assert exit_code == 0
