"""The Merkle tree over the audit log: roots, proofs, their checks (RFC 9162).

Theory of operation
-------------------
Beside the hash chain, the log is one Merkle tree whose leaves are the
records in sequence order (RFC 9162 section 2.1). Leaves and inner nodes are
hashed with different one-byte prefixes, so no leaf can be passed off as a
node (the second-preimage defence of RFC 9162 section 2.1.1)::

    leaf_hash(record_bytes) = SHA-256(0x00 || record_bytes)
    node_hash(left, right)  = SHA-256(0x01 || left || right)
    MTH({})                 = SHA-256()                        EMPTY_ROOT
    MTH({d0})               = leaf_hash(d0)
    MTH(D[n])               = node_hash(MTH(D[0:k]), MTH(D[k:n]))

where ``k`` is the largest power of two smaller than ``n``. The left subtree
is therefore always perfect, which is what lets a tree grow by appending.

Two proofs follow from that shape:

* an **inclusion proof** (PATH) for leaf ``m`` of a tree of size ``n`` is the
  list of sibling subtree roots from the leaf up; hashing the leaf with them
  in turn must give the root. It proves one record is in the tree.
* a **consistency proof** (PROOF) between sizes ``m <= n`` is the list of
  subtree roots that rebuild both the old root and the new root; it proves
  the tree of size ``n`` only appended to the tree of size ``m``.

The functions that build proofs take every leaf hash; the functions that
check proofs take only hashes and sizes and follow the iterative algorithms
of RFC 9162 sections 2.1.3.2 and 2.1.4.2, so a verifier needs nothing but
SHA-256. A bad proof makes a check return ``False``; an impossible question
(a leaf index outside the tree, an old size larger than the new) raises
``ValueError``.

``CompactRange`` keeps the tree's right edge: one root per perfect subtree,
one per set bit of the size, so O(log n) hashes. Appending a leaf merges
equal-sized subtrees like carrying in binary addition, and folding the edge
from the right gives ``MTH``. The writer can keep it (and persist its
``state()``) without holding every leaf.

NOTE: a root does not commit to the size of its tree, and a proof checked
against a wrong size can still hold when that size gives the proof path the
same shape (1000 and 1001 do for some old sizes). That is RFC 9162's design,
not a gap here: the size is bound to the root by the signed checkpoint, so
callers must take ``tree_size`` / ``new_size`` from the same checkpoint as
the root, never from the party that supplies the proof.

This module is pure: bytes in, values out; it needs only ``hashlib``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "NodeLookup",
    "compact_range_from_nodes",
    "consistency_proof",
    "consistency_proof_from_nodes",
    "inclusion_proof",
    "inclusion_proof_from_nodes",
    "leaf_hash",
    "node_hash",
    "node_positions",
    "root",
    "root_from_nodes",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
# MTH of the empty tree (RFC 9162 section 2.1.1): the hash of no bytes.
EMPTY_ROOT = hashlib.sha256(b"").digest()

# get_node(level, index): the root of the perfect subtree over leaves
# [index * 2**level, (index + 1) * 2**level); level 0 holds the leaf hashes.
NodeLookup = Callable[[int, int], bytes]
Subtree = Callable[[int, int], bytes]

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(record_bytes: bytes) -> bytes:
    """Return SHA-256(0x00 || record_bytes), the leaf hash of one record."""
    return hashlib.sha256(_LEAF_PREFIX + record_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return SHA-256(0x01 || left || right), the hash of an inner node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash (MTH) of a tree with these leaf hashes.

    Args:
        leaf_hashes: the leaf hashes in sequence order (see ``leaf_hash``).

    Returns:
        The 32-byte root; ``EMPTY_ROOT`` for no leaves.

    Raises:
        ValueError: a leaf hash is not 32 bytes.
    """
    _check_leaves(leaf_hashes)
    if not leaf_hashes:
        return EMPTY_ROOT
    return _subtree_root(leaf_hashes, 0, len(leaf_hashes))


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Return the inclusion proof (PATH) of leaf ``index`` in this tree.

    Args:
        leaf_hashes: every leaf hash of the tree, in sequence order.
        index: the 0-based position of the leaf to prove.

    Returns:
        The sibling subtree roots from the leaf up to the root; empty for a
        tree of one leaf.

    Raises:
        ValueError: ``index`` is outside ``[0, len(leaf_hashes))``, or a leaf
            hash is not 32 bytes.
    """
    _check_leaves(leaf_hashes)
    size = len(leaf_hashes)
    if not 0 <= index < size:
        raise ValueError(
            f"leaf index must be in [0, {size}) for a tree of size {size}, got {index}"
        )
    return _path(_leaf_subtree(leaf_hashes), index, 0, size)


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the consistency proof (PROOF) from size ``old_size`` to this tree.

    Args:
        leaf_hashes: every leaf hash of the new tree, in sequence order.
        old_size: the size of the earlier tree, a prefix of this one.

    Returns:
        The subtree roots that rebuild both roots; empty when ``old_size`` is
        0 or equals the tree size (nothing to prove).

    Raises:
        ValueError: ``old_size`` is outside ``[0, len(leaf_hashes)]``, or a
            leaf hash is not 32 bytes.
    """
    _check_leaves(leaf_hashes)
    size = len(leaf_hashes)
    if not 0 <= old_size <= size:
        raise ValueError(
            f"old size must be in [0, {size}] for a tree of size {size}, got {old_size}"
        )
    if old_size in (0, size):
        return []
    return _subproof(_leaf_subtree(leaf_hashes), old_size, 0, size, True)


