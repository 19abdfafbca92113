import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqz import bitpack


def reference_pack(indices: np.ndarray, bits: int) -> bytes:
    """The spec's definition: each index's low b bits, LSB first, as numpy.packbits(bitorder='little')."""
    planes = np.unpackbits(indices.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


@st.composite
def packed_cases(draw):
    """Indices at b bits (some possibly >= the codebook size k) and a k-entry table of 16-bit words."""
    bits = draw(st.integers(1, 8))
    k = draw(st.integers(1, 1 << bits))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    table = draw(st.lists(st.integers(0, 0xFFFF), min_size=k, max_size=k))
    return bits, np.array(values, dtype=np.uint8), np.array(table, dtype=np.uint16)


@settings(max_examples=400, deadline=None)
@given(packed_cases())
def test_pack_matches_spec_and_lookup_inverts_it(case):
    bits, indices, table = case
    packed = bitpack.pack(indices, bits)
    assert len(packed) == bitpack.packed_size(indices.size, bits)
    assert packed == reference_pack(indices, bits)
    if indices.size and indices.max() >= table.size:
        with pytest.raises(ValueError, match="outside"):
            bitpack.lookup(packed, indices.size, bits, table)
    else:
        assert np.array_equal(bitpack.lookup(packed, indices.size, bits, table), table[indices])


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_across_chunk_boundaries(bits):
    """Large enough that every width takes several chunks; a bad index in the last chunk is still found."""
    rng = np.random.default_rng(bits)
    k = max(1, (1 << bits) - 1)  # not a power of two (except at 1 bit): the per-lane check
    indices = rng.integers(0, k, size=600_011).astype(np.uint8)
    table = rng.standard_normal(k).astype(np.float32)
    packed = bitpack.pack(indices, bits)
    assert np.array_equal(bitpack.lookup(packed, indices.size, bits, table), table[indices])
    assert np.array_equal(bitpack.lookup(packed, indices.size, bits, np.arange(k, dtype=np.uint8)), indices)
    if k < 1 << bits:
        indices[-5] = k
        with pytest.raises(ValueError, match="outside"):
            bitpack.lookup(bitpack.pack(indices, bits), indices.size, bits, table)


def test_power_of_two_limit_below_the_width():
    """k = 4 at 3 bits: any index with its top bit set is caught, wherever it is."""
    indices = np.zeros(100_000, np.uint8)
    indices[77_777] = 4
    with pytest.raises(ValueError, match="outside the 4-entry"):
        bitpack.lookup(bitpack.pack(indices, 3), indices.size, 3, np.arange(4, dtype=np.uint8))


def test_known_bytes():
    # indices 1, 2, 3 at 2 bits: 0b01 | 0b10 << 2 | 0b11 << 4 = 0b111001
    assert bitpack.pack(np.array([1, 2, 3], np.uint8), 2) == bytes([0b111001])


def test_aligned_width_is_the_next_power_of_two():
    assert [bitpack.aligned_width(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_wrong_length_and_dirty_tail_are_rejected():
    table = np.arange(4, dtype=np.uint8)
    with pytest.raises(ValueError, match="expected"):
        bitpack.lookup(b"\x00\x00", 3, 2, table)
    with pytest.raises(ValueError, match="unused bits"):
        bitpack.lookup(bytes([0b11000000]), 3, 2, table)
