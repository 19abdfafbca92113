"""The entropy stage (spec: "Entropy stages"): lossless coding of indices or raw bytes.

- none: the b-bit packed indices (or the raw bytes) as they are.
- zstd: one zstd frame over the packed indices (or raw bytes), content size in the frame header.
- zstd-aligned (1.1): one zstd frame over the indices packed at the aligned width w = 1, 2, 4, 8
  (every byte holds whole indices). zstd's Huffman literal coder then models the index
  distribution, within about 1% of rANS, and it decodes about 15x faster; the decoder maps
  bytes to values with one table lookup (bitpack.lookup_many).
- rans: the tensor's own frequency table (k little-endian u32 counts) followed by a rANS stream
  (constriction's AnsCoder, little-endian u32 words) under the categorical model of those counts.
- rans-compact (2.1): the same model and stream, the table as one byte w then the first k - 1 counts
  bit-packed at w bits (the last is n minus their sum), and the stream's last word without its zero high
  bytes. A small tensor's table was most of its side information: 4 bytes a level against 2 for its codebook
  entry (a rank-2 MiniLM factor, 768 values at 5 levels: 20 bytes of table, now 6).
- rans-grouped (2.4): one rANS stream over the tensor's rows (or columns), group after group, each group under its own
  discrete Gaussian over the indices, 3 bytes of parameters a group (fit_gauss). In the SVD gauge a factor's
  components (A' rows, B' columns) differ in spread by their singular values, which one table pools; a count table a
  group costs more than it saves, where 3 bytes do not.
- rans-trellis (2.5): indices that trellis-coded quantization (trellis.py) chose on the spec's 8-state trellis, whose
  state allows one class of indices (i mod 2) and moves on by i mod 4; rans-grouped's layout, each index i coded as
  i div 2 under its group's discrete Gaussian restricted to its state's class: a class holds half the levels, and one
  model pooled over both cost 0.25 bits an index at 0.66 bits and 0.05 at 2 (Gaussian values).

The probability model (counts -> Categorical) is built by one function used by both directions here, so
encoder and decoder can never disagree on it. The C extension decodes rANS too (bitpack's FRAME_RANS jobs, 4x
faster): it builds the same model by spec §4.2's formula, and tests hold its output equal to constriction's on
any bytes under any counts.
"""
from __future__ import annotations

import threading

import constriction
import numpy as np
import zstandard

from . import bitpack
from .constants import (
    ENTROPY_NONE,
    ENTROPY_RANS,
    ENTROPY_RANS_COMPACT,
    ENTROPY_RANS_GROUPED,
    ENTROPY_RANS_TRELLIS,
    ENTROPY_ZSTD,
    ENTROPY_ZSTD_ALIGNED,
    GAUSS_RATIO,
    GROUP_AXES,
    MAX_COUNT_WIDTH,
    TRELLIS_CLASS,
    TRELLIS_MIN_ENTRIES,
    TRELLIS_NEXT,
)
from .dtypes import index_dtype
from .errors import FormatError, LimitError

try:
    from ._trellis import encode as native_trellis_encode
except ImportError:  # no C compiler at install: the rate targets do without trellis-coded quantization (trellis.py)
    native_trellis_encode = None

ZSTD_LEVEL = 3
"""Level for index streams and raw tensors: on packed indices level 19 gains under 1% at 30x the time."""
ZSTD_HEADER_LEVEL = 19
ZSTD_ALIGNED_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    1, min_match=7, strategy=zstandard.STRATEGY_FAST, write_content_size=True)
"""Aligned index streams are near-i.i.d. symbols: zstd's gain is its Huffman literal coder, and the
short matches higher levels look for cost more than they save (level 3 is 6% larger at 5 bits)."""
RANS_CHUNK = 1 << 20


def _rans_model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    """Categorical model of the index counts; constriction gives unseen symbols a minimal mass."""
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


_local = threading.local()


