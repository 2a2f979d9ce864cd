"""How many decisions fit before the log is full and the daemon fails closed.

Found by the crash test: 64 MiB held about 16,000 decisions of the shipped
policies, 4 KiB each, where ``audit/store.py`` plans for two million
450-byte records per GiB. A real decision record is about 1.5 KB, and with
keys appended in order LMDB splits each full leaf page in the middle, so
every record ends up alone on a 4 KiB page.
"""

from __future__ import annotations

import msgspec

from kynara_sidecar.audit.record import RECORD_VERSION, AuditRecordV1, RecordKind
from kynara_sidecar.audit.store import AuditStore

# A decision record of the shipped payments policy is 1.3-1.6 KB: two chain
# entries, env, two matched rules, revisions and a reason.
RECORD_BYTES = 1500
# Enough records that the tree's fixed pages are noise next to the leaves.
RECORDS = 1000
# Half-full pages at worst: what a B-tree promises, and what sizing
# audit.map_size from the record size can then rely on.
MAX_OVERHEAD = 2.0


def decision_record(n: int) -> AuditRecordV1:
    record = AuditRecordV1(
        v=RECORD_VERSION,
        kind=RecordKind.DECISION,
        time=f"2026-12-07T09:00:00.{n:09d}Z",
        daemon_id="support-bot-local",
        decision_id=f"00000000-0000-4000-8000-{n:012d}",
        action="payments.refund.issue",
        decision="allow",
    )
    padding = RECORD_BYTES - len(msgspec.json.encode(record))
    return msgspec.structs.replace(record, reason="r" * padding)


def test_log_pages_stay_at_least_half_full(tmp_path):
    # deferred: the page layout is the same and 1000 fsyncs are not needed.
    store = AuditStore.open(tmp_path / "audit", durability="deferred")
    try:
        empty, _ = store.usage()
        stored = sum(
            len(store.append_batch([decision_record(n)])[0].record_bytes)
            for n in range(RECORDS)
        )
        used, _ = store.usage()
    finally:
        store.close()

    assert (used - empty) / stored <= MAX_OVERHEAD
