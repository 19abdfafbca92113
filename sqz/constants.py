"""Numbers and names fixed by spec/format.md. Change them only together with the spec."""
from __future__ import annotations

MAGIC = b"\x89SQZ\r\n\x1a\n"
"""8 bytes; the PNG-style high byte and CR LF / ^Z / LF catch text-mode and 7-bit transfers."""

VERSION_MAJOR = 2
VERSION_MINOR = 5
"""What the writer writes by default."""
READABLE_MAJORS = {1: 1, 2: 5}
"""Major -> newest minor of it this reader implements. A reader of major 2 still reads every 1.x file (§2)."""
WRITABLE_VERSIONS = ((1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5))
"""Versions the writer can produce: 1.1 to 2.4 for fleets whose readers predate 2.0, 2.1, 2.2, 2.3, 2.4 or 2.5."""

PREAMBLE_SIZE = 20
"""magic (8) + major u16 + minor u16 + header length u32 + header CRC-32 u32, little-endian."""

HEADER_DICTIONARY = "header-2.0.dict"
HEADER_DICTIONARY_SHA256 = "323bb1e5fb7d504c8c16fda877ddf895fb1f6f9a93fe9fe506cfdc293a985ce5"
"""2.0: the header's zstd frame is compressed with this raw-content dictionary (a file next to this module; §3):
typical PEFT configs, module names and records, so that what every adapter's header repeats costs next to nothing."""

CRC_SIZE = 4
CHUNK_SIZE = 1 << 16
"""2.0: the data area is checked in chunks of this many bytes (the last one shorter), one CRC-32 each, in the table
that follows the header; reading a section checks the chunks it overlaps. 1.x: one CRC-32 per section, a decimal in
its record, which costs a small adapter (56 sections of 80 bytes) more than the chunks do (one)."""

ALIGNMENT = 8
"""The data area starts at a multiple of this many bytes, and so does every 1.x section; in 2.0 only `raw`/`none`
sections are aligned (their bytes are the tensor's), the others follow the previous section directly."""

# Reader limits (spec section "Limits"): checked before anything is allocated from a claim.
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Limit on the header JSON after decompression (and so on the compressed header too)."""
MAX_HEADER_DEPTH = 1024
"""Deepest JSON nesting a reader accepts (§3): orjson's own limit, which the reader relies on."""
MAX_TENSORS = 1_000_000
MAX_NDIM = 8
MAX_NUMEL = 1 << 32
"""Per tensor: 4G elements, above any real adapter tensor (a 128K-vocab head at r=256 is 33M)."""
MAX_NAME_BYTES = 4096

MAX_KMEANS_NUMEL = 1 << 28
"""Per quantized tensor: 40x the largest real LoRA factor; a rANS stream can claim many symbols in few bytes."""

MAX_EXPANSION = 1 << 16
EXPANSION_FLOOR = 64 * 1024 * 1024
"""A tensor may decode to at most max(EXPANSION_FLOOR, MAX_EXPANSION x its section length) bytes: a constant
or near-constant tensor legitimately codes to a few bytes, but a tiny file must not make a reader allocate GBs."""

MIN_BITS = 1
MAX_BITS = 8
"""-b, bit packing and every entropy stage: indices of 1 to 8 bits (codebooks of up to 256 entries)."""
MAX_WIDE_BITS = 12
"""2.3: a kmeans record coded with rans or rans-compact may have `bits` up to this (codebooks of up to 4,096
entries): the entropy-constrained quantizers of a rate-distortion target need more than 256 levels above ~6 bits a
value. Only rANS stages: no other stage packs indices wider than a byte."""
WIDE_BITS_MIN_VERSION = (2, 3)

ENCODING_KMEANS = "kmeans"
ENCODING_RAW = "raw"
ENCODINGS = (ENCODING_KMEANS, ENCODING_RAW)

ENTROPY_NONE = "none"
ENTROPY_ZSTD = "zstd"
ENTROPY_RANS = "rans"
ENTROPY_ZSTD_ALIGNED = "zstd-aligned"
"""Since 1.1: indices packed at a byte-aligned width (1, 2, 4 or 8 bits), then zstd."""
ENTROPY_RANS_COMPACT = "rans-compact"
"""Since 2.1: rANS as `rans`, with its count table bit-packed (the last count implied) and its last word's zero high
bytes left out: 5-8 bytes of table for a small tensor's 20-32."""
ENTROPY_RANS_GROUPED = "rans-grouped"
"""Since 2.4: one rANS stream of the tensor's rows (or columns) in turn, each under its own discrete Gaussian (3 bytes
of parameters): the components of a factor in the SVD gauge differ in spread, which one count table pools."""
ENTROPY_RANS_TRELLIS = "rans-trellis"
"""Since 2.5: indices on the 8-state trellis of TRELLIS_CLASS and TRELLIS_NEXT (trellis-coded quantization), laid out
as rans-grouped's, each index coded under its group's discrete Gaussian restricted to its state's class."""
ENTROPY_STAGES = (ENTROPY_NONE, ENTROPY_ZSTD, ENTROPY_RANS, ENTROPY_ZSTD_ALIGNED, ENTROPY_RANS_COMPACT,
                  ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS)
