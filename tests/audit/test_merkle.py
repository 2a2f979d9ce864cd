"""The Merkle tree (pure): roots, proofs and their checks against RFC 9162."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kynara_sidecar.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# ------------------------------------------- reference, from the definitions
# Written straight from RFC 9162 section 2.1 on slices, recursion and all, so
# the module's index arithmetic and iterative checks answer to it.


def _ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _ref_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _ref_mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _ref_split(len(leaves))
    return _ref_node(_ref_mth(leaves[:k]), _ref_mth(leaves[k:]))


def _ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) == 1:
        return []
    k = _ref_split(len(leaves))
    if m < k:
        return _ref_path(m, leaves[:k]) + [_ref_mth(leaves[k:])]
    return _ref_path(m - k, leaves[k:]) + [_ref_mth(leaves[:k])]


def _ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    if m == len(leaves):
        return [] if whole else [_ref_mth(leaves)]
    k = _ref_split(len(leaves))
    if m <= k:
        return _ref_subproof(m, leaves[:k], whole) + [_ref_mth(leaves[k:])]
    return _ref_subproof(m - k, leaves[k:], False) + [_ref_mth(leaves[:k])]


def _ref_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(leaves)) else _ref_subproof(m, leaves, True)


def _leaves(count: int) -> list[bytes]:
    return [_ref_leaf(f"record {i}".encode()) for i in range(count)]


SMALL_SIZES = [1, 2, 3, 7, 8]
LARGE_SIZE = 1000
LARGE = _leaves(LARGE_SIZE)
SMALL_PAIRS = [(m, n) for n in SMALL_SIZES for m in range(n + 1)]
SMALL_LEAVES = [(i, n) for n in SMALL_SIZES for i in range(n)]


def _sample(seed: int, population: int, count: int) -> list[int]:
    # Seeded so a failure can be rerun; the seed is in the test id.
    return random.Random(seed).sample(range(population), count)


# ------------------------------------------------------- known-answer vectors
# RFC 6962's test leaves, as used by the Certificate Transparency and
# transparency-dev test suites; the expected hashes are their published ones.

KAT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
KAT_HASHES = [leaf_hash(data) for data in KAT_LEAVES]
KAT_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
_H_96A2 = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
_H_5F08 = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
_H_6B47 = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
_H_BC1A = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
_H_CA85 = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
_H_0EBC = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"
# (index, tree size, proof)
KAT_INCLUSION = [
    (0, 1, []),
    (0, 8, [_H_96A2, _H_5F08, _H_6B47]),
    (5, 8, [_H_BC1A, _H_CA85, KAT_ROOTS[4]]),
    (2, 3, [KAT_ROOTS[2]]),
    (1, 5, [KAT_ROOTS[1], _H_5F08, _H_BC1A]),
]
# (old size, new size, proof)
KAT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, [_H_96A2, _H_5F08, _H_6B47]),
    (6, 8, [_H_0EBC, _H_CA85, KAT_ROOTS[4]]),
    (2, 5, [_H_5F08, _H_BC1A]),
]


@pytest.mark.parametrize("size", sorted(KAT_ROOTS))
def test_root_matches_the_rfc_6962_test_vectors(size):
    assert root(KAT_HASHES[:size]).hex() == KAT_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "expected"), KAT_INCLUSION)
def test_inclusion_proof_matches_the_rfc_6962_test_vectors(index, size, expected):
    leaves = KAT_HASHES[:size]

    proof = inclusion_proof(leaves, index)

    assert [h.hex() for h in proof] == expected
    assert verify_inclusion(leaves[index], index, size, proof, root(leaves))


@pytest.mark.parametrize(("old", "new", "expected"), KAT_CONSISTENCY)
def test_consistency_proof_matches_the_rfc_6962_test_vectors(old, new, expected):
    proof = consistency_proof(KAT_HASHES[:new], old)

    assert [h.hex() for h in proof] == expected
    assert verify_consistency(
        old, new, root(KAT_HASHES[:old]), root(KAT_HASHES[:new]), proof
    )


def test_hashes_use_the_leaf_and_node_prefixes():
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert (
        node_hash(b"L" * 32, b"R" * 32)
        == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    )
    assert EMPTY_ROOT == hashlib.sha256(b"").digest()


# ------------------------------------------- against the reference, exhaustive


@pytest.mark.parametrize("size", [0, *SMALL_SIZES, LARGE_SIZE])
def test_root_matches_the_reference(size):
    assert root(LARGE[:size]) == _ref_mth(LARGE[:size])


@pytest.mark.parametrize(("index", "size"), SMALL_LEAVES)
def test_inclusion_proof_for_every_leaf_of_small_trees_verifies(index, size):
    leaves = LARGE[:size]

    proof = inclusion_proof(leaves, index)

    assert proof == _ref_path(index, leaves)
    assert verify_inclusion(leaves[index], index, size, proof, _ref_mth(leaves))


@pytest.mark.parametrize(("old", "new"), SMALL_PAIRS)
def test_consistency_proof_for_every_pair_of_small_trees_verifies(old, new):
    leaves = LARGE[:new]

    proof = consistency_proof(leaves, old)

    assert proof == _ref_proof(old, leaves)
    assert verify_consistency(old, new, _ref_mth(LARGE[:old]), _ref_mth(leaves), proof)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_inclusion_proof_for_sampled_leaves_of_a_large_tree_verifies(seed):
    large_root = _ref_mth(LARGE)
    # The edges (first, last, around powers of two) and a seeded sample.
    indexes = {0, 511, 512, 998, 999, *_sample(seed, LARGE_SIZE, 40)}

    for index in sorted(indexes):
        proof = inclusion_proof(LARGE, index)

        assert proof == _ref_path(index, LARGE), f"index {index}"
        assert verify_inclusion(LARGE[index], index, LARGE_SIZE, proof, large_root)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_consistency_proof_for_sampled_pairs_of_a_large_tree_verifies(seed):
    rng = random.Random(seed)
    pairs = {(0, 1000), (1, 1000), (512, 1000), (999, 1000), (1000, 1000)}
    pairs |= {tuple(sorted(rng.sample(range(1, LARGE_SIZE + 1), 2))) for _ in range(30)}

    for old, new in sorted(pairs):
        leaves = LARGE[:new]
        proof = consistency_proof(leaves, old)

        assert proof == _ref_proof(old, leaves), f"pair {old}, {new}"
        assert verify_consistency(
            old, new, _ref_mth(LARGE[:old]), _ref_mth(leaves), proof
        ), f"pair {old}, {new}"


# --------------------------------------------------------- bad proofs fail


def test_inclusion_proof_for_a_changed_record_fails():
    records = [f"record {i}".encode() for i in range(7)]
    leaves = [leaf_hash(r) for r in records]
    proof = inclusion_proof(leaves, 3)

    changed = leaf_hash(b"record 3 edited")

    assert not verify_inclusion(changed, 3, 7, proof, root(leaves))


def _inclusion_tamperings(proof: list[bytes]):
    other = _ref_leaf(b"somewhere else")
    yield "truncated", proof[:-1]
    yield "extended", [*proof, other]
    yield "prefixed", [other, *proof]
    yield "reordered", [proof[1], proof[0], *proof[2:]]
    yield "bit flipped", [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    yield "short hash", [proof[0][:31], *proof[1:]]
    yield "empty", []


@pytest.mark.parametrize(("index", "size"), [(0, 8), (5, 8), (2, 7), (600, 1000)])
def test_tampered_inclusion_proofs_fail(index, size):
    leaves = LARGE[:size]
    proof, tree_root = inclusion_proof(leaves, index), root(leaves)

    for kind, bad in _inclusion_tamperings(proof):
        assert not verify_inclusion(leaves[index], index, size, bad, tree_root), kind


@pytest.mark.parametrize(("index", "size"), [(0, 8), (5, 8), (2, 7), (600, 1000)])
def test_inclusion_proof_fails_for_another_index_size_or_root(index, size):
    leaves = LARGE[:size]
    proof, tree_root = inclusion_proof(leaves, index), root(leaves)

    assert not verify_inclusion(leaves[index], index + 1, size, proof, tree_root)
    assert not verify_inclusion(leaves[index], index, size * 2, proof, tree_root)
    assert not verify_inclusion(leaves[index], index, size, proof, EMPTY_ROOT)
    assert not verify_inclusion(leaves[index], index, size, proof, b"short")


def _consistency_tamperings(proof: list[bytes], old_root: bytes):
    yield "truncated", proof[:-1]
    yield "extended", [*proof, old_root]
    yield "prefixed", [old_root, *proof]
    yield "reordered", [proof[1], proof[0], *proof[2:]]
    yield "bit flipped", [*proof[:-1], bytes([proof[-1][0] ^ 1]) + proof[-1][1:]]
    yield "empty", []


@pytest.mark.parametrize(("old", "new"), [(1, 8), (6, 8), (2, 5), (3, 7), (300, 1000)])
def test_tampered_consistency_proofs_fail(old, new):
    old_root, new_root = root(LARGE[:old]), root(LARGE[:new])
    proof = consistency_proof(LARGE[:new], old)

    for kind, bad in _consistency_tamperings(proof, old_root):
        assert not verify_consistency(old, new, old_root, new_root, bad), kind


@pytest.mark.parametrize(("old", "new"), [(1, 8), (6, 8), (2, 5), (3, 7), (300, 1000)])
def test_consistency_proof_fails_for_swapped_roots_or_other_sizes(old, new):
    old_root, new_root = root(LARGE[:old]), root(LARGE[:new])
    proof = consistency_proof(LARGE[:new], old)

    assert not verify_consistency(old, new, new_root, old_root, proof)
    assert not verify_consistency(old + 1, new, old_root, new_root, proof)
    # Not new + 1: a root does not commit to its size, and sizes whose proof
    # paths have the same shape accept the same proof (see the module NOTE).
    assert not verify_consistency(old, new * 2, old_root, new_root, proof)


def test_consistency_proof_fails_when_the_old_tree_was_rewritten():
    rewritten = [*LARGE[:3], _ref_leaf(b"rewritten"), *LARGE[4:8]]
    proof = consistency_proof(rewritten, 5)

    assert not verify_consistency(5, 8, root(LARGE[:5]), root(rewritten), proof)


@pytest.mark.parametrize(
    ("old", "new", "old_root", "new_root", "proof", "expected"),
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 5, EMPTY_ROOT, root(LARGE[:5]), [], True),
        (0, 5, LARGE[0], root(LARGE[:5]), [], False),
        (0, 5, EMPTY_ROOT, root(LARGE[:5]), [EMPTY_ROOT], False),
        (4, 4, root(LARGE[:4]), root(LARGE[:4]), [], True),
        (4, 4, root(LARGE[:4]), root(LARGE[:3]), [], False),
        (4, 4, root(LARGE[:4]), root(LARGE[:4]), [LARGE[0]], False),
    ],
    ids=[
        "empty_to_empty",
        "empty_to_any",
        "empty_with_wrong_old_root",
        "empty_with_proof",
        "same_size",
        "same_size_other_root",
        "same_size_with_proof",
    ],
)
def test_consistency_edges_decide_without_a_path(
    old, new, old_root, new_root, proof, expected
):
    assert verify_consistency(old, new, old_root, new_root, proof) is expected


# ------------------------------------------------------ impossible arguments


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: inclusion_proof(LARGE[:3], 3),
            r"^leaf index must be in \[0, 3\) for a tree of size 3, got 3$",
        ),
        (
            lambda: inclusion_proof(LARGE[:3], -1),
            r"^leaf index must be in \[0, 3\) for a tree of size 3, got -1$",
        ),
        (
            lambda: inclusion_proof([], 0),
            r"^leaf index must be in \[0, 0\) for a tree of size 0, got 0$",
        ),
        (
            lambda: consistency_proof(LARGE[:3], 4),
            r"^old size must be in \[0, 3\] for a tree of size 3, got 4$",
        ),
        (
            lambda: verify_inclusion(LARGE[0], 8, 8, [], EMPTY_ROOT),
            r"^leaf index must be in \[0, 8\) for a tree of size 8, got 8$",
        ),
        (
            lambda: verify_inclusion(LARGE[0], 0, 0, [], EMPTY_ROOT),
            r"^leaf index must be in \[0, 0\) for a tree of size 0, got 0$",
        ),
        (
            lambda: verify_consistency(5, 4, EMPTY_ROOT, EMPTY_ROOT, []),
            r"^sizes must satisfy 0 <= old size <= new size, "
            r"got old size 5, new size 4$",
        ),
        (
            lambda: verify_consistency(-1, 4, EMPTY_ROOT, EMPTY_ROOT, []),
            r"^sizes must satisfy 0 <= old size <= new size, "
            r"got old size -1, new size 4$",
        ),
        (
            lambda: root([LARGE[0], b"short"]),
            r"^leaf hash 1 must be 32 bytes, got 5 bytes$",
        ),
        (
            lambda: root(["not bytes"]),
            r"^leaf hash 0 must be 32 bytes, got str$",
        ),
    ],
    ids=[
        "index_equal_to_size",
        "negative_index",
        "index_in_empty_tree",
        "old_size_above_size",
        "verify_index_equal_to_size",
        "verify_in_empty_tree",
        "old_size_above_new_size",
        "negative_old_size",
        "short_leaf_hash",
        "leaf_hash_not_bytes",
    ],
)
def test_impossible_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------- compact range


@given(st.lists(st.binary(max_size=16), max_size=70))
def test_compact_range_root_equals_root_for_every_prefix(records):
    leaves = [leaf_hash(r) for r in records]
    compact = CompactRange()
    assert compact.root() == EMPTY_ROOT

    for count, leaf in enumerate(leaves, start=1):
        compact.append(leaf)

        assert compact.size == count
        assert compact.root() == _ref_mth(leaves[:count])
        assert len(compact.state()[1]) == count.bit_count()


def test_compact_range_of_a_large_tree_keeps_one_hash_per_set_bit():
    compact = CompactRange()

    for leaf in LARGE:
        compact.append(leaf)

    assert compact.root() == root(LARGE)
    assert len(compact.state()[1]) == LARGE_SIZE.bit_count()


@given(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=40))
def test_compact_range_state_round_trip_continues_the_same_tree(before, after):
    first = CompactRange()
    for leaf in LARGE[:before]:
        first.append(leaf)

    resumed = CompactRange.from_state(*first.state())
    for leaf in LARGE[before : before + after]:
        resumed.append(leaf)

    assert resumed.size == before + after
    assert resumed.root() == root(LARGE[: before + after])
    assert first.size == before


@pytest.mark.parametrize(
    ("size", "hashes", "message"),
    [
        (-1, [], r"^compact range size must be >= 0, got -1$"),
        (
            3,
            [LARGE[0]],
            r"^compact range of size 3 needs 2 hashes \(one per set bit\), got 1$",
        ),
        (
            0,
            [LARGE[0]],
            r"^compact range of size 0 needs 0 hashes \(one per set bit\), got 1$",
        ),
        (
            2,
            [b"x" * 31],
            r"^compact range hash 0 must be 32 bytes, got 31 bytes$",
        ),
    ],
    ids=["negative_size", "too_few_hashes", "too_many_hashes", "short_hash"],
)
def test_compact_range_from_bad_state_raises(size, hashes, message):
    with pytest.raises(ValueError, match=message):
        CompactRange.from_state(size, hashes)


def test_compact_range_refuses_a_short_leaf_and_stays_unchanged():
    compact = CompactRange()
    compact.append(LARGE[0])

    with pytest.raises(ValueError, match=r"^leaf hash must be 32 bytes, got 3 bytes$"):
        compact.append(b"abc")

    assert compact.state() == (1, (LARGE[0],))
