"""scim2-tester, the public SCIM compliance checker, against the collector's
SCIM endpoint on its real HTTP listener (127.0.0.1), through scim2-client's
httpx2 engine: every check passes, or is listed in ``NOT_APPLICABLE`` with
the reason it does not apply."""

from __future__ import annotations

import httpx2
import pytest
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import Status, check_server

from .test_scim import SECRET, Scim

# Check title -> why it does not apply to the collector. Empty: every
# check scim2-tester 0.5 runs passes.
NOT_APPLICABLE: dict[str, str] = {}
PASSING = {Status.SUCCESS, Status.COMPLIANT, Status.ACCEPTABLE}


@pytest.fixture
def scim(tmp_path):
    (tmp_path / "store").mkdir()
    started = Scim(tmp_path).start()
    yield started
    started.stop()


def test_scim2_tester_passes_every_check(scim):
    with httpx2.Client(
        base_url=f"http://127.0.0.1:{scim.port}/scim/v2",
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=30,
    ) as http:
        results = check_server(SyncSCIMClient(http))
    # Discovery and both resource types' CRUD checks ran.
    assert len(results) > 100
    assert {"User", "Group"} <= {r.resource_type for r in results}
    failed = [
        f"{result.resource_type or '-'}: {result.title}: {result.status.name}: "
        f"{result.reason}"
        for result in results
        if result.status not in PASSING and result.title not in NOT_APPLICABLE
    ]
    assert not failed, "\n".join(failed)
    # A listed check that no longer runs, or now passes, leaves the list.
    stale = set(NOT_APPLICABLE) - {r.title for r in results if r.status not in PASSING}
    assert not stale, f"listed but passing or not run: {sorted(stale)}"
