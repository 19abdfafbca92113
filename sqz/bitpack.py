"""Fixed-width bit packing of codebook indices (spec: "Bit packing").

Index i occupies bits [i*b, i*b + b) of a little-endian bit stream: stream bit j is bit (j % 8)
of byte j // 8, and bit t of the index is stream bit i*b + t. Every 8 indices fill exactly b
bytes, so `pack` works on (groups, b) byte matrices with 8 vectorised shift/mask steps and no
per-bit temporaries.

A decoder never needs the indices themselves: `lookup` and `lookup_many` map the stream straight to
output elements. The C extension sqz._lookup (built at install where a C compiler is at hand) runs a
whole batch of tensors on every core in one call. Without it, numpy reads the stream as codes of a few
whole indices (a byte at the aligned widths 1, 2, 4, 8, where every byte holds 8/b indices; 10 to 14
bits otherwise) and maps each code to its output elements through a table of all codes, about 3x slower.
"""
from __future__ import annotations

import numpy as np

from .constants import MAX_BITS, MIN_BITS

try:
    from ._lookup import HAS_ZSTD as NATIVE_ZSTD
    from ._lookup import lookup_many as native_lookup
except ImportError:  # installed without a C compiler: the numpy path below gives the same values
    native_lookup, NATIVE_ZSTD = None, False

