"""The entropy stage (spec: "Entropy stages"): lossless coding of indices or raw bytes.

- none: the b-bit packed indices (or the raw bytes) as they are.
- zstd: one zstd frame over the packed indices (or raw bytes), content size in the frame header.
- rans: the tensor's own frequency table (k little-endian u32 counts) followed by a rANS stream
  (constriction's AnsCoder, little-endian u32 words) under the categorical model of those counts.

The probability model (counts -> Categorical) is built by one function used by both directions,
so encoder and decoder can never disagree on it.
"""
from __future__ import annotations

import constriction
import numpy as np
import zstandard

from . import bitpack
from .constants import ENTROPY_NONE, ENTROPY_RANS, ENTROPY_ZSTD
from .errors import FormatError, LimitError

ZSTD_LEVEL = 3
"""Level for index streams and raw tensors: on packed indices level 19 gains under 1% at 30x the time."""
ZSTD_HEADER_LEVEL = 19
RANS_CHUNK = 1 << 20


def _rans_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    """Categorical model of the index counts; constriction gives unseen symbols a minimal mass."""
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(payload: bytes | memoryview, size: int, exact: bool = True) -> bytes:
    """Decompress one frame of exactly `size` bytes (at most `size` if not exact).

    The frame's declared content size is checked before decompressing: python-zstandard would
    otherwise allocate whatever the frame declares, whatever max_output_size says.
    """
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN or declared > size or (exact and declared != size):
        raise LimitError(f"zstd frame declares {declared} bytes, expected {'' if exact else 'at most '}{size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd stream: {exc}") from None
    if len(out) != declared:
        raise FormatError(f"zstd stream gave {len(out)} bytes, its frame declares {declared}")
    return out


def encode_indices(indices: np.ndarray, bits: int, codebook_size: int, stage: str) -> bytes:
    """Entropy-code uint8 indices (< codebook_size <= 2**bits) with one stage."""
    if codebook_size == 1:
        return b""  # every index is 0: the codebook alone says it all
    if stage == ENTROPY_NONE:
        return bitpack.pack(indices, bits)
    if stage == ENTROPY_ZSTD:
        return zstd_compress(bitpack.pack(indices, bits))
    if stage == ENTROPY_RANS:
        counts = np.bincount(indices, minlength=codebook_size).astype("<u4")
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(indices.astype(np.int32), _rans_model(counts))
        return counts.tobytes() + coder.get_compressed().astype("<u4").tobytes()
    raise ValueError(f"unknown entropy stage {stage!r}")


def decode_indices(payload: memoryview, count: int, bits: int, codebook_size: int, stage: str) -> np.ndarray:
    """Inverse of encode_indices; raises FormatError on any inconsistency, never returns garbage silently."""
    if codebook_size == 1:
        if len(payload):
            raise FormatError("a one-entry codebook must have an empty payload")
        return np.zeros(count, dtype=np.uint8)
    if stage in (ENTROPY_NONE, ENTROPY_ZSTD):
        packed = payload if stage == ENTROPY_NONE else zstd_decompress(payload, bitpack.packed_size(count, bits))
        try:
            indices = bitpack.unpack(packed, count, bits)
        except ValueError as exc:
            raise FormatError(f"packed indices: {exc}") from None
    elif stage == ENTROPY_RANS:
        indices = _decode_rans(payload, count, codebook_size)
    else:
        raise FormatError(f"unknown entropy stage {stage!r}")
    if count and int(indices.max()) >= codebook_size:
        raise FormatError(f"index {int(indices.max())} is outside the {codebook_size}-entry codebook")
    return indices


def _decode_rans(payload: memoryview, count: int, codebook_size: int) -> np.ndarray:
    table_bytes = 4 * codebook_size
    if len(payload) < table_bytes or (len(payload) - table_bytes) % 4:
        raise FormatError("rANS payload is not a frequency table followed by whole 32-bit words")
    counts = np.frombuffer(payload[:table_bytes], dtype="<u4")
    if int(counts.sum(dtype=np.uint64)) != count:
        raise FormatError(f"rANS frequency table sums to {int(counts.sum(dtype=np.uint64))}, expected {count}")
    words = np.frombuffer(payload[table_bytes:], dtype="<u4").astype(np.uint32)
    model = _rans_model(counts)
    indices = np.empty(count, dtype=np.uint8)
    try:  # in chunks: constriction returns int32, and a whole tensor's worth would be 4 bytes per element
        coder = constriction.stream.stack.AnsCoder(words)
        for start in range(0, count, RANS_CHUNK):
            stop = min(count, start + RANS_CHUNK)
            indices[start:stop] = coder.decode(model, stop - start)
    except Exception as exc:  # constriction raises plain Python errors on malformed streams
        raise FormatError(f"bad rANS stream: {exc}") from None
    if not coder.is_empty():
        raise FormatError("rANS stream has data left after the last symbol")
    return indices


def encode_bytes(raw: bytes, stage: str) -> bytes:
    """Lossless stage over a raw little-endian tensor."""
    if stage == ENTROPY_NONE:
        return raw
    if stage == ENTROPY_ZSTD:
        return zstd_compress(raw)
    raise ValueError(f"stage {stage!r} does not apply to raw tensors")


def decode_bytes(payload: memoryview, size: int, stage: str) -> bytes | memoryview:
    if stage == ENTROPY_NONE:
        if len(payload) != size:
            raise FormatError(f"raw tensor is {len(payload)} bytes, expected {size}")
        return payload
    if stage == ENTROPY_ZSTD:
        return zstd_decompress(payload, size)
    raise FormatError(f"entropy stage {stage!r} does not apply to raw tensors")
