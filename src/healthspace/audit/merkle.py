"""RFC 6962 Merkle tree hashing: roots, inclusion and consistency proofs, and an append-only frontier.

Pure functions over SHA-256 leaf hashes (leaf = SHA-256(0x00 || data), node = SHA-256(0x01 || left ||
right)). Proof generation takes a `RangeHasher`, a function giving MTH(D[start:end]) for a leaf range,
so the same code serves a list held in memory and a log whose subtree hashes live in a cache and a
database. Verification follows RFC 9162 section 2.1.3.2 and 2.1.4.2 step by step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "RangeHasher",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "list_range_hasher",
    "node_hash",
    "root_from_inclusion",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256
_LEAF = b"\x00"
_NODE = b"\x01"
_BLOCK_LEVEL = 8
_BLOCK = 1 << _BLOCK_LEVEL

RangeHasher = Callable[[int, int], bytes]
"""`hash_range(start, end)` -> MTH of leaves [start, end); called only with 0 <= start < end."""


def leaf_hash(data: bytes) -> bytes:
    return _sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2): where RFC 6962 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the leaves. Pairs level by level, carrying a lone last node up, which builds exactly the
    left-balanced tree of RFC 6962 section 2.1 (its recursive split) with one hash per interior node."""
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    sha = _sha256
    while len(level) > 1:
        paired = [sha(_NODE + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def list_range_hasher(leaf_hashes: Sequence[bytes]) -> RangeHasher:
    """A RangeHasher over leaf hashes held in memory (recomputes; fine for tests and small trees)."""

    def hash_range(start: int, end: int) -> bytes:
        return tree_root(leaf_hashes[start:end])

    return hash_range


def _check_hash(h: bytes, what: str) -> None:
    if len(h) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes, got {len(h)}")


def inclusion_proof(index: int, size: int, hash_range: RangeHasher) -> list[bytes]:
    """The audit path PATH(index, D[0:size]) of RFC 6962 section 2.1.1, from the leaf upwards."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of size {size}")
    path: list[bytes] = []
    start, end, m = 0, size, index
    # Walk down from the root, recording the sibling of each subtree that holds the leaf.
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            path.append(hash_range(start + k, end))
            end = start + k
        else:
            path.append(hash_range(start, start + k))
            start += k
            m -= k
    path.reverse()
    return path


def consistency_proof(first: int, second: int, hash_range: RangeHasher) -> list[bytes]:
    """PROOF(first, D[0:second]) of RFC 6962 section 2.1.2 (0 < first <= second); empty when equal."""
    if not 0 < first <= second:
        raise ValueError(f"consistency needs 0 < first <= second, got first={first}, second={second}")
    proof: list[bytes] = []
    start, end, m, whole = 0, second, first, True
    while m != end - start:
        n = end - start
        k = _split(n)
        if m <= k:
            proof.append(hash_range(start + k, end))
            end = start + k
        else:
            proof.append(hash_range(start, start + k))
            start += k
            m -= k
            whole = False
    if not whole:
        proof.append(hash_range(start, end))
    proof.reverse()
    return proof


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root the audit path leads to, or None when the path cannot belong to a tree of that size."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True when `proof` shows the leaf hash at `index` in the tree of `size` leaves with `root`."""
    if len(leaf) != HASH_SIZE or len(root) != HASH_SIZE:
        return False
    return root_from_inclusion(index, size, leaf, proof) == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True when `proof` shows the tree of `first` leaves is a prefix of the tree of `second` leaves."""
    if not 0 < first <= second or len(first_root) != HASH_SIZE or len(second_root) != HASH_SIZE:
        return False
    if any(len(p) != HASH_SIZE for p in proof):
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if not path:
        return False
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


class Frontier:
    """The right edge of a growing tree: one root per perfect subtree in the binary form of its size.

    Appending costs O(1) amortised hashes and `root()` O(log n), so a log never rehashes its history.
    When `keep_from_level` is set, every perfect subtree completed at that level or above is kept in
    `nodes[(level, index)]`; with those, any range hash needs at most 2**keep_from_level leaves from
    storage (the log serves proofs that way).
    """

    __slots__ = ("_keep", "_stack", "nodes", "size")

    def __init__(self, keep_from_level: int | None = None) -> None:
        self.size = 0
        self._stack: list[bytes] = []
        self._keep = keep_from_level
        self.nodes: dict[tuple[int, int], bytes] = {}

    def append(self, leaf: bytes) -> None:
        self._push(leaf, 0)

    def _push(self, node: bytes, level: int) -> None:
        """Add a perfect subtree of 2**level leaves; the size must be a multiple of 2**level."""
        stack, keep, sha = self._stack, self._keep, _sha256
        added = 1 << level
        n = self.size >> level  # index of the new node within its level
        if keep is not None and level >= keep:
            self.nodes[(level, n)] = node
        while n & 1:
            node = sha(_NODE + stack.pop() + node).digest()
            n >>= 1
            level += 1
            if keep is not None and level >= keep:
                self.nodes[(level, n)] = node
        stack.append(node)
        self.size += added

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append many leaf hashes; aligned blocks are hashed level by level, which is much faster in
        Python than one push per leaf."""
        i, total, sha, keep = 0, len(leaves), _sha256, self._keep
        while i < total:
            if self.size & (_BLOCK - 1) or total - i < _BLOCK:
                self._push(leaves[i], 0)
                i += 1
                continue
            level = list(leaves[i : i + _BLOCK])
            for lvl in range(1, _BLOCK_LEVEL):
                level = [sha(_NODE + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=True)]
                if keep is not None and lvl >= keep:
                    base = self.size >> lvl
                    for j, h in enumerate(level):
                        self.nodes[(lvl, base + j)] = h
            self._push(node_hash(level[0], level[1]), _BLOCK_LEVEL)
            i += _BLOCK

    def root(self) -> bytes:
        """MTH of all leaves appended so far."""
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        r = stack[-1]
        for left in reversed(stack[:-1]):
            r = node_hash(left, r)
        return r
