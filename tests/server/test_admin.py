"""Admin credentials: who may call the admin listener, and what a refusal
says."""

from __future__ import annotations

import pytest

from kynara_sidecar.config import AdminRole
from kynara_sidecar.errors import RoleMissing
from kynara_sidecar.server.admin import AdminCredentials

REVIEWER_SECRET = b"reviewer-secret-0123456789abcdef"


def test_a_missing_role_is_named_as_the_config_spells_it():
    credentials = AdminCredentials(
        {"alice": (REVIEWER_SECRET, frozenset({AdminRole.REVIEWER}))}
    )

    with pytest.raises(RoleMissing) as info:
        credentials.authorize(
            f"Bearer {REVIEWER_SECRET.decode()}", AdminRole.OPERATOR, "SyncNow"
        )

    message = str(info.value)
    assert "with the operator role for SyncNow" in message
    assert "'alice' with roles [reviewer]" in message
    assert "AdminRole" not in message
    assert "admin.credentials.alice.roles" in message
