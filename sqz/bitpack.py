"""Fixed-width bit packing of codebook indices (spec: "Bit packing").

Index i occupies bits [i*b, i*b + b) of a little-endian bit stream: stream bit j is bit (j % 8)
of byte j // 8, and bit t of the index is stream bit i*b + t. Every 8 indices fill exactly b
bytes, so both directions work on (groups, b) byte matrices with 8 vectorised shift/mask steps
and no per-bit temporaries.
"""
from __future__ import annotations

import numpy as np

from .constants import MAX_BITS, MIN_BITS


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` indices of `bits` bits occupy (last byte zero-padded)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def pack(indices: np.ndarray, bits: int) -> bytes:
    """Pack uint8 indices (each < 2**bits) into a b-bit little-endian stream."""
    _check_bits(bits)
    idx = np.ascontiguousarray(indices, dtype=np.uint8).ravel()
    count = idx.size
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint16)
    padded[:count] = idx
    values = padded.reshape(groups, 8)
    out = np.zeros((groups, bits + 1), dtype=np.uint16)  # one spare column for carries
    for j in range(8):
        offset = j * bits
        byte, shift = divmod(offset, 8)
        shifted = values[:, j] << shift
        out[:, byte] |= shifted & 0xFF
        out[:, byte + 1] |= shifted >> 8
    return out[:, :bits].astype(np.uint8).tobytes()[: packed_size(count, bits)]


def unpack(data: bytes | memoryview | np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of `pack`: `count` uint8 indices from a b-bit stream of exactly packed_size bytes."""
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != packed_size(count, bits):
        raise ValueError(f"packed stream has {buf.size} bytes, expected {packed_size(count, bits)}")
    spare = (-count * bits) % 8
    if spare and buf[-1] >> (8 - spare):
        raise ValueError("unused bits of the last byte are not zero")
    groups = -(-count // 8)
    grid = np.zeros((groups, bits + 1), dtype=np.uint16)  # spare column: reads past the end are 0
    flat = np.zeros(groups * bits, dtype=np.uint16)
    flat[: buf.size] = buf
    grid[:, :bits] = flat.reshape(groups, bits)
    mask = (1 << bits) - 1
    out = np.empty((groups, 8), dtype=np.uint8)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        word = grid[:, byte] | (grid[:, byte + 1] << 8)
        out[:, j] = (word >> shift) & mask
    return out.reshape(-1)[:count]
