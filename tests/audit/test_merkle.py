"""RFC 6962 tree hashing against the published Certificate Transparency vectors and a second computation."""

from __future__ import annotations

import base64
import random

import pytest

from healthspace.audit import merkle

# The reference leaf inputs of the CT test suites and the MTH of the first n of them (n = 0..8).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (index, size) -> audit path, 0-based indexes.
CT_INCLUSION = {
    (0, 1): [],
    (0, 2): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    (1, 2): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
# Golden roots of the transparency-dev compact range tests: leaf i's data is i as 2 bytes little-endian.
GOLDEN_ROOTS = {
    10: "VjWMPSYNtCuCNlF/RLnQy6HcwSk6CIipfxm+hettA+4=",
    15: "j4SulYmocFuxdeyp12xXCIgK6PekBcxzAIj4zbQzNEI=",
    16: "c+4Uc6BCMOZf/v3NZK1kqTUJe+bBoFtOhP+P3SayKRE=",
    100: "dUh9hYH88p0CMoHkdr1wC2szbhcLAXOejWpINIooKUY=",
    255: "SmdsuKUqiod3RX2jyF2M6JnbdE4QuTwwipfAowI4/i0=",
    256: "qFI0t/tZ1MdOYgyPpPzHFiZVw86koScXy9q3FU5casA=",
    1000: "RXrgb8xHd55Y48FbfotJwCbV82Kx22LZfEbmBGAvwlQ=",
    4095: "cWRFdQhPcjn9WyBXE/r1f04ejxIm5lvg40DEpRBVS0w=",
    4096: "6uU/phfHg1n/GksYT6TO9aN8EauMCCJRl3dIK0HDs2M=",
    10000: "VZcav65F9haHVRk3wre2axFoBXRNeUh/1d9d5FQfxIg=",
    65535: "iPuVYJhP6SEE4gUFp8qbafd2rYv9YTCDYqAxCj8HdLM=",
}
CT_HASHES = [merkle.leaf_hash(x) for x in CT_LEAVES]
GOLDEN_LEAVES = [merkle.leaf_hash(bytes([i & 0xFF, (i >> 8) & 0xFF])) for i in range(65535)]


def _reference_root(leaves: list[bytes]) -> bytes:
    """MTH by the recursive definition of RFC 6962 section 2.1, the independent second computation."""
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_reference_root(leaves[:k]), _reference_root(leaves[k:]))


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 0x08]) + h[1:]


def test_leaf_and_node_hashes_match_the_rfc6962_hasher_vectors() -> None:
    assert merkle.leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert (
        merkle.leaf_hash(b"L123456").hex()
        == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    )
    assert merkle.node_hash(b"N123", b"N456").hex() == (
        "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    )


@pytest.mark.parametrize("n", range(9))
def test_tree_root_matches_the_ct_reference_roots(n: int) -> None:
    assert merkle.tree_root(CT_HASHES[:n]).hex() == CT_ROOTS[n]


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_inclusion_proof_matches_the_ct_reference_paths(index: int, size: int) -> None:
    path = merkle.inclusion_proof(index, size, merkle.list_range_hasher(CT_HASHES[:size]))
    assert [p.hex() for p in path] == CT_INCLUSION[(index, size)]
    root = bytes.fromhex(CT_ROOTS[size])
    assert merkle.verify_inclusion(CT_HASHES[index], index, size, path, root)


@pytest.mark.parametrize(("first", "second"), sorted(CT_CONSISTENCY))
def test_consistency_proof_matches_the_ct_reference_proofs(first: int, second: int) -> None:
    proof = merkle.consistency_proof(first, second, merkle.list_range_hasher(CT_HASHES[:second]))
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(first, second)]
    assert merkle.verify_consistency(
        first, second, bytes.fromhex(CT_ROOTS[first]), bytes.fromhex(CT_ROOTS[second]), proof
    )


@pytest.mark.parametrize("size", sorted(GOLDEN_ROOTS))
def test_frontier_bulk_extend_reproduces_the_golden_compact_range_roots(size: int) -> None:
    frontier = merkle.Frontier(keep_from_level=8)
    frontier.extend(GOLDEN_LEAVES[:size])
    assert frontier.root() == base64.b64decode(GOLDEN_ROOTS[size])