def _decompressor(dictionary: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    """One decompression context per thread (and dictionary): making one costs more than decoding a small tensor."""
    contexts = _local.__dict__.setdefault("zstd", {})
    key = id(dictionary)
    if key not in contexts:
        contexts[key] = zstandard.ZstdDecompressor(dict_data=dictionary)
    return contexts[key]


def zstd_compressor(level: int = ZSTD_LEVEL,
                    dictionary: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdCompressor:
    """A compressor whose frames declare their content size (every reader of sqz's frames requires it)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True, dict_data=dictionary)


def zstd_compress(data: bytes, level: int = ZSTD_LEVEL, dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    return zstd_compressor(level, dictionary).compress(data)


def check_frame(payload: bytes | memoryview, size: int, exact: bool = True) -> int:
    """The content size a zstd frame declares; LimitError unless it is `size` (at most `size` if not exact)."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd frame: {exc}") from None
    if declared == zstandard.CONTENTSIZE_UNKNOWN or declared > size or (exact and declared != size):
        raise LimitError(f"zstd frame declares {declared} bytes, expected {'' if exact else 'at most '}{size}")
    return declared


def zstd_decompress(payload: bytes | memoryview, size: int, exact: bool = True,
                    dictionary: zstandard.ZstdCompressionDict | None = None) -> bytes:
    """Decompress one frame of exactly `size` bytes (at most `size` if not exact).

    The frame's declared content size is checked before decompressing: python-zstandard would
    otherwise allocate whatever the frame declares, whatever max_output_size says.
    """
    declared = check_frame(payload, size, exact)
    try:
        out = _decompressor(dictionary).decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"bad zstd stream: {exc}") from None
    if len(out) != declared:
        raise FormatError(f"zstd stream gave {len(out)} bytes, its frame declares {declared}")
    return out


def encode_indices(indices: np.ndarray, bits: int, codebook_size: int, stage: str, row: int = 0) -> bytes:
    """Entropy-code indices (< codebook_size <= 2**bits; uint8, or uint16 above 8 bits) with one stage; `row`:
    indices a row of the tensor (see encode_stages)."""
    return encode_stages(indices, bits, codebook_size, (stage,), row)[stage]


ROW_BLOCK_BYTES = 256
"""zstd stages also try a frame with a block a row where a row's indices take at least this many bytes."""


def encode_stages(indices: np.ndarray, bits: int, codebook_size: int, stages: tuple[str, ...],
                  row: int = 0) -> dict[str, bytes]:
    """The payload of each stage; auto tries them all, and each packed width is packed once. With `row` (indices
    a row of the tensor, 0 for none), a zstd stage's frame is the smaller of one frame as zstd cuts it and one whose
    blocks end at row boundaries (_zstd_rows). rans-grouped needs `row` (the tensor as a matrix of rows that long)."""
    if codebook_size == 1:
        return dict.fromkeys(stages, b"")  # every index is 0: the codebook alone says it all
    packed: dict[int, bytes] = {}

    def packed_at(width: int) -> bytes:
        if width not in packed:
            packed[width] = bitpack.pack(indices, width)
        return packed[width]

    def zstd_frame(compressor: zstandard.ZstdCompressor, width: int) -> bytes:
        data = packed_at(width)
        whole = compressor.compress(data)
        by_rows = _zstd_rows(compressor, data, row * width, indices.size * width) if row else None
        return by_rows if by_rows is not None and len(by_rows) < len(whole) else whole

    def encode(stage: str) -> bytes:
        if stage == ENTROPY_NONE:
            return packed_at(bits)
        if stage == ENTROPY_ZSTD:
            return zstd_frame(zstd_compressor(), bits)
        if stage == ENTROPY_ZSTD_ALIGNED:
            return zstd_frame(zstandard.ZstdCompressor(compression_params=ZSTD_ALIGNED_PARAMS),
                              bitpack.aligned_width(bits))
        if stage in (ENTROPY_RANS, ENTROPY_RANS_COMPACT):
            counts = np.bincount(indices, minlength=codebook_size).astype("<u4")
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(indices.astype(np.int32), _rans_model(counts))
            words = coder.get_compressed().astype("<u4").tobytes()
            if stage == ENTROPY_RANS:
                return counts.tobytes() + words
            return _count_table(counts[:-1]) + words[:len(words) - _zero_top_bytes(words)]
        if stage == ENTROPY_RANS_TRELLIS:
            return rans_trellis_payload(indices, codebook_size, row)
        if stage == ENTROPY_RANS_GROUPED:
            return rans_grouped_payload(indices, codebook_size, row, *grouped_params(indices, codebook_size, row))
        raise ValueError(f"unknown entropy stage {stage!r}")

    return {stage: encode(stage) for stage in stages}