def node_positions(size: int) -> list[tuple[int, int]]:
    """Return the ``(level, index)`` of each perfect subtree that leaf
    ``size - 1`` completes, leaf first: the nodes a store writes for it."""
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    index, level, positions = size - 1, 0, [(0, size - 1)]
    while index & 1:
        index >>= 1
        level += 1
        positions.append((level, index))
    return positions


def root_from_nodes(get_node: NodeLookup, size: int) -> bytes:
    """Return the MTH of the first ``size`` leaves from stored nodes.

    Raises:
        ValueError: ``size`` is negative, or a stored node is not 32 bytes.
    """
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    if size == 0:
        return EMPTY_ROOT
    return _stored_subtree(get_node)(0, size)


def inclusion_proof_from_nodes(
    get_node: NodeLookup, index: int, size: int
) -> list[bytes]:
    """``inclusion_proof`` from stored nodes: O(log^2 n) lookups, no leaves.

    Raises:
        ValueError: ``index`` is outside ``[0, size)``.
    """
    if not 0 <= index < size:
        raise ValueError(
            f"leaf index must be in [0, {size}) for a tree of size {size}, got {index}"
        )
    return _path(_stored_subtree(get_node), index, 0, size)


def consistency_proof_from_nodes(
    get_node: NodeLookup, old_size: int, new_size: int
) -> list[bytes]:
    """``consistency_proof`` from stored nodes.

    Raises:
        ValueError: not ``0 <= old_size <= new_size``.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(
            f"old size must be in [0, {new_size}] for a tree of size {new_size}, "
            f"got {old_size}"
        )
    if old_size in (0, new_size):
        return []
    return _subproof(_stored_subtree(get_node), old_size, 0, new_size, True)


def compact_range_from_nodes(get_node: NodeLookup, size: int) -> CompactRange:
    """Rebuild the right edge of the tree of ``size`` leaves from stored nodes.

    Raises:
        ValueError: ``size`` is negative, or a stored node is not 32 bytes.
    """
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    hashes, start = [], 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            hashes.append(_stored(get_node, level, start >> level))
            start += 1 << level
    return CompactRange.from_state(size, hashes)


def verify_inclusion(
    leaf_hash: bytes,
    index: int,
    tree_size: int,
    proof: Sequence[bytes],
    root: bytes,
) -> bool:
    """Check that ``proof`` places ``leaf_hash`` at ``index`` under ``root``.

    Follows RFC 9162 section 2.1.3.2.

    Args:
        leaf_hash: the leaf hash of the record (see ``leaf_hash``).
        index: the 0-based position claimed for the leaf.
        tree_size: the size of the tree ``root`` is the root of.
        proof: the inclusion proof, as ``inclusion_proof`` returns it.
        root: the root of the tree of size ``tree_size``.

    Returns:
        ``True`` if the proof holds; ``False`` for any bad proof, leaf or
        root (wrong length, wrong hashes, too few or too many hashes).

    Raises:
        ValueError: ``index`` is outside ``[0, tree_size)``.
    """
    if not 0 <= index < tree_size:
        raise ValueError(
            f"leaf index must be in [0, {tree_size}) for a tree of size "
            f"{tree_size}, got {index}"
        )
    if not _all_hashes((leaf_hash, root, *proof)):
        return False
    fn, sn, r = index, tree_size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            fn, sn = _shift_to_set_bit(fn, sn)
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Check that the tree of ``new_root`` only appended to that of ``old_root``.

    Follows RFC 9162 section 2.1.4.2, which covers ``0 < old_size <
    new_size``. The edges are decided here: equal sizes need an empty proof
    and equal roots; size 0 needs an empty proof and ``old_root ==
    EMPTY_ROOT`` (every tree extends the empty one).

    Args:
        old_size: the size of the earlier tree.
        new_size: the size of the later tree.
        old_root: the root of the earlier tree.
        new_root: the root of the later tree.
        proof: the consistency proof, as ``consistency_proof`` returns it.

    Returns:
        ``True`` if the proof holds; ``False`` for any bad proof or root.

    Raises:
        ValueError: a size is negative or ``old_size > new_size``.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(
            f"sizes must satisfy 0 <= old size <= new size, "
            f"got old size {old_size}, new size {new_size}"
        )
    if not _all_hashes((old_root, new_root, *proof)):
        return False
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if old_size == new_size:
        return not proof and old_root == new_root
    return _verify_consistency_path(old_size, new_size, old_root, new_root, proof)


class CompactRange:
    """The right edge of a growing tree: enough to append and give the root.

    Holds one subtree root per set bit of ``size``, largest (leftmost) first,
    so at most 64 hashes for any log that fits in a 64-bit sequence number.
    Build one empty with ``CompactRange()`` or from a persisted ``state()``
    with ``CompactRange.from_state``.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_state(cls, size: int, hashes: Iterable[bytes]) -> CompactRange:
        """Rebuild a range from what ``state()`` returned.

        Args:
            size: the number of leaves appended so far.
            hashes: the subtree roots, largest first, one per set bit of size.

        Raises:
            ValueError: ``size`` is negative, the number of hashes is not the
                number of set bits of ``size``, or a hash is not 32 bytes.
        """
        hashes = list(hashes)
        if size < 0:
            raise ValueError(f"compact range size must be >= 0, got {size}")
        expected = size.bit_count()
        if len(hashes) != expected:
            raise ValueError(
                f"compact range of size {size} needs {expected} hashes "
                f"(one per set bit), got {len(hashes)}"
            )
        for position, value in enumerate(hashes):
            _check_hash(value, f"compact range hash {position}")
        compact = cls()
        compact._size, compact._hashes = size, hashes
        return compact

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def state(self) -> tuple[int, tuple[bytes, ...]]:
        """Return ``(size, hashes)`` to persist; ``from_state`` takes it back."""
        return self._size, tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> list[bytes]:
        """Add the next leaf hash at the right edge.

        Returns:
            The nodes this leaf completes, leaf first: the hashes of the
            positions ``node_positions(size)`` gives for the new size.

        Raises:
            ValueError: ``leaf_hash`` is not 32 bytes; the range is unchanged.
        """
        _check_hash(leaf_hash, "leaf hash")
        node, carry = leaf_hash, self._size
        completed = [node]
        # Each trailing set bit of the old size is a perfect subtree as large
        # as the one being built: merge them, as a carry in binary addition.
        while carry & 1:
            node = node_hash(self._hashes.pop(), node)
            completed.append(node)
            carry >>= 1
        self._hashes.append(node)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """Return the MTH of the leaves appended so far (``EMPTY_ROOT`` if none)."""
        if not self._hashes:
            return EMPTY_ROOT
        result = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            result = node_hash(left, result)
        return result

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