def test_frontier_root_after_every_append_equals_the_recursive_definition() -> None:
    frontier = merkle.Frontier()
    for n, leaf in enumerate(GOLDEN_LEAVES[:300], start=1):
        frontier.append(leaf)
        assert frontier.root() == _reference_root(GOLDEN_LEAVES[:n]), n


def test_frontier_mixed_appends_and_extends_give_the_tree_root() -> None:
    rng = random.Random(7)
    frontier = merkle.Frontier(keep_from_level=8)
    done = 0
    while done < 5000:
        step = rng.choice([1, 3, 255, 256, 700])
        frontier.extend(GOLDEN_LEAVES[done : done + step])
        done += step
    assert frontier.root() == merkle.tree_root(GOLDEN_LEAVES[:done])


def test_frontier_keeps_every_complete_subtree_from_its_level_up() -> None:
    frontier = merkle.Frontier(keep_from_level=8)
    frontier.extend(GOLDEN_LEAVES[:3000])
    expected = {(lvl, i) for lvl in range(8, 12) for i in range(3000 >> lvl)}
    assert set(frontier.nodes) == expected
    for (lvl, i), h in frontier.nodes.items():
        assert h == merkle.tree_root(GOLDEN_LEAVES[i << lvl : (i + 1) << lvl])


def test_every_inclusion_proof_verifies_and_a_flipped_bit_fails() -> None:
    rng = random.Random(1)
    for size in [1, 2, 3, 7, 8, 9, 31, 33, 100, *rng.sample(range(2, 600), 6)]:
        leaves = GOLDEN_LEAVES[:size]
        root = merkle.tree_root(leaves)
        hasher = merkle.list_range_hasher(leaves)
        for index in range(size):
            path = merkle.inclusion_proof(index, size, hasher)
            assert merkle.verify_inclusion(leaves[index], index, size, path, root)
            assert not merkle.verify_inclusion(_flip(leaves[index]), index, size, path, root)
            assert not merkle.verify_inclusion(leaves[index], index, size, path, _flip(root))
            if path:
                k = rng.randrange(len(path))
                bad = [*path[:k], _flip(path[k]), *path[k + 1 :]]
                assert not merkle.verify_inclusion(leaves[index], index, size, bad, root)
                assert not merkle.verify_inclusion(leaves[index], index, size, path[:-1], root)
            assert not merkle.verify_inclusion(leaves[index], index, size, [*path, root], root)
            if size > 1:
                assert not merkle.verify_inclusion(leaves[index], (index + 1) % size, size, path, root)


def test_every_consistency_proof_verifies_and_a_flipped_bit_fails() -> None:
    rng = random.Random(2)
    for second in [1, 2, 3, 5, 8, 13, 64, 100, *rng.sample(range(2, 700), 5)]:
        leaves = GOLDEN_LEAVES[:second]
        hasher = merkle.list_range_hasher(leaves)
        second_root = merkle.tree_root(leaves)
        for first in range(1, second + 1):
            first_root = merkle.tree_root(leaves[:first])
            proof = merkle.consistency_proof(first, second, hasher)
            assert merkle.verify_consistency(first, second, first_root, second_root, proof)
            assert not merkle.verify_consistency(first, second, _flip(first_root), second_root, proof)
            assert not merkle.verify_consistency(first, second, first_root, _flip(second_root), proof)
            if proof:
                k = rng.randrange(len(proof))
                bad = [*proof[:k], _flip(proof[k]), *proof[k + 1 :]]
                assert not merkle.verify_consistency(first, second, first_root, second_root, bad)
            assert not merkle.verify_consistency(first, second, first_root, second_root, [*proof, first_root])


def test_proofs_refuse_indexes_outside_the_tree() -> None:
    hasher = merkle.list_range_hasher(CT_HASHES)
    with pytest.raises(ValueError, match="outside"):
        merkle.inclusion_proof(8, 8, hasher)
    with pytest.raises(ValueError, match="first <= second"):
        merkle.consistency_proof(0, 8, hasher)
    assert not merkle.verify_inclusion(CT_HASHES[0], 0, 0, [], merkle.EMPTY_ROOT)
