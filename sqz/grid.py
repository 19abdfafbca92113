"""Fixed-point codebooks (spec §4.2, `codebook_dtype` GRID, format 2.2).

A codebook stored as F16 costs 16 bits an entry, most of them spent saying where an entry lies to a precision
nothing needs: decoding rounds it to the tensor's dtype, and the tensor's quantization error is far larger. GRID
stores the entries as integer multiples m_i·2^e of one power of two: e, then m_0, then the k - 1 gaps
m_i - m_(i-1) - 1 Rice-coded (their low p bits packed at p bits each, then their high parts in unary). The writer
picks the 2^e of least added squared error plus bits priced at the tensor's own rate-distortion slope, within a
limit (codec.GRID_LIMIT at -b): a 32-entry codebook of a rank-2 MiniLM factor takes ~27 bytes instead of 64.
Scales of a GRID record are powers of two, stored as their exponents, one signed byte each.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .constants import GRID_MAX_EXPONENT, GRID_MAX_MANTISSA, GRID_MAX_REMAINDER_BITS, GRID_MIN_EXPONENT

try:
    from ._lookup import grid_codebook as native_grid_codebook
except ImportError:  # installed without a C compiler
    native_grid_codebook = None

_REMAINDER_WIDTHS = np.arange(GRID_MAX_REMAINDER_BITS + 1)


def snap(codebook: np.ndarray, exponent: int) -> np.ndarray:
    """The integer mantissas m (int64) of `codebook` on the grid of step 2^exponent (round to nearest even)."""
    return np.rint(np.ldexp(codebook.astype(np.float64), -exponent)).astype(np.int64)


def values(mantissas: np.ndarray, exponent: int | np.ndarray) -> np.ndarray:
    """The entries m·2^e as float32 (exact: |m| < 2^24, and the caller keeps them finite); an exponent per row
    where `exponent` is a column."""
    return np.ldexp(mantissas.astype(np.float64), exponent).astype(np.float32)


SEARCH_BLOCK = 8
"""Exponents tried at once (numpy over a block of candidate grids: a search mostly ends within 6 steps)."""


class Grid(NamedTuple):
    """A codebook snapped to the grid 2^exponent: its mantissas, the bytes encode() makes of them and the squared
    error the snapping adds."""

    exponent: int
    mantissas: np.ndarray
    size: int
    added: float


def choose_exponent(codebook: np.ndarray, counts: np.ndarray, added_error: Callable[[np.ndarray], np.ndarray],
                    allowed: float, limit: float | None = None, bit_cost: float = 0.0) -> Grid | None:
    """The grid that costs least, as the squared error it adds (`added_error` of the snapped float32 entries,
    one candidate codebook a row, one error a row) plus `bit_cost` for every bit of the GRID codebook, among the
    grids that keep the entries distinct and within GRID_MAX_MANTISSA and add at most `limit` (default
    `allowed`). Searched from start_exponent down to the first e within `allowed`, the finest that can pay (finer
    ones only cost bits); so without a `limit`, the coarsest grid within `allowed`. None if no grid fits."""
    c = codebook.astype(np.float64)
    limit = allowed if limit is None else max(limit, allowed)
    best: tuple[float, Grid] | None = None
    top = start_exponent(c, counts, limit)
    for first in range(top, GRID_MIN_EXPONENT - 1, -SEARCH_BLOCK):
        exponents = np.arange(first, max(first - SEARCH_BLOCK, GRID_MIN_EXPONENT - 1), -1)
        scaled = np.rint(np.ldexp(c[None, :], -exponents[:, None]))
        fits = np.abs(scaled).max(axis=1) < GRID_MAX_MANTISSA
        stop = exponents.size if fits.all() else int(np.argmin(fits))  # finer grids only grow the mantissas
        exponents, m = exponents[:stop], scaled[:stop].astype(np.int64)
        distinct = (m[:, 1:] > m[:, :-1]).all(axis=1)
        added = added_error(values(m, exponents[:, None]))
        sizes = _sizes(m)
        for row, (e, ok, a, b) in enumerate(zip(exponents.tolist(), distinct.tolist(), added.tolist(),
                                                sizes.tolist())):
            if not ok or a > limit:
                continue
            cost = a + bit_cost * (8 * b)
            if best is None or cost < best[0]:
                best = (cost, Grid(e, m[row], b, a))
            if a <= allowed:
                return best[1]
        if stop < SEARCH_BLOCK:
            break
    return None if best is None else best[1]


def start_exponent(codebook: np.ndarray, counts: np.ndarray, allowed: float) -> int:
    """Where the search starts: one step coarser than the grid whose rounding error, uniform over a step u, adds
    about `allowed` (counts·u²/12), and no coarser than the smallest gap between entries or the largest entry (a
    coarser grid could only fit an allowance far above the writer's tolerances). Mostly the search ends here or
    one step finer."""
    top = float(np.abs(codebook).max())
    if top == 0.0:
        return 0
    gaps = codebook[1:] - codebook[:-1]
    bound = int(np.floor(np.log2(min(float(gaps.min()), top) if gaps.size else top)))
    total = float(counts.sum())
    if 0 < allowed < math.inf and total > 0:
        bound = min(bound, int(np.floor(np.log2(np.sqrt(12 * allowed / total)))) + 1)
    return min(bound, GRID_MAX_EXPONENT)


def _zigzag(n: int) -> int:
    return 2 * n if n >= 0 else -2 * n - 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _remainder_widths(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of gaps, the Rice parameter p that makes the packed remainders plus the unary quotients fewest
    bytes (the smallest such p), and the sum of the quotients at that p. A p past the largest gap's bit length
    only adds packed bits, so the search stops there."""
    widths = _REMAINDER_WIDTHS[:int(gaps.max(initial=0)).bit_length() + 1]
    quotients = (gaps[:, :, None] >> widths[None, None, :]).sum(axis=1)
    n = gaps.shape[1]
    cost = -(-n * widths[None, :] // 8) + -(-(quotients + n) // 8)
    p = np.argmin(cost, axis=1)
    return p, quotients[np.arange(gaps.shape[0]), p]


_VARINT_STEPS = np.array([1 << 7, 1 << 14, 1 << 21, 1 << 28, 1 << 35])


def _sizes(mantissas: np.ndarray) -> np.ndarray:
    """Bytes of encode(m, e) for each row m of `mantissas` (the exponent does not change it)."""
    gaps = mantissas[:, 1:] - mantissas[:, :-1] - 1
    p, quotients = _remainder_widths(gaps)
    n = gaps.shape[1]
    first = mantissas[:, 0]
    zigzag = np.where(first >= 0, 2 * first, -2 * first - 1)
    head = 3 + np.searchsorted(_VARINT_STEPS, zigzag, side="right")  # e, p and m_0's LEB128 bytes
    return head + -(-n * p // 8) + -(-(quotients + n) // 8)


def size(mantissas: np.ndarray) -> int:
    """Bytes of encode(mantissas, e)."""
    return int(_sizes(mantissas[None, :])[0])


def encode(mantissas: np.ndarray, exponent: int) -> bytes:
    """The GRID codebook bytes: e (i8), p (u8), zigzag varint m_0, the gaps' low p bits packed at p bits each
    (§4.3's bit order), then their high parts as that many zero bits and a one (least significant first)."""
    gaps = mantissas[1:] - mantissas[:-1] - 1
    p = int(_remainder_widths(gaps[None, :])[0][0])
    head = np.int8(exponent).tobytes() + bytes([p]) + _varint(_zigzag(int(mantissas[0])))
    if not gaps.size:
        return head
    low = ((gaps[:, None] >> np.arange(p)[None, :]) & 1).astype(np.uint8)
    quotients = gaps >> p
    unary = np.zeros(int(quotients.sum()) + gaps.size, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1
    return (head + np.packbits(low.ravel(), bitorder="little").tobytes()
            + np.packbits(unary, bitorder="little").tobytes())


def decode(section: memoryview | bytes, k: int) -> tuple[np.ndarray, int]:
    """(the k entries as float32, bytes the codebook took) from the start of a GRID section; ValueError, saying
    what, where the bytes break §4.2 (truncated, a Rice width over the limit, nonzero unused bits, a mantissa
    out of range, an entry not finite in float32). In C where the extension is built (3-4 µs a codebook, as much
    as an F16 codebook's conversion, against ~100 µs of numpy call overheads; a file has one per factor), else
    decode_numpy."""
    if native_grid_codebook is None:
        return decode_numpy(section, k)
    entries, used = native_grid_codebook(section, k)
    return np.frombuffer(entries, dtype=np.float32), used


def decode_numpy(section: memoryview | bytes, k: int) -> tuple[np.ndarray, int]:
    """decode, in numpy: the reference the C reader is tested against."""
    buf = np.frombuffer(section, dtype=np.uint8)
    if buf.size < 3:
        raise ValueError("GRID codebook truncated")
    exponent, p = int(buf[:1].view(np.int8)[0]), int(buf[1])
    if p > GRID_MAX_REMAINDER_BITS:
        raise ValueError(f"GRID Rice width {p} exceeds {GRID_MAX_REMAINDER_BITS}")
    first, at = _read_varint(buf, 2)
    if k == 1:
        mantissas = np.array([first], dtype=np.int64)
    else:
        low_end = at + -(-(k - 1) * p // 8)
        if low_end > buf.size:
            raise ValueError("GRID codebook truncated")
        low_bits = np.unpackbits(buf[at:low_end], bitorder="little")
        if low_bits[(k - 1) * p:].any():
            raise ValueError("GRID codebook: unused bits are not zero")
        low = low_bits[:(k - 1) * p].reshape(k - 1, p).astype(np.int64) @ (np.int64(1) << np.arange(p, dtype=np.int64))
        ones, at = _unary_ends(buf, low_end, k - 1)
        quotients = np.diff(ones, prepend=-1) - 1
        if quotients.max() >= GRID_MAX_MANTISSA:
            raise ValueError("GRID codebook: a mantissa is out of range")
        mantissas = first + np.concatenate(([0], np.cumsum((quotients << p) + low + 1)))
    if np.abs(mantissas).max() >= GRID_MAX_MANTISSA:
        raise ValueError("GRID codebook: a mantissa is out of range")
    with np.errstate(over="ignore"):
        entries = values(mantissas, exponent)
    if not np.isfinite(entries).all():
        raise ValueError("GRID codebook: an entry is not finite as float32")
    return entries, at


def _read_varint(buf: np.ndarray, at: int) -> tuple[int, int]:
    """m_0 and the offset after it: at most 4 bytes (|m_0| < 2^24 needs 25 bits), the last without its high bit."""
    value = 0
    for i in range(4):
        if at + i >= buf.size:
            raise ValueError("GRID codebook truncated")
        byte = int(buf[at + i])
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise ValueError("GRID codebook: m_0 is not in its shortest form")
            return (value >> 1) ^ -(value & 1), at + i + 1
    raise ValueError("GRID codebook: m_0 takes more than 4 bytes")


def _unary_ends(buf: np.ndarray, at: int, count: int) -> tuple[np.ndarray, int]:
    """Bit positions (from `at`) of the first `count` one bits, and the offset after their byte; the rest of that
    byte must be zero. Looks at a window sized for honest codebooks first, then at the whole rest."""
    window = min(buf.size, at + 16 + count // 2)
    for end in (window, buf.size):
        ones = np.flatnonzero(np.unpackbits(buf[at:end], bitorder="little"))
        if ones.size >= count:
            last = int(ones[count - 1])
            stop = at + last // 8 + 1
            if ones.size > count and ones[count] < 8 * (stop - at):
                raise ValueError("GRID codebook: unused bits are not zero")
            return ones[:count], stop
        if end == buf.size:
            break
    raise ValueError("GRID codebook truncated")


def encode_scales(scales: np.ndarray) -> bytes | None:
    """Scales as exponents (i8, scale = 2^s), or None if one is not a power of two in that range."""
    mantissa, exponent = np.frexp(scales.astype(np.float64))
    s = exponent - 1
    if not ((mantissa == 0.5) & (s >= -128) & (s <= 127)).all():
        return None
    return s.astype(np.int8).tobytes()


def decode_scales(section: memoryview | bytes) -> np.ndarray:
    """Exponent bytes as the float32 scales 2^s (every one exact)."""
    return np.ldexp(np.float32(1.0), np.frombuffer(section, dtype=np.int8).astype(np.int32)).astype(np.float32)
