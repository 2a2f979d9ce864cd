"""Which daemons the collector takes segments and approvals from, and with
which keys: the ``daemons`` section, loaded.

An entry registers either one daemon by its exact id, or a family of
daemons by an id prefix (``id_prefix``): every daemon id that starts with
the prefix, is longer than it and is a valid daemon id. A family is for
daemons whose ids nobody knows ahead, such as a Kubernetes Deployment's
pods (``$(POD_NAME)/$(POD_UID)``), whose replicas share one audit key.

Everything the collector keeps stays per actual daemon id (frontier,
history, alerts, archive keys, queries, the inbox's copy); only the
metrics label is the entry's name (``label_for``), so the number of
series stays bounded by the configuration however many pods come and go.

The configuration check (``collector.config``) makes the lookup
unambiguous: no two prefixes where one starts with the other, and no
exact id that another entry's prefix matches. So a daemon id is matched
by at most one entry.

A family lets anyone who can write to the store name any number of
member ids; the intake keeps nothing of a member until a checkpoint
signed by one of the entry's keys arrives for it (``intake``, "Families"),
so what the collector keeps grows only with the ids the key's holders
signed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from kynara_sidecar.audit.keys import PublicKey
from kynara_sidecar.collector.metrics import UNREGISTERED
from kynara_sidecar.config import daemon_id_problem

__all__ = ["DaemonEntry", "DaemonRegistry"]


class DaemonEntry(NamedTuple):
    """One ``daemons`` entry, its keys loaded."""

    # The entry's name: the daemon id itself for an exact entry, the
    # family's name (its metrics label) for a prefix entry.
    name: str
    # Key id -> public key.
    keys: Mapping[str, PublicKey]
    # The family's id prefix; "" for an exact entry.
    id_prefix: str = ""

    @property
    def is_family(self) -> bool:
        return bool(self.id_prefix)


class DaemonRegistry:
    """Daemon id -> its entry, keys and metrics label.

    Args:
        entries: the loaded entries, already checked by the configuration
            (no overlapping prefixes, no exact id matched by a prefix).
    """

    def __init__(self, entries: Iterable[DaemonEntry] = ()):
        self._exact: dict[str, DaemonEntry] = {}
        self._families: list[DaemonEntry] = []
        for entry in entries:
            if entry.is_family:
                self._families.append(entry)
            else:
                self._exact[entry.name] = entry

    @classmethod
    def exact(cls, keys: Mapping[str, Mapping[str, PublicKey]]) -> DaemonRegistry:
        """A registry of exact ids only: daemon id -> its keys by key id."""
        return cls(DaemonEntry(name, k) for name, k in keys.items())

    def entry_for(self, daemon_id: str) -> DaemonEntry | None:
        """The entry that registers ``daemon_id``, or None."""
        found = self._exact.get(daemon_id)
        if found is not None:
            return found
        for family in self._families:
            if (
                daemon_id.startswith(family.id_prefix)
                and len(daemon_id) > len(family.id_prefix)
                and daemon_id_problem(daemon_id) is None
            ):
                return family
        return None

    def keys_for(self, daemon_id: str) -> Mapping[str, PublicKey] | None:
        """The registered keys of ``daemon_id`` by key id; None when no
        entry registers it."""
        entry = self.entry_for(daemon_id)
        return None if entry is None else entry.keys

    def label_for(self, daemon_id: str) -> str:
        """The metrics label of ``daemon_id``: its entry's name, or
        ``unregistered``."""
        entry = self.entry_for(daemon_id)
        return UNREGISTERED if entry is None else entry.name

    def is_family_member(self, daemon_id: str) -> bool:
        """Registered through an entry's ``id_prefix``, not by its exact id."""
        entry = self.entry_for(daemon_id)
        return entry is not None and entry.is_family

    def __contains__(self, daemon_id: object) -> bool:
        return isinstance(daemon_id, str) and self.entry_for(daemon_id) is not None

    @property
    def exact_ids(self) -> list[str]:
        """The daemon ids registered exactly, sorted."""
        return sorted(self._exact)

    @property
    def families(self) -> list[DaemonEntry]:
        """The prefix entries, in configuration order."""
        return list(self._families)