MIN_VERSION = {ENTROPY_ZSTD_ALIGNED: (1, 1), ENTROPY_RANS_COMPACT: (2, 1), ENTROPY_RANS_GROUPED: (2, 4),
               ENTROPY_RANS_TRELLIS: (2, 5)}
"""The first format version of each entropy stage that 1.0 did not have (a writer of an older version cannot use it)."""
MAX_COUNT_WIDTH = 32
"""rans-compact: the bits of each stored count, at most (a count is at most MAX_KMEANS_NUMEL)."""
GAUSS_RATIO = 1070838486
"""rans-grouped: round(2^30 * 2^(-1/256)), the step of the recurrence that makes the table E[i] = 2^30 * 2^(-i/256)
(E[0] = 2^30, E[i+1] = (E[i] * GAUSS_RATIO + 2^29) >> 30) from which every group's model is computed in integers."""
GROUP_AXES = (0, 1)
"""rans-grouped: the groups are the rows (0) or the columns (1) of the tensor viewed as a matrix (as scale_axis)."""
TRELLIS_CLASS = (0, 0, 1, 1, 0, 0, 1, 1)
"""rans-trellis: the class of each of the 8 states; in a state of class c every index i has i mod 2 = c."""
TRELLIS_NEXT = ((0, 4), (4, 0), (1, 5), (5, 1), (6, 2), (2, 6), (7, 3), (3, 7))
"""rans-trellis: the state after index i in state s: TRELLIS_NEXT[s][(i mod 4) div 2] (Ungerboeck's 8-state trellis
as Marcellin and Fischer's TCQ uses it). The first index is coded in state 0."""
TRELLIS_MIN_ENTRIES = 4
"""rans-trellis: a codebook of at least 4 entries (each class's model has 2 symbols or more)."""
RAW_ENTROPY_STAGES = (ENTROPY_NONE, ENTROPY_ZSTD)
WIDE_ENTROPY_STAGES = (ENTROPY_RANS, ENTROPY_RANS_COMPACT, ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS)
"""2.3: the stages a kmeans record of more than MAX_BITS bits may use (and rans-grouped, 2.4, rans-trellis, 2.5)."""

ROLE_A = "lora_A"
ROLE_B = "lora_B"
ROLE_ALPHA = "alpha"
ROLE_MAGNITUDE = "magnitude"
ROLE_OTHER = "other"
ROLES = (ROLE_A, ROLE_B, ROLE_ALPHA, ROLE_MAGNITUDE, ROLE_OTHER)

PAIR_LORA = "lora"
PAIR_SINE = "sine"
PAIR_KINDS = (PAIR_LORA, PAIR_SINE)

LAYER_LINEAR = "linear"
LAYER_EMBEDDING = "embedding"
LAYER_CONV = "conv"
LAYER_KINDS = (LAYER_LINEAR, LAYER_EMBEDDING, LAYER_CONV)

DTYPE_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
"""Tensor element types, named as safetensors names them."""

QUANTIZABLE_DTYPES = ("F64", "F32", "F16", "BF16")

CODEBOOK_GRID = "GRID"
"""2.2: a codebook of integer multiples of one power of two, its gaps Rice-coded (sqz/grid.py); its scales are
powers of two, stored as exponents."""
CODEBOOK_DTYPES = ("F32", "F16", "BF16", CODEBOOK_GRID)
"""2.0: a kmeans record's `codebook_dtype` (1.x codebooks are all F32)."""
CODEBOOK_MIN_VERSION = {CODEBOOK_GRID: (2, 2)}
"""The first format version of each codebook dtype that 2.0 did not have."""
GRID_MAX_MANTISSA = 1 << 24
"""GRID: every entry is m·2^e with |m| < 2^24 (so float32 holds it exactly) and -128 <= e <= 127 (one signed byte)."""
GRID_MIN_EXPONENT = -128
GRID_MAX_EXPONENT = 127
GRID_MAX_REMAINDER_BITS = 24
"""GRID: the Rice parameter p (low bits of each gap stored as they are) is at most 24: a gap is below 2^25."""
SCALE_AXES = (0, 1)
"""2.0: a kmeans record's optional `scale_axis`: one scale per row (0) or per column (1) of the tensor viewed as
[shape[0], n / shape[0]], stored after the codebook; element = codebook[index] x its row's or column's scale."""

MAX_PAIR_MAGNITUDE = 1e6
MIN_GAMMA_MAGNITUDE = 1e-6
"""A pair's numbers (spec §3.2): |scaling| <= 1e6, |omega| <= 1e6, 1e-6 <= |gamma| <= 1e6. Real adapters sit orders
of magnitude inside (alpha/r is at most a few thousand, Sine-LoRA's ω a few hundred, γ = √in a few hundred), and
within these bounds a reader's ΔW of any float16 factors stays finite in float32."""
