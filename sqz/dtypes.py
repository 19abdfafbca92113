"""Element types as little-endian bytes, in numpy only (numpy has no bfloat16, so BF16 is done by hand).

torch appears only at the edges (adapter.py reading a state dict, loader.py handing tensors back); in between a tensor
is (dtype name, shape, raw bytes).
"""
from __future__ import annotations

import numpy as np

from .constants import DTYPE_ITEMSIZE, MAX_BITS

_FLOAT_VIEWS = {"F64": ("<f8", "<u8"), "F32": ("<f4", "<u4"), "F16": ("<f2", "<u2")}


def itemsize(dtype: str) -> int:
    return DTYPE_ITEMSIZE[dtype]


def index_dtype(codebook_size: int) -> type[np.unsignedinteger]:
    """What a tensor's indices are held in: uint8 for a codebook of up to 256 entries, uint16 above (format 2.3)."""
    return np.uint8 if codebook_size <= 1 << MAX_BITS else np.uint16


def to_float64(raw: bytes | memoryview | np.ndarray, dtype: str) -> np.ndarray:
    """Values of a raw float tensor as float64 (what kmeans1d works in)."""
    values = to_narrowest(raw, dtype)
    if dtype == "F16":  # exact either way; numpy widens float16 to float32 twice as fast as to float64
        values = values.astype(np.float32)
    return values.astype(np.float64)


def to_narrowest(raw: bytes | memoryview | np.ndarray, dtype: str) -> np.ndarray:
    """Values of a raw float tensor in the narrowest numpy float that holds them exactly: float16 for F16 (a
    view of the bytes), float32 for F32 and BF16, float64 for F64. Widening 28M float16 values to float64 takes
    ~0.15 s, which a quantizer that works on the bit patterns need not spend."""
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, dtype=_FLOAT_VIEWS[dtype][0])


def float32_to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype`, as unsigned integers holding its bit pattern.

    BF16 uses round-to-nearest-even on the float32 bit pattern, as torch does (values are finite).
    """
    v = np.asarray(values, dtype=np.float32)
    if dtype == "BF16":
        u = v.view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return rounded.astype("<u2")
    float_t, uint_t = _FLOAT_VIEWS[dtype]
    with np.errstate(over="ignore"):  # a value beyond float16 becomes inf, which finite_bits reports
        return v.astype(float_t).view(uint_t)


def bits_to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The values of `dtype` bit patterns (F32, F16 or BF16) as float32, exactly: float32_to_bits' inverse."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(_FLOAT_VIEWS[dtype][0]).astype(np.float32)


_EXPONENT_MASKS = {"F64": 0x7FF0_0000_0000_0000, "F32": 0x7F80_0000, "F16": 0x7C00, "BF16": 0x7F80}


def finite_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Which bit patterns of a float `dtype` are finite numbers (an all-ones exponent is inf or NaN)."""
    mask = _EXPONENT_MASKS[dtype]
    return (bits & bits.dtype.type(mask)) != mask