GroupedParams = tuple[int, np.ndarray, np.ndarray]
"""A rans-grouped or rans-trellis payload's axis and its groups' centres and width codes."""


def grouped_params(indices: np.ndarray, k: int, row: int) -> GroupedParams:
    """The axis and the groups' models (fit_gauss) a rans-grouped or rans-trellis payload codes `indices` under."""
    axis = group_axis(indices.size, row)
    centres, widths, _ = fit_gauss(group_counts(indices, k, row, axis))
    return axis, centres, widths


def rans_trellis_payload(indices: np.ndarray, k: int, row: int, params: GroupedParams | None = None) -> bytes:
    """A rans-trellis payload (spec §4.2): rans-grouped's axis and groups' parameters (`params`, else
    grouped_params'), then one rANS stream of the indices (on the trellis: ValueError if not) in group order, each as
    i div 2 under its group's model restricted to its state's class. `row`: the length of the tensor's rows as a
    matrix."""
    if native_trellis_encode is None:
        raise ValueError("rans-trellis needs sqz's C extension sqz._trellis")
    axis, centres, widths = params or grouped_params(indices, k, row)
    stream = np.ascontiguousarray(in_groups(indices, row, axis), dtype=np.uint16).ravel()
    return _grouped_layout(axis, centres, widths, native_trellis_encode(stream, gauss_counts(centres, widths, k),
                                                                         centres.size))


RANS_TRELLIS_TAIL = 3
"""Bytes a rans-trellis payload takes over its parameters and its indices' code length under its models (the stream's
last words): measured +1.4 to +3.8, mean +2.8, over 56 paths of 16-9,600 values at 0.5-7 bits a value."""


def rans_trellis_bytes(indices: np.ndarray, k: int, row: int, params: GroupedParams) -> float:
    """The size of rans_trellis_payload(indices, k, row, params) to within about 1.5 bytes, without coding it: what
    choosing between paths needs (coding each costs about as much as a Viterbi search)."""
    axis, centres, widths = params
    grouped = in_groups(indices, row, axis)
    bits = trellis_bits(gauss_counts(centres, widths, k))[np.arange(grouped.shape[0])[:, None], grouped]
    return 1 + 3 * centres.size + float(bits.sum()) / 8 + RANS_TRELLIS_TAIL


def trellis_bits(counts: np.ndarray) -> np.ndarray:
    """[groups, k] bits of each index under its group's model restricted to its class (spec §4.2 rans-trellis), from
    the groups' model counts [groups, k]."""
    bits = np.empty(counts.shape, dtype=np.float64)
    for c in (0, 1):
        bits[:, c::2] = _model_bits(counts[:, c::2])
    return bits


def _decode_rans_trellis(words: np.ndarray, params: memoryview, k: int, count: int) -> np.ndarray:
    """The `count` indices of a rans-trellis stream, in the stream's (groups') order, walking the trellis from state
    0; the coder must end empty. The reference decoder (one symbol a call: ~1 µs an index), which the C extension's
    is held equal to."""
    centres, widths = _group_params(params)
    length = count // centres.size
    indices = np.empty(count, dtype=index_dtype(k))
    state = 0
    try:
        coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
        for g in range(centres.size):
            model = gauss_counts(centres[g:g + 1], widths[g:g + 1], k)[0]
            classes = [_rans_model(model[c::2]) for c in (0, 1)]
            for t in range(g * length, (g + 1) * length):
                c = TRELLIS_CLASS[state]
                i = 2 * int(coder.decode(classes[c])) + c
                indices[t] = i
                state = TRELLIS_NEXT[state][(i & 3) >> 1]
    except Exception as exc:  # noqa: BLE001 - constriction raises plain Python errors on malformed streams
        raise FormatError(f"bad rANS stream: {exc}") from None
    if not coder.is_empty():
        raise FormatError("rANS stream has data left after the last symbol")
    return indices