def _verify_consistency_path(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    # RFC 9162 section 2.1.4.2, steps 1 to 7, for 0 < old_size < new_size.
    path = list(proof)
    if not path:
        return False
    if old_size & (old_size - 1) == 0:
        # The old tree is a perfect subtree of the new one: its root is the
        # first node of the walk, and the proof leaves it out.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            fn, sn = _shift_to_set_bit(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


def _shift_to_set_bit(fn: int, sn: int) -> tuple[int, int]:
    # "If LSB(fn) is not set, right-shift both until LSB(fn) is set or fn is 0."
    while fn and not fn & 1:
        fn, sn = fn >> 1, sn >> 1
    return fn, sn


def _largest_power_of_two_below(n: int) -> int:
    # The split point k of MTH: the largest power of two strictly below n > 1.
    return 1 << ((n - 1).bit_length() - 1)


def _subtree_root(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    # MTH(D[start:end]) by index, so no slice of the leaves is copied.
    if end - start == 1:
        return leaves[start]
    split = start + _largest_power_of_two_below(end - start)
    return node_hash(
        _subtree_root(leaves, start, split), _subtree_root(leaves, split, end)
    )


def _leaf_subtree(leaves: Sequence[bytes]) -> Subtree:
    return lambda start, end: _subtree_root(leaves, start, end)


def _stored_subtree(get_node: NodeLookup) -> Subtree:
    def subtree(start: int, end: int) -> bytes:
        # The left part of every split is perfect and aligned: one lookup.
        size = end - start
        if size & (size - 1) == 0:
            level = size.bit_length() - 1
            return _stored(get_node, level, start >> level)
        split = start + _largest_power_of_two_below(size)
        return node_hash(subtree(start, split), subtree(split, end))

    return subtree


def _stored(get_node: NodeLookup, level: int, index: int) -> bytes:
    value = get_node(level, index)
    _check_hash(value, f"stored node (level {level}, index {index})")
    return value


def _path(subtree: Subtree, index: int, start: int, end: int) -> list[bytes]:
    # PATH(index, D[start:end]) of RFC 9162 section 2.1.3.1; index is absolute.
    if end - start == 1:
        return []
    split = start + _largest_power_of_two_below(end - start)
    if index < split:
        return [*_path(subtree, index, start, split), subtree(split, end)]
    return [*_path(subtree, index, split, end), subtree(start, split)]


def _subproof(
    subtree: Subtree, old_end: int, start: int, end: int, whole: bool
) -> list[bytes]:
    # SUBPROOF(m, D[start:end], b) of RFC 9162 section 2.1.4.1, with
    # m = old_end - start; ``whole`` is b: the old tree is this subtree itself,
    # whose root the verifier already holds, so it is left out of the proof.
    if old_end == end:
        return [] if whole else [subtree(start, end)]
    split = start + _largest_power_of_two_below(end - start)
    if old_end <= split:
        head = _subproof(subtree, old_end, start, split, whole)
        return [*head, subtree(split, end)]
    head = _subproof(subtree, old_end, split, end, False)
    return [*head, subtree(start, split)]


def _check_leaves(leaf_hashes: Sequence[bytes]) -> None:
    for position, value in enumerate(leaf_hashes):
        _check_hash(value, f"leaf hash {position}")


def _check_hash(value: bytes, where: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        got = (
            f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        )
        raise ValueError(f"{where} must be {HASH_SIZE} bytes, got {got}")


def _all_hashes(values: Iterable[bytes]) -> bool:
    return all(isinstance(v, bytes) and len(v) == HASH_SIZE for v in values)
