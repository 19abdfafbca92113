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
def index_arrays(draw):
    bits = draw(st.integers(1, 8))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    return bits, np.array(values, dtype=np.uint8)


@settings(max_examples=300, deadline=None)
@given(index_arrays())
def test_pack_matches_spec_and_round_trips(case):
    bits, indices = case
    packed = bitpack.pack(indices, bits)
    assert len(packed) == bitpack.packed_size(indices.size, bits)
    assert packed == reference_pack(indices, bits)
    assert np.array_equal(bitpack.unpack(packed, indices.size, bits), indices)


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_on_a_large_array(bits):
    indices = np.random.default_rng(bits).integers(0, 1 << bits, size=100_003).astype(np.uint8)
    assert np.array_equal(bitpack.unpack(bitpack.pack(indices, bits), indices.size, bits), indices)


def test_known_bytes():
    # indices 1, 2, 3 at 2 bits: 0b01 | 0b10 << 2 | 0b11 << 4 = 0b111001
    assert bitpack.pack(np.array([1, 2, 3], np.uint8), 2) == bytes([0b111001])


def test_wrong_length_and_dirty_tail_are_rejected():
    with pytest.raises(ValueError, match="expected"):
        bitpack.unpack(b"\x00\x00", 3, 2)
    with pytest.raises(ValueError, match="unused bits"):
        bitpack.unpack(bytes([0b11000000]), 3, 2)