ALIGNED_WIDTHS = (1, 2, 4, 8)
LOOKUP_CHUNK = 1 << 16
"""Bytes gathered per step: the intp index copy numpy's take needs stays in cache instead of costing 8x the stream."""


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` indices of `bits` bits occupy (last byte zero-padded)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")


def aligned_width(bits: int) -> int:
    """The smallest lane width w in (1, 2, 4, 8) with w >= bits: whole indices per byte."""
    _check_bits(bits)
    return next(w for w in ALIGNED_WIDTHS if w >= bits)


def pack(indices: np.ndarray, bits: int) -> bytes:
    """Pack uint8 indices (each < 2**bits) into a b-bit little-endian stream."""
    _check_bits(bits)
    idx = np.ascontiguousarray(indices, dtype=np.uint8).ravel()
    count = idx.size
    if bits in ALIGNED_WIDTHS:
        return _pack_aligned(idx, bits)
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


def _pack_aligned(idx: np.ndarray, width: int) -> bytes:
    lanes = 8 // width
    padded = np.zeros(-(-idx.size // lanes) * lanes, dtype=np.uint8)
    padded[: idx.size] = idx
    grid = padded.reshape(-1, lanes)
    out = grid[:, 0].copy()
    for j in range(1, lanes):
        out |= grid[:, j] << (j * width)
    return out.tobytes()


CODE_BITS = {1: 8, 2: 8, 3: 12, 4: 8, 5: 10, 6: 12, 7: 14, 8: 8}
"""numpy path: bits decoded per table lookup, a whole number of indices, at most 14 so a code table stays small."""
GROUP_BYTES = {10: 5, 12: 3, 14: 7}
"""numpy path: unaligned codes come in groups of whole bytes: 4 ten-bit, 2 twelve-bit or 4 fourteen-bit codes."""

WIDE = 16
"""The width of a stream of little-endian uint16 indices: what a rANS payload of a codebook of more than 256 entries
(format 2.3) decodes to. No stage stores indices this way; a decoder holds them so in memory."""

FRAME_PACKED, FRAME_ZSTD, FRAME_RANS = 0, 1, 2
"""What a lookup job's stream is: the packed indices; a zstd frame of them, which the C extension decompresses
itself (NATIVE_ZSTD); or a rANS stream (entropy.rans_frame), which it decodes itself."""
LookupJob = tuple
"""(stream, count, bits, table, out, frame): out[i] = table[index i of the b-bit stream]. A FRAME_RANS job has
b = 8 (a table of up to 256 entries) or WIDE (up to 4,096) and one more item, the model's counts (uint64, one per
table entry); a rans-grouped one (None, params, axis[, 0]) instead, a rans-trellis one (None, params, axis, 1). A
FRAME_PACKED job at WIDE (uint16 indices) is for the numpy path only (`lookup` takes it there)."""


def check_stream(data: bytes | memoryview | np.ndarray, count: int, bits: int) -> np.ndarray:
    """The stream as uint8 (at WIDE: as uint16); ValueError unless it has exactly packed_size bytes and zero padding
    bits."""
    if bits == WIDE:
        wide = np.frombuffer(data, dtype="<u2") if not isinstance(data, np.ndarray) else data.view("<u2")
        if wide.size != count:
            raise ValueError(f"index stream has {wide.size} indices, expected {count}")
        return wide
    _check_bits(bits)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size != packed_size(count, bits):
        raise ValueError(f"packed stream has {buf.size} bytes, expected {packed_size(count, bits)}")
    spare = (-count * bits) % 8
    if spare and buf[-1] >> (8 - spare):
        raise ValueError("unused bits of the last byte are not zero")
    return buf


def lookup(data: bytes | memoryview | np.ndarray, count: int, bits: int, table: np.ndarray) -> np.ndarray:
    """table[index] for each of the `count` indices of a b-bit stream (the inverse of `pack` composed with a gather).

    Raises ValueError unless the stream has exactly packed_size bytes, zero padding bits and every
    index < table.size.
    """
    buf = check_stream(data, count, bits)
    if bits == WIDE:
        return _lookup_wide(buf, table)
    out = np.empty(count, dtype=table.dtype)
    if lookup_many([(buf, count, bits, table, out, FRAME_PACKED)]):
        raise ValueError(f"an index is outside the {table.size}-entry codebook")
    return out


def lookup_many(jobs: list[LookupJob], threads: int = 1) -> list[tuple[int, str]]:
    """Run many lookups at once; returns (job, problem) for each that failed, the problem being 'index'
    (one outside the table) or, for framed jobs, 'frame', 'size', 'padding', 'rans', 'rans-left' or 'memory'
    (see _lookup.c).

    Unframed streams must have passed check_stream. The C extension runs all the jobs on `threads`
    threads with one GIL hand-off; numpy runs them one by one, and takes no framed jobs.
    """
    if native_lookup is not None:
        return native_lookup([(job[0], job[1], job[2], np.ascontiguousarray(job[3]), *job[4:]) for job in jobs],
                             threads)
    problems = []
    for n, (buf, count, bits, table, out, frame, *_) in enumerate(jobs):
        if frame != FRAME_PACKED:
            raise ValueError("framed jobs need the C extension (zstd frames: with libzstd, NATIVE_ZSTD)")
        try:
            out[:] = _lookup_wide(buf, table) if bits == WIDE else _lookup_numpy(buf, count, bits, table)
        except ValueError:
            problems.append((n, "index"))
    return problems


def _lookup_wide(indices: np.ndarray, table: np.ndarray) -> np.ndarray:
    """table[indices] of uint16 indices (WIDE); ValueError if one is outside the table."""
    if indices.size and int(indices.max()) >= table.size:
        raise ValueError(f"an index is outside the {table.size}-entry codebook")
    return np.take(table, indices)


def _lookup_numpy(buf: np.ndarray, count: int, bits: int, table: np.ndarray) -> np.ndarray:
    """A table of the 2^code_bits codes (CODE_BITS) turns the gather into one numpy take per code, with no
    index array in between; the stream goes through in cache-sized chunks because take wants intp indices."""
    code_bits = CODE_BITS[bits]
    lanes = code_bits // bits
    codes = _code_table(table, bits, lanes)
    if code_bits == 8:
        out = np.empty((buf.size, lanes), dtype=table.dtype)
        for start in range(0, buf.size, LOOKUP_CHUNK):
            chunk = buf[start:start + LOOKUP_CHUNK]
            _check_lanes(chunk, bits, lanes, table.size)
            np.take(codes, chunk.astype(np.intp), axis=0, out=out[start:start + chunk.size])
        return out.reshape(-1)[:count]
    group = GROUP_BYTES[code_bits]
    per_group = 8 * group // code_bits
    groups = -(-buf.size // group)
    padded = np.zeros(groups * group + 8, dtype=np.uint8)  # 8 spare bytes: the last group reads a whole word
    padded[: buf.size] = buf
    # Group g as the little-endian u64 at byte g*group (an overlapping, unaligned strided view: no copy);
    # bits past the group's own are the next group's and are never looked at.
    words = np.ndarray((groups,), dtype="<u8", buffer=padded, strides=(group,))
    out = np.empty((groups * per_group, lanes), dtype=table.dtype)
    mask = np.uint64((1 << code_bits) - 1)
    step = LOOKUP_CHUNK // per_group
    for start in range(0, groups, step):
        part = words[start:start + step]
        _check_lanes(part, bits, 8 * group // bits, table.size)
        index = np.empty((part.size, per_group), dtype=np.intp)
        for j in range(per_group):
            np.bitwise_and(part >> np.uint64(j * code_bits), mask, out=index[:, j], casting="unsafe")
        np.take(codes, index.ravel(), axis=0, out=out[start * per_group:(start + part.size) * per_group])
    return out.reshape(-1)[:count]


def _code_table(table: np.ndarray, bits: int, lanes: int) -> np.ndarray:
    """[2^(lanes*bits), lanes]: row c holds table[lane j of c] in column j (entries past the table read 0).

    Built by broadcasting: lane j of code c is axis lanes-1-j of c viewed as a lanes-dim index.
    """
    size = 1 << bits
    padded = np.zeros(size, dtype=table.dtype)
    padded[: table.size] = table
    out = np.empty((size,) * lanes + (lanes,), dtype=table.dtype)
    for j in range(lanes):
        shape = [1] * lanes
        shape[lanes - 1 - j] = size
        out[..., j] = padded.reshape(shape)
    return out.reshape(size**lanes, lanes)


def _check_lanes(words: np.ndarray, bits: int, lanes: int, limit: int) -> None:
    """Raise ValueError if one of the first `lanes` b-bit lanes of any word is >= limit.

    Lanes never straddle the words given (bytes of aligned streams, whole groups of unaligned ones).
    For a power-of-two limit one AND finds a lane with a high bit set; otherwise each lane is compared.
    """
    if limit >= 1 << bits or words.size == 0:
        return
    word = words.dtype.type
    lane_mask = (1 << bits) - 1
    if limit & (limit - 1) == 0:
        high = sum((lane_mask & ~(limit - 1)) << (j * bits) for j in range(lanes))
        bad = bool(np.bitwise_and(words, word(high)).any())
    else:
        bad = any(int(((words >> word(j * bits)) & word(lane_mask)).max()) >= limit for j in range(lanes))
    if bad:
        raise ValueError(f"an index is outside the {limit}-entry codebook")