def _zstd_rows(compressor: zstandard.ZstdCompressor, data: bytes, row_bits: int, total_bits: int) -> bytes | None:
    """One zstd frame of `data` (content size declared) whose blocks end at row boundaries, a block a row; None
    where rows are shorter than ROW_BLOCK_BYTES (a B factor's rows: r values) or fewer than two. zstd gives each
    block its own literal (Huffman) table, so a factor whose rows differ in spread is coded nearer the sum of its
    rows' entropies than at the entropy of all its indices together: in the SVD gauge the rows of A' are the
    components, σ_i apart (on the trained-statistics LLaMA-shaped adapter at 3 bits/param an A' factor's payload
    came 11-12% smaller). A reader sees an ordinary frame: where its blocks end is the writer's choice."""
    rows = total_bits // row_bits if row_bits else 0
    if row_bits < 8 * ROW_BLOCK_BYTES or rows < 2:
        return None
    writer, start, chunks = compressor.compressobj(size=len(data)), 0, []
    for cut in [(i * row_bits) // 8 for i in range(1, rows)] + [len(data)]:
        chunks += [writer.compress(data[start:cut]), writer.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
        start = cut
    return b"".join(chunks) + writer.flush()


def group_axis(count: int, row: int) -> int:
    """The axis rans-grouped groups along: the one with fewer groups (a LoRA factor's components: A's rows, B's
    columns), rows on a tie. `row`: the matrix's row length (its column count)."""
    return 0 if count // row <= row else 1


def in_groups(indices: np.ndarray, row: int, axis: int) -> np.ndarray:
    """The indices as [groups, group length]: the matrix (axis 0) or its transpose (axis 1), the stream's order."""
    matrix = indices.reshape(-1, row)
    return matrix if axis == 0 else matrix.T


def group_counts(indices: np.ndarray, k: int, row: int, axis: int) -> np.ndarray:
    """[groups, k] counts of each index in each group."""
    grouped = in_groups(indices, row, axis)
    keys = np.arange(grouped.shape[0], dtype=np.int64)[:, None] * k + grouped
    return np.bincount(keys.ravel(), minlength=grouped.shape[0] * k).reshape(grouped.shape[0], k)


def _exp2_table() -> np.ndarray:
    """E[i] = 2^30 * 2^(-i/256), i < 256, by spec §4.2's integer recurrence (so every reader has the same table)."""
    table = [1 << 30]
    for _ in range(255):
        table.append((table[-1] * GAUSS_RATIO + (1 << 29)) >> 30)
    return np.array(table, dtype=np.uint64)


EXP2 = _exp2_table()


def gauss_counts(centres: np.ndarray, widths: np.ndarray, k: int) -> np.ndarray:
    """[groups, k] model counts of spec §4.2's discrete Gaussian of each group: count_j = (E[x mod 256] >> x div 256)
    + 1, x = ((16j - M)^2 * E[32 (S mod 8)]) >> (23 + S div 8), for the group's centre M (sixteenths of an index)
    and width code S (the model is 2^-(λ d^2), d = j - M/16 and λ = 2^(7 - S/8))."""
    centres, widths = centres.astype(np.int64)[:, None], widths.astype(np.int64)[:, None]
    distance = 16 * np.arange(k, dtype=np.int64)[None, :] - centres
    x = (distance * distance).astype(np.uint64) * EXP2[32 * (widths % 8)] >> (23 + widths // 8).astype(np.uint64)
    octaves = x >> np.uint64(8)
    return np.where(octaves < 64, EXP2[x & np.uint64(255)] >> np.minimum(octaves, np.uint64(63)), 0) + np.uint64(1)


def _model_bits(counts: np.ndarray) -> np.ndarray:
    """-log2 of each symbol's probability under the model of each row of counts (spec §4.2's leaky quantization, to
    within the floor that makes it an integer)."""
    k = counts.shape[-1]
    total = counts.sum(axis=-1, keepdims=True).astype(np.float64)
    return 24 - np.log2(counts * ((2 ** 24 - k) / total) + 1)


GAUSS_SEARCH = (2, 1)
"""fit_gauss: width codes tried either side of the moments' value (a step is 2^(1/8) in λ), then centre sixteenths
either side of the mean at the best width. Over the bench's MiniLM r=8 and trained-statistics LLaMA-shaped `--bpp`
files the moments alone code 0.5% longer than this, which is 0.15% longer than (3, 2) and 0.3% than (4, 3); each
step more costs encode time on large adapters (`--bpp 8` of the 28.3M one: 5.7 s here, 6.1 s at (3, 2))."""


def fit_gauss(hist: np.ndarray, search: tuple[int, int] = GAUSS_SEARCH) -> tuple[np.ndarray, np.ndarray, float]:
    """(centres M, width codes S, code bits) of the discrete Gaussians that code each group's counts shortest: from
    the group's mean and variance, the neighbouring width codes, then the neighbouring centres (`search`: how far
    each way; (0, 0) keeps the moments' model)."""
    k = hist.shape[1]
    levels = np.arange(k, dtype=np.float64)
    size = np.maximum(hist.sum(axis=1), 1)
    mean = (hist * levels).sum(axis=1) / size  # not a matrix product: BLAS may sum in another order on more threads
    variance = np.maximum((hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / size, 1e-6)
    centres = np.clip(np.rint(16 * mean), 0, 16 * (k - 1)).astype(np.int64)
    widths = np.clip(np.rint(8 * (7 - np.log2(np.log2(np.e) / (2 * variance)))), 0, 255).astype(np.int64)
    best = np.full(hist.shape[0], np.inf)
    for step, (reach, moving) in enumerate(((search[0], widths), (search[1], centres))):
        start, limit = moving.copy(), 255 if step == 0 else 16 * (k - 1)
        for delta in range(-reach, reach + 1):
            if step == 1 and delta == 0:
                continue  # the width search already coded this one
            tried = np.clip(start + delta, 0, limit)
            c, w = (centres, tried) if step == 0 else (tried, widths)
            bits = (hist * _model_bits(gauss_counts(c, w, k))).sum(axis=1)
            better = bits < best
            best[better], moving[better] = bits[better], tried[better]
    return centres, widths, float(best.sum())


def grouped_floor(hist: np.ndarray) -> float:
    """Fewer bytes than any rans-grouped payload of groups with counts `hist` [groups, k] can take: the axis byte,
    3 bytes a group, and each group's empirical entropy (no model codes a sequence below it), less
    RANS_FLOOR_SLACK. Lets a caller skip fitting the groups' models where another stage is already smaller."""
    size = np.maximum(hist.sum(axis=1, keepdims=True), 1)
    p = hist / size
    bits = float(-(hist * np.log2(np.where(p > 0, p, 1))).sum())
    return grouped_bytes(hist.shape[0], bits) - RANS_FLOOR_SLACK


def grouped_bytes(groups: int, bits: float) -> float:
    """Estimated rans-grouped payload bytes: the axis byte, 3 bytes a group, the code (the stream's last words
    excepted)."""
    return 1 + 3 * groups + bits / 8


GROUP_PARAMS = np.dtype([("centre", "<u2"), ("width", "u1")])
"""rans-grouped: a group's 3 bytes of parameters (spec §4.2), its centre M and width code S."""


def _runs(centres: np.ndarray, widths: np.ndarray) -> list[tuple[int, int]]:
    """(first group, end group) of each run of consecutive groups with the same model."""
    change = (np.diff(centres) != 0) | (np.diff(widths) != 0)
    cuts = np.flatnonzero(change) + 1
    starts, ends = np.concatenate(([0], cuts)), np.concatenate((cuts, [centres.size]))
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def rans_grouped_payload(indices: np.ndarray, k: int, row: int, axis: int, centres: np.ndarray,
                         widths: np.ndarray) -> bytes:
    """A rans-grouped payload (spec §4.2): the axis, each group's centre (u16) and width code (u8), then one rANS
    stream of the groups in order, each under its discrete Gaussian."""
    grouped = in_groups(indices, row, axis)
    coder = constriction.stream.stack.AnsCoder()
    for first, end in reversed(_runs(centres, widths)):  # a stack: the last run first, so that runs decode in order
        model = _rans_model(gauss_counts(centres[first:first + 1], widths[first:first + 1], k)[0])
        coder.encode_reverse(grouped[first:end].ravel().astype(np.int32), model)
    return _grouped_layout(axis, centres, widths, coder.get_compressed().astype("<u4").tobytes())


def _grouped_layout(axis: int, centres: np.ndarray, widths: np.ndarray, words: bytes) -> bytes:
    """rans-grouped's (and rans-trellis's) payload: the axis byte, each group's centre (u16) and width code (u8),
    then the stream's words, the last without its zero high bytes."""
    params = np.empty(centres.size, dtype=GROUP_PARAMS)
    params["centre"], params["width"] = centres, widths
    return bytes([axis]) + params.tobytes() + words[:len(words) - _zero_top_bytes(words)]


RANS_FLOOR_SLACK = 8
"""Bytes a rANS stream may come in under its indices' empirical entropy: its final state's words carry the last
few bits (measured: every rans/rans-compact payload of the bench's adapters and a LLaMA-shaped one at 1-8 bits
came 0.7 bytes or more above the floor without this slack)."""


def rans_floor(counts: np.ndarray, stage: str) -> float:
    """Fewer bytes than a `stage` (rans or rans-compact) payload of indices with these counts (one per codebook
    entry) can take: its count table, plus the indices' empirical entropy (no model codes a sequence below it),
    less RANS_FLOOR_SLACK. Lets a caller skip the rANS coder (~5 ns an index) where a fast stage is already
    smaller than this."""
    if stage == ENTROPY_RANS:
        table = 4 * counts.size
    else:
        table = 1 + -(-(counts.size - 1) * int(counts[:-1].max(initial=0)).bit_length() // 8)
    used = counts[counts > 0].astype(np.float64)
    return table + float(-(used * np.log2(used / used.sum())).sum()) / 8 - RANS_FLOOR_SLACK


def decode_stream(payload: memoryview, count: int, bits: int, codebook_size: int,
                  stage: str, row: int = 0) -> tuple[np.ndarray | bytes | memoryview, int]:
    """Undo the entropy stage: (stream, w), the indices packed at w bits, for bitpack.lookup to check and map.

    w is b (none, zstd), the aligned width (zstd-aligned) or for rans 8, or bitpack.WIDE (uint16 indices) where the
    codebook has more than 256 entries (2.3). rans-grouped needs `row`, the length of the tensor's rows as a matrix.
    Raises FormatError on a bad payload.
    """
    if codebook_size == 1:
        if len(payload):
            raise FormatError("a one-entry codebook must have an empty payload")
        return np.zeros(count, dtype=np.uint8), 8
    if stage == ENTROPY_NONE:
        return payload, bits
    if stage in (ENTROPY_ZSTD, ENTROPY_ZSTD_ALIGNED):
        width = _frame_width(bits, stage)
        return zstd_decompress(payload, bitpack.packed_size(count, width)), width
    if stage in (ENTROPY_RANS, ENTROPY_RANS_COMPACT):
        stream, counts = rans_frame(payload, count, codebook_size, stage)
        indices = _decode_rans_stream(_words(stream), counts, count)
        return indices, 8 if indices.dtype == np.uint8 else bitpack.WIDE
    if stage in (ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS):
        stream, params, axis = rans_grouped_frame(payload, count, codebook_size, row, stage)
        decode = _decode_rans_trellis if stage == ENTROPY_RANS_TRELLIS else _decode_rans_grouped
        grouped = decode(_words(stream), params, codebook_size, count)
        indices = np.ascontiguousarray(grouped.reshape(len(params) // 3, -1).T if axis else grouped).ravel()
        return indices, 8 if indices.dtype == np.uint8 else bitpack.WIDE
    raise FormatError(f"unknown entropy stage {stage!r}")


def index_frame(payload: memoryview, count: int, bits: int, stage: str) -> tuple[memoryview, int]:
    """(frame, w) of a zstd or zstd-aligned payload, its declared size checked, for a decoder that
    decompresses it itself (bitpack's framed jobs): the indices packed at w bits are its content."""
    width = _frame_width(bits, stage)
    check_frame(payload, bitpack.packed_size(count, width))
    return payload, width


def _frame_width(bits: int, stage: str) -> int:
    """The packing width of the indices inside a zstd (b) or zstd-aligned (aligned width) frame."""
    return bitpack.aligned_width(bits) if stage == ENTROPY_ZSTD_ALIGNED else bits


def decode_indices(payload: memoryview, count: int, bits: int, codebook_size: int, stage: str,
                   row: int = 0) -> np.ndarray:
    """The indices themselves (for tests and tools; the decoder maps the stream straight to values)."""
    stream, width = decode_stream(payload, count, bits, codebook_size, stage, row)
    try:
        return bitpack.lookup(stream, count, width, np.arange(codebook_size, dtype=index_dtype(codebook_size)))
    except ValueError as exc:
        raise FormatError(f"packed indices: {exc}") from None


def _count_table(counts: np.ndarray) -> bytes:
    """rans-compact's table: the width w of the largest count, then the counts bit-packed at w bits (spec §4.3's
    order: least significant bit first)."""
    width = int(counts.max(initial=0)).bit_length()
    bits = (counts.astype(np.uint64)[:, None] >> np.arange(width, dtype=np.uint64)) & 1
    return bytes([width]) + np.packbits(bits.astype(np.uint8).ravel(), bitorder="little").tobytes()


def _zero_top_bytes(words: bytes) -> int:
    """How many of the last word's high bytes are zero (at most 3: a word keeps one byte)."""
    drop = 0
    while drop < 3 and len(words) > drop and words[-1 - drop] == 0:
        drop += 1
    return drop


def rans_frame(payload: memoryview, count: int, codebook_size: int, stage: str) -> tuple[memoryview, np.ndarray]:
    """(stream, counts) of a rans or rans-compact payload, its count table checked against §4.2: the rANS words
    (rans-compact's last one maybe short of its zero high bytes) and one uint64 count per codebook entry, for a
    decoder that runs the model and the stream itself (bitpack's rANS jobs) or for _decode_rans_stream."""
    if stage == ENTROPY_RANS:
        table_bytes = 4 * codebook_size
        if len(payload) < table_bytes or (len(payload) - table_bytes) % 4:
            raise FormatError("rANS payload is not a frequency table followed by whole 32-bit words")
        counts = np.frombuffer(payload[:table_bytes], dtype="<u4").astype(np.uint64)
        if int(counts.sum(dtype=np.uint64)) != count:
            raise FormatError(f"rANS frequency table sums to {int(counts.sum(dtype=np.uint64))}, expected {count}")
        return payload[table_bytes:], counts
    if not len(payload) or payload[0] > MAX_COUNT_WIDTH:
        raise FormatError(f"rans-compact payload must start with a count width of 0..{MAX_COUNT_WIDTH}")
    width, stored = payload[0], codebook_size - 1
    table_bytes = -(-stored * width // 8)
    if len(payload) < 1 + table_bytes:
        raise FormatError("rans-compact payload is shorter than its count table")
    bits = np.unpackbits(np.frombuffer(payload[1:1 + table_bytes], dtype=np.uint8), bitorder="little")
    if bits[stored * width:].any():
        raise FormatError("rans-compact count table: unused bits of its last byte are not zero")
    head = (bits[:stored * width].reshape(stored, width).astype(np.uint64) << np.arange(width, dtype=np.uint64)).sum(
        axis=1, dtype=np.uint64)
    total = int(head.sum(dtype=np.uint64))
    if total > count:
        raise FormatError(f"rANS frequency table sums to more than {count}")
    return payload[1 + table_bytes:], np.append(head, np.uint64(count - total))


def rans_grouped_frame(payload: memoryview, count: int, codebook_size: int, row: int,
                       stage: str = ENTROPY_RANS_GROUPED) -> tuple[memoryview, memoryview, int]:
    """(stream, params, axis) of a rans-grouped or (`stage`) rans-trellis payload, checked against §4.2: the rANS
    words, the groups' 3-byte parameters (u16 centre, u8 width code) and the axis the groups run along. `row`: the
    length of the tensor's rows viewed as a matrix (codec.matrix_shape), which the groups depend on."""
    if row < 1 or count % row:
        raise ValueError(f"{stage} needs the length of the tensor's rows, a divisor of {count}, not {row}")
    if stage == ENTROPY_RANS_TRELLIS and codebook_size < TRELLIS_MIN_ENTRIES:
        raise FormatError(f"rans-trellis needs a codebook of at least {TRELLIS_MIN_ENTRIES} entries, not {codebook_size}")
    if not len(payload) or payload[0] not in GROUP_AXES:
        raise FormatError(f"{stage} payload must start with an axis of 0 or 1")
    axis = payload[0]
    groups = count // row if axis == 0 else row
    if groups * groups > count:  # spec: G <= L, so a reader builds at most sqrt(n) models whatever the file says
        raise FormatError(f"{stage} payload: axis {axis} makes {groups} groups of {count // groups} indices; "
                          f"a writer groups along the shorter side")
    end = 1 + 3 * groups
    if len(payload) < end:
        raise FormatError(f"{stage} payload is shorter than its {groups} groups' parameters")
    params = payload[1:end]
    centres, _ = _group_params(params)
    if int(centres.max()) > 16 * (codebook_size - 1):
        raise FormatError(f"{stage} payload: a group's centre {int(centres.max())}/16 is past the codebook's last "
                          f"index, {codebook_size - 1}")
    return payload[end:], params, axis


def _group_params(params: memoryview) -> tuple[np.ndarray, np.ndarray]:
    """(centres, width codes) of rans-grouped's parameters, as int64."""
    fields = np.frombuffer(params, dtype=GROUP_PARAMS)
    return fields["centre"].astype(np.int64), fields["width"].astype(np.int64)


def _words(stream: memoryview) -> np.ndarray:
    """A rANS stream's little-endian u32 words, a short last word (rans-compact, rans-grouped) zero-padded."""
    return np.frombuffer(bytes(stream) + b"\0" * (-len(stream) % 4), dtype="<u4")


def _decode_rans_stream(words: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    """The `count` indices of a rANS stream under the model of `counts`; the coder must end empty."""
    words = words.astype(np.uint32)
    model = _rans_model(counts)
    indices = np.empty(count, dtype=index_dtype(counts.size))
    try:  # in chunks: constriction returns int32, and a whole tensor's worth would be 4 bytes per element
        coder = constriction.stream.stack.AnsCoder(words)
        for start in range(0, count, RANS_CHUNK):
            stop = min(count, start + RANS_CHUNK)
            indices[start:stop] = coder.decode(model, stop - start)
    except Exception as exc:  # noqa: BLE001 - constriction raises plain Python errors on malformed streams
        raise FormatError(f"bad rANS stream: {exc}") from None
    if not coder.is_empty():
        raise FormatError("rANS stream has data left after the last symbol")
    return indices


def _decode_rans_grouped(words: np.ndarray, params: memoryview, k: int, count: int) -> np.ndarray:
    """The `count` indices of a rans-grouped stream, in the stream's (groups') order; the coder must end empty."""
    centres, widths = _group_params(params)
    length = count // centres.size
    indices = np.empty(count, dtype=index_dtype(k))
    try:
        coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
        for first, end in _runs(centres, widths):
            model = _rans_model(gauss_counts(centres[first:first + 1], widths[first:first + 1], k)[0])
            for start in range(first * length, end * length, RANS_CHUNK):
                stop = min(end * length, start + RANS_CHUNK)
                indices[start:stop] = coder.decode(model, stop - start)
    except Exception as exc:  # noqa: BLE001 - constriction raises plain Python errors on malformed streams
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
