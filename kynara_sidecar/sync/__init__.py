"""Sync: how a fleet of daemons converges on one policy revision.

This package will hold everything that moves between a daemon and the
centre: signed policy bundles (``bundle``: one file that packs a policy
directory with its revision, a manifest of file hashes and an Ed25519
signature), the stores bundles are published to and fetched from, the
shipping of sealed audit segments, and the status each daemon publishes.
Only ``bundle`` exists so far; see issue #6 for the rest.
"""

from __future__ import annotations

__all__: list[str] = []
