"""Fixtures for the audit tests: stores in tmp_path, closed at teardown."""

from __future__ import annotations

import pytest

from kynara_sidecar.audit.store import AuditStore


@pytest.fixture
def open_store(tmp_path):
    """Open stores in tmp_path; every store is closed at teardown."""
    stores = []

    def open_(name="log", **options):
        store = AuditStore.open(tmp_path / name, **options)
        stores.append(store)
        return store

    yield open_
    for store in stores:
        store.close()
