"""One tensor <-> one data section (spec: "Sections").

kmeans section: codebook (codebook_size little-endian values of codebook_dtype, or 2.2's GRID coding of them),
                scales if the record has a scale_axis, then the entropy payload of the indices.
raw section:    the tensor's little-endian bytes through the entropy stage (none or zstd).
"""
from __future__ import annotations

import fnmatch
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import bitpack, entropy, grid, trellis
from .adapter import SourceTensor
from .constants import (
    CODEBOOK_GRID,
    CODEBOOK_MIN_VERSION,
    DTYPE_ITEMSIZE,
    ENCODING_KMEANS,
    ENCODING_RAW,
    ENTROPY_NONE,
    ENTROPY_RANS,
    ENTROPY_RANS_COMPACT,
    ENTROPY_RANS_GROUPED,
    ENTROPY_RANS_TRELLIS,
    ENTROPY_STAGES,
    ENTROPY_ZSTD,
    ENTROPY_ZSTD_ALIGNED,
    MAX_BITS,
    MAX_WIDE_BITS,
    MIN_BITS,
    MIN_VERSION,
    QUANTIZABLE_DTYPES,
    ROLE_A,
    ROLE_B,
    ROLE_OTHER,
    VERSION_MAJOR,
    VERSION_MINOR,
    WIDE_BITS_MIN_VERSION,
    WIDE_ENTROPY_STAGES,
    WRITABLE_VERSIONS,
)
from .dtypes import bits_to_float32, finite_bits, float32_to_bits, itemsize, to_narrowest
from .errors import FormatError, InputError, LimitError, SqzError
from .quantize import DEFAULT_SAMPLE, Quantized, quantize, tensor_seed

if TYPE_CHECKING:
    from .ratecontrol import Choice

ENTROPY_AUTO = "auto"
TARGETS = ("bpp", "size", "sqnr")
"""EncodeOptions' rate-distortion targets, of which at most one is set."""


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that decides the bytes of a .sqz file (with the input): same options, same file."""

    bits: int = 3
    sample: int = DEFAULT_SAMPLE  # values the centroids are fitted on; 0 = all
    seed: int = 0
    entropy: str = ENTROPY_AUTO  # auto | none | zstd | zstd-aligned | rans | rans-compact | rans-grouped
    lossless: tuple[str, ...] = ()  # name globs kept exact even if they are LoRA factors
    quantize: tuple[str, ...] = ()  # name globs of non-factor float tensors to quantize as well
    bpp: float | None = None  # rate-distortion targets, at most one: all-in file bits per parameter,
    size: int | None = None  # file bytes,
    sqnr: float | None = None  # or the SQNR of ΔW in dB; `bits` is then ignored for paired factors
    format: str = f"{VERSION_MAJOR}.{VERSION_MINOR}"  # the format version written: 2.4, or 2.3 down to 1.1 for older readers

    @property
    def version(self) -> tuple[int, int]:
        """`format` as (major, minor)."""
        major, minor = self.format.split(".")
        return int(major), int(minor)

    @property
    def target(self) -> str | None:
        """Which rate-distortion target is set, if any."""
        return next((key for key in TARGETS if getattr(self, key) is not None), None)

    def __post_init__(self) -> None:
        targets = [key for key in TARGETS if getattr(self, key) is not None]
        if len(targets) > 1:
            raise InputError(f"give one target, not {' and '.join('--' + t for t in targets)}")
        if self.bpp is not None and not (math.isfinite(self.bpp) and self.bpp > 0):
            raise InputError(f"--bpp must be a positive number, got {self.bpp}")
        if self.size is not None and not self.size > 0:
            raise InputError(f"--size must be a positive number of bytes, got {self.size}")
        if self.sqnr is not None and not math.isfinite(self.sqnr):
            raise InputError(f"--sqnr must be a finite number of dB, got {self.sqnr}")
        if self.target is not None and self.sample:
            raise InputError("--sample applies to -b; the rate-distortion targets fit every value")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise InputError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.sample < 0:
            raise InputError(f"--sample must be >= 0, got {self.sample}")
        if self.format not in (writable := [f"{major}.{minor}" for major, minor in WRITABLE_VERSIONS]):
            raise InputError(f"--format must be one of {', '.join(writable)}, got {self.format!r}")
        if self.entropy not in (ENTROPY_AUTO, *ENTROPY_STAGES):
            raise InputError(f"entropy must be auto or one of {', '.join(ENTROPY_STAGES)}, got {self.entropy!r}")
        if MIN_VERSION.get(self.entropy, (1, 0)) > self.version:
            raise InputError(f"entropy {self.entropy} needs --format {'.'.join(map(str, MIN_VERSION[self.entropy]))} "
                             f"or later, not {self.format}")
        if self.entropy == ENTROPY_RANS_TRELLIS and self.target is None:
            raise InputError("entropy rans-trellis codes the trellis-coded quantizer of a rate target: give --bpp, "
                             "--size or --sqnr (-b is the paper's k-means)")

    @property
    def stages(self) -> tuple[str, ...]:
        """The entropy stages tried on each quantized tensor: the one asked for, or for auto every stage the
        format has, but rANS only in its 2.1 form where that exists (its payload is never larger)."""
        if self.entropy != ENTROPY_AUTO:
            return (self.entropy,)
        stages = [s for s in ENTROPY_STAGES if MIN_VERSION.get(s, (1, 0)) <= self.version]
        if ENTROPY_RANS_COMPACT in stages:
            stages.remove(ENTROPY_RANS)
        return tuple(stages)

    @property
    def scalar_stages(self) -> tuple[str, ...]:
        """The stages that code a scalar quantizer's indices: `stages` without rans-trellis (which codes only indices
        on its trellis), or rans-compact where rans-trellis was asked for: a factor is put on the trellis where that
        costs less (squared error + slope x bits, at its plan's slope), and scalar-quantized otherwise."""
        return tuple(s for s in self.stages if s != ENTROPY_RANS_TRELLIS) or (ENTROPY_RANS_COMPACT,)

    @property
    def widest_index(self) -> int:
        """Index bits a rate-controlled tensor may get: MAX_WIDE_BITS where the format (2.3) and a rANS stage allow
        codebooks of more than 256 entries, else MAX_BITS (-b is always at most MAX_BITS)."""
        wide = self.version >= WIDE_BITS_MIN_VERSION and any(s in WIDE_ENTROPY_STAGES for s in self.stages)
        return MAX_WIDE_BITS if wide else MAX_BITS

    def to_json(self) -> dict:
        return {**asdict(self), "lossless": list(self.lossless), "quantize": list(self.quantize)}


def should_quantize(t: SourceTensor, role: str, options: EncodeOptions) -> bool:
    """LoRA factors are quantized; other tensors only when --quantize names them. Never empty or non-float ones."""
    if t.dtype not in QUANTIZABLE_DTYPES or t.numel == 0:
        return False
    if any(fnmatch.fnmatchcase(t.name, g) for g in options.lossless):
        return False
    if role in (ROLE_A, ROLE_B):
        return True
    return role == ROLE_OTHER and any(fnmatch.fnmatchcase(t.name, g) for g in options.quantize)


RANS_DECODE_NS = 4.5
"""rANS's extra decode time per index over the fast stages, loading a file: the C extension's decoder takes about
5-6 ns an index on one core in a batch of tensors (it interleaves four streams; 7.5 for one alone) against
zstd-aligned's 0.5-2.5, 3.7-4.6 ns more as measured (constriction's, the decoder without it, takes about 30)."""
BYTE_WORTH_NS = 1000.0
"""The decode time auto spends to save one byte: a microsecond, what a byte costs on a 1 MB/s link (a phone on a
poor connection). rANS is kept only where the bytes it saves over the best fast stage are worth its extra decode
time at this rate: about 0.035 bits per index saved, where zstd-aligned usually comes within 0.03-0.05."""


def _smallest(candidates: dict[str, bytes], count: int = 0) -> tuple[str, bytes]:
    """Smallest payload of `count` indices, rANS only where it pays for its decode time; ties go to the stage
    that decodes fastest."""
    order = {ENTROPY_NONE: 0, ENTROPY_ZSTD_ALIGNED: 1, ENTROPY_ZSTD: 2, ENTROPY_RANS_COMPACT: 3, ENTROPY_RANS: 4,
             ENTROPY_RANS_GROUPED: 5}
    slow = [s for s in candidates if s in SLOW_STAGES]
    fast = [s for s in candidates if s not in slow]
    stage = min(fast or candidates, key=lambda s: (len(candidates[s]), order[s]))
    if slow and fast:
        rans = min(slow, key=lambda s: (len(candidates[s]), order[s]))
        if _rans_pays(len(candidates[stage]) - len(candidates[rans]), count):
            stage = rans
    return stage, candidates[stage]


SLOW_STAGES = (ENTROPY_RANS, ENTROPY_RANS_COMPACT, ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS)


def _rans_pays(saved_bytes: float, count: int) -> bool:
    return saved_bytes * BYTE_WORTH_NS >= RANS_DECODE_NS * count


def _entropy_coded(q: Quantized, bits: int, stages: tuple[str, ...], row: int) -> tuple[str, bytes]:
    """_smallest of the stages' payloads, the rANS ones coded only where they could pay: where the smallest fast
    payload is not already within their floor (entropy.rans_floor) plus what rANS must save. `row`: indices a row."""
    k, count = int(q.codebook.size), int(q.indices.size)
    if bits > MAX_BITS:  # 2.3: only rANS codes indices wider than a byte (the plan offers them only where it may)
        stages = tuple(s for s in stages if s in WIDE_ENTROPY_STAGES)
    fast = tuple(s for s in stages if s not in SLOW_STAGES)
    candidates = entropy.encode_stages(q.indices, bits, k, fast, row)
    smallest = min((len(p) for p in candidates.values()), default=math.inf)
    slow = tuple(s for s in stages if s in (ENTROPY_RANS, ENTROPY_RANS_COMPACT)
                 and _rans_pays(smallest - entropy.rans_floor(q.counts, s), count))
    candidates.update(entropy.encode_stages(q.indices, bits, k, slow))
    if ENTROPY_RANS_GROUPED in stages and k == 1:
        candidates[ENTROPY_RANS_GROUPED] = b""  # every index is 0: as every stage, no payload
    elif ENTROPY_RANS_GROUPED in stages:  # fitted only where the groups' entropies could pay, coded where the fit could
        axis = entropy.group_axis(count, row)
        hist = entropy.group_counts(q.indices, k, row, axis)
        smallest = min((len(p) for p in candidates.values()), default=math.inf)
        forced = len(stages) == 1
        if forced or _rans_pays(smallest - entropy.grouped_floor(hist), count):
            centres, widths, code_bits = entropy.fit_gauss(hist)
            estimate = entropy.grouped_bytes(centres.size, code_bits)
            if forced or _rans_pays(smallest - estimate + entropy.RANS_FLOOR_SLACK, count):
                candidates[ENTROPY_RANS_GROUPED] = entropy.rans_grouped_payload(q.indices, k, row, axis, centres,
                                                                                widths)
    return _smallest(candidates, count)


def encode_tensor(t: SourceTensor, role: str, options: EncodeOptions,
                  choice: Choice | None = None) -> tuple[dict, bytes]:
    """The header record (without offset/length/crc32) and the section bytes of one tensor; a rate-controlled
    encode passes the tensor's `choice` (lossless, or a width and the codebook fitted at it)."""
    record = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "role": role}
    if not should_quantize(t, role, options) or (choice is not None and choice.bits is None):
        return _encode_raw(t, record, options)
    bits = options.bits if choice is None else max(choice.bits, MIN_BITS)  # width 0: one entry, recorded as 1 bit
    values, dtype = to_narrowest(t.raw, t.dtype), t.dtype
    scales = None if choice is None else choice.scales
    if scales is not None:  # quantized as values / scale along the axis (spec §4.2): a rate-controlled B factor
        values = (values.astype(np.float64).reshape(matrix_shape(t.shape)) / scales[None, :]).ravel()
        dtype = "F64"  # no longer values of the tensor's dtype
    try:
        q = quantize(values, bits, options.sample,
                     tensor_seed(options.seed, t.name), dtype, codebook=None if choice is None else choice.codebook,
                     thresholds=None if choice is None else choice.thresholds)
    except InputError as exc:
        raise InputError(f"{t.name}: {exc}") from None
    priced = choice is not None and q.codebook.size <= GRID_PRICED_ENTRIES  # the plan priced its GRID's error
    codebook_dtype, side = stored_side(values, q, t.dtype, options.version, scales,
                                       math.inf if priced else GRID_LIMIT)
    k = int(q.codebook.size)
    stage, payload = _entropy_coded(q, bits, options.scalar_stages, matrix_shape(t.shape)[1])
    if k == 1:
        stage = ENTROPY_NONE  # spec: a one-entry codebook has an empty payload, recorded as 'none'
    if choice is not None and choice.slope is not None and ENTROPY_RANS_TRELLIS in options.stages:
        on_trellis = _on_trellis(values, t.dtype, options, scales, choice.slope, matrix_shape(t.shape)[1])
        error = None if on_trellis is None else _error(values, q, codebook_dtype, side)
        if on_trellis is not None and on_trellis[1] <= TRELLIS_MAX_ERROR * error and on_trellis[0] < _cost(
                error, q.indices.size, len(side), len(payload), choice.slope,
                RANS_DECODE_NS if stage in SLOW_STAGES else 0.0):
            _, _, q, codebook_dtype, side, payload = on_trellis
            stage, k, bits = ENTROPY_RANS_TRELLIS, int(q.codebook.size), max(width_of(int(q.codebook.size)), MIN_BITS)
    record.update(encoding=ENCODING_KMEANS, entropy=stage, bits=bits, codebook_size=k, codebook_dtype=codebook_dtype,
                  sample_size=q.sample_size, seed=q.seed)
    if scales is not None:
        record["scale_axis"] = 1
    section = side + payload
    if options.entropy == ENTROPY_AUTO:
        # A small tensor at many bits can cost more as codebook + indices than as its exact bytes
        # (a 384-value factor at 8 bits: 1 KiB of codebook). auto never stores a factor larger than exact.
        exact_record, exact = _encode_raw(t, {k: record[k] for k in ("name", "shape", "dtype", "role")}, options)
        if len(exact) <= len(section):
            return exact_record, exact
    return record, section


def _on_trellis(values: np.ndarray, dtype: str, options: EncodeOptions, scales: np.ndarray | None,
                slope: float, row: int) -> tuple[float, float, Quantized, str, bytes, bytes] | None:
    """(cost, squared error, quantized, codebook_dtype, side, payload) of the tensor (rows of `row` values) quantized
    on the trellis at the slope of its entropy-constrained fit (trellis.py), its cost the squared error plus slope x
    bits: the cheaper of the grid's path and the centroids' (by their payloads' estimated sizes); None where no path
    applies."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    best = None
    for path in trellis.quantize(flat, slope, 1 << MAX_WIDE_BITS, row):
        k = int(path.codebook.size)
        q = Quantized(path.codebook.astype(np.float32), path.indices, 0, 0, np.bincount(path.indices, minlength=k))
        codebook_dtype, side = stored_side(values, q, dtype, options.version, scales, math.inf)  # _cost prices it
        params = entropy.grouped_params(path.indices, k, row)
        error = _error(flat, q, codebook_dtype, side)
        cost = _cost(error, flat.size, len(side), entropy.rans_trellis_bytes(path.indices, k, row, params), slope,
                     TRELLIS_DECODE_NS)
        if best is None or cost < best[0]:
            best = cost, error, q, codebook_dtype, side, params
    if best is None:
        return None
    _, error, q, codebook_dtype, side, params = best
    payload = entropy.rans_trellis_payload(q.indices, int(q.codebook.size), row, params)
    return (_cost(error, flat.size, len(side), len(payload), slope, TRELLIS_DECODE_NS), error, q, codebook_dtype, side,
            payload)


TRELLIS_MAX_ERROR = math.sqrt(2)
"""A trellis path replaces the plan's scalar quantizer only where its squared error is at most this many times the
scalar's: about one rung of the plan's ladder coarser (a quarter bit, 1.5 dB). The path is searched at the slope of
the plan's rung, which at the ladder's lowest rungs (0.25-0.5 bits a value) can be several times steeper than what
the factor is worth to the pair's ΔW, and a path far coarser than the plan asked for is a move the plan's pricing
never weighed. Measured on the bench's LLM LoRA r=1 at --size 2,700-3,300 bytes (1.2-1.5 bits/param): without the
bound one A factor of 256 values went from 2 levels to a 9-byte path at 3.7x the error for 0.25x the bits and ΔW
lost 0.25-0.4 dB (2.53 against 2.84 dB at 2,968 bytes; 2.78 with the bound); the MiniLM adapters' coarser paths all
stay within 1.25x (their curves unchanged)."""

TRELLIS_DECODE_NS = 5.5
"""rans-trellis's extra decode time per index over the fast stages: ~1 ns more than rans-grouped's (the C extension
interleaves four streams either way; 3.1 against 2.2 ns an index on one core, Gaussian factors of 262K values at 2
bits a value), so RANS_DECODE_NS + 1."""


def _error(values: np.ndarray, q: Quantized, codebook_dtype: str, side: bytes) -> float:
    """Squared error of `q`'s indices on `values` under the codebook as stored (`side`, in `codebook_dtype`)."""
    record = {"name": "", "codebook_dtype": codebook_dtype, "codebook_size": int(q.codebook.size)}
    stored = read_side(record, memoryview(side)).codebook.astype(np.float64)
    error = np.asarray(values, dtype=np.float64).ravel() - stored[q.indices]
    return float(error @ error)


def _cost(error: float, count: int, side_bytes: int, payload_bytes: float, slope: float, decode_ns: float) -> float:
    """A section's squared `error` plus `slope` x its bits (side and payload) and the bits the decode time of its
    `count` indices is worth (`decode_ns` an index, at BYTE_WORTH_NS a byte): what the rate target's plan
    minimises, and what auto trades."""
    return error + slope * 8 * (side_bytes + payload_bytes + count * decode_ns / BYTE_WORTH_NS)


def width_of(k: int) -> int:
    """Index bits of a k-entry codebook: 0 for k = 1."""
    return (k - 1).bit_length()


def _encode_raw(t: SourceTensor, record: dict, options: EncodeOptions) -> tuple[dict, bytes]:
    stages = (ENTROPY_NONE, ENTROPY_ZSTD) if options.entropy == ENTROPY_AUTO else (
        ENTROPY_ZSTD if options.entropy == ENTROPY_ZSTD else ENTROPY_NONE,)
    stage, payload = _smallest({s: entropy.encode_bytes(t.raw, s) for s in stages})
    return {**record, "encoding": ENCODING_RAW, "entropy": stage}, payload


CODEBOOK_TOLERANCE = 1e-3
CODEBOOK_FLOOR = 1e-6
"""A float32 tensor's codebook is stored as F16 when that adds at most CODEBOOK_TOLERANCE to the tensor's squared
quantization error, or at most CODEBOOK_FLOOR of its energy (60 dB below the signal, beyond float16's own 66 dB:
a near-lossless fit, 256 entries for 768 values, has almost no error to compare with). It saves 2 bytes an entry:
a 72-factor rank-2 adapter's 8-bit codebooks are 3.6 bits/param as F16, 7.1 as F32."""


GRID_DECODE_NS = 2_000.0
"""What reading one GRID codebook may cost over an F16 one: its C reader takes 3-4 µs for up to 32 entries, about
what an F16 codebook's numpy conversion takes. At BYTE_WORTH_NS a byte the writer stores GRID wherever it saves 2
bytes or more (without the C extension a GRID codebook takes ~100 µs to read)."""


GRID_LIMIT = 0.01
"""At -b, a GRID codebook may add up to this share of the tensor's squared quantization error (0.04 dB) where the
bits it saves are worth more at the tensor's own rate-distortion slope (grid_bit_cost), as on small tensors at
many levels: the rank-2 MiniLM adapters' -b 5 files measured 1.0% smaller (SineLoRA 5.275 -> 5.223 bits/param)
for 0.02 dB, -b 6 0.9%; at a 3% limit -b 6 was 1.6% smaller for 0.07 dB, which -b (the paper's k-means) should
not give up. A rate-controlled encode has no limit: its plan prices the error (ratecontrol.grid_bits), and the
--bpp curves of three MiniLM LoRAs measured BD-rate -0.4 to -1.5% against 2.2.0's tolerance, -0.2 to -0.8% with
this limit."""


def grid_bit_cost(base: float, count: float) -> float:
    """What one bit of codebook is worth in squared error: the slope of a fixed-rate quantizer's error D·2^(-2R)
    over its `count` values, 2·ln 2·D per bit a value, shared by them all."""
    return 2 * math.log(2) * base / count if count else 0.0


GRID_PRICED_ENTRIES = 256
"""A rate-controlled encode's plan prices the GRID codebooks (bits and added error) of codebooks of at most this many
entries; larger ones (2.3) it prices at 16 bits an entry (pricing the GRID of every rung of 300-3,000 levels took 1.9
of the 6.4 s of --bpp 8 of the bench's LLaMA-shaped adapter). The writer still stores GRID there where smaller, but
within -b's GRID_LIMIT: unpriced and unlimited, its coarse grids cost the trained-statistics LLaMA-shaped adapter
2.3 dB of ΔW SQNR at --bpp 4."""

GRID_MIN_SHARE = 0.01
"""GRID is tried only where the F16/F32 codebook and scales are at least this share of the bit-packed indices: it
can save no more than they take, and trying costs ~0.5 ms a tensor. Trying it everywhere on a 28.3M-parameter
adapter (65K-value factors) measured `-b 3` 2.69 s against 2.07 s to save 0.01% of the file, `-b 8` 8.90 against
8.31 s for 0.3%, `--bpp 2` 9.58 against 8.15 s for 0.003%. Small factors, where GRID saves 5-20%, are far above
the share."""


def stored_side(values: np.ndarray, q: Quantized, dtype: str, version: tuple[int, int],
                scales: np.ndarray | None = None, grid_limit: float = GRID_LIMIT) -> tuple[str, bytes]:
    """(codebook_dtype, bytes) of a tensor's codebook and scales (spec §4.2). 1.x stores F32. 2.0 stores an F16 or
    BF16 tensor's codebook in its own dtype, which is exact (decoding rounds to that dtype anyway), and a float32
    or float64 one's, or a scaled one's (whose entries are multiplied before that rounding), as F16 where the
    tolerances above allow; F32 wherever rounding would merge two entries or overflow. 2.2 stores GRID instead
    where it saves bytes worth its decode time (GRID_DECODE_NS), trying it where the codebook is a fair share of
    the section (GRID_MIN_SHARE); its grid may add up to `grid_limit` of the tensor's squared error (GRID_LIMIT for
    -b; a rate-controlled encode, whose plan prices that error, passes inf)."""
    exact = q.codebook.astype("<f4")
    if version[0] == 1:
        return "F32", exact.tobytes()
    errors = functools.cache(lambda: _SquaredError(values, q))  # one pass, if either needs it
    codebook_dtype, codebook = _float_codebook(q, dtype, exact, scales is not None, errors)
    side = codebook + (b"" if scales is None else float32_to_bits(scales, codebook_dtype).tobytes())
    packed = q.indices.size * max((exact.size - 1).bit_length(), 1) / 8
    if CODEBOOK_MIN_VERSION[CODEBOOK_GRID] <= version and len(side) >= GRID_MIN_SHARE * packed:
        grid_side = _grid_side(dtype, exact, scales, errors(), grid_limit)
        if grid_side is not None and (len(side) - len(grid_side)) * BYTE_WORTH_NS >= GRID_DECODE_NS:
            return CODEBOOK_GRID, grid_side
    return codebook_dtype, side


def _float_codebook(q: Quantized, dtype: str, exact: np.ndarray, scaled: bool,
                    errors: Callable[[], _SquaredError]) -> tuple[str, bytes]:
    """The codebook as F16/BF16 where §4.2's tolerances allow, else F32."""
    narrow = dtype if dtype in ("F16", "BF16") else "F16"
    bits = float32_to_bits(exact, narrow)
    if not finite_bits(bits, narrow).all():
        return "F32", exact.tobytes()
    rounded = bits_to_float32(bits, narrow)
    if not (np.diff(rounded) > 0).all():
        return "F32", exact.tobytes()
    if (narrow != dtype or scaled) and not _rounding_is_negligible(errors(), exact, rounded):
        return "F32", exact.tobytes()
    return narrow, bits.tobytes()


def _grid_side(dtype: str, exact: np.ndarray, scales: np.ndarray | None, errors: _SquaredError,
               limit: float) -> bytes | None:
    """The GRID codebook (and scale exponents) on the grid of least added error plus bits at the tensor's own slope
    (grid_bit_cost) among those adding at most `limit` times its squared error (or the tolerances above), judged on
    the entries as decoding rounds them to `dtype`; None where no grid or scale exponent fits."""
    scale_bytes = b"" if scales is None else grid.encode_scales(scales)
    if scale_bytes is None:
        return None
    rounds = dtype in ("F16", "BF16")
    base = errors(bits_to_float32(float32_to_bits(exact, dtype), dtype) if rounds else exact)
    allowed = max(CODEBOOK_TOLERANCE * base, CODEBOOK_FLOOR * errors.energy)

    def added(entries: np.ndarray) -> np.ndarray:  # a candidate codebook a row
        if not rounds:
            return errors(entries) - base
        bits = float32_to_bits(entries, dtype)
        return np.where(finite_bits(bits, dtype).all(axis=1), errors(bits_to_float32(bits, dtype)) - base, math.inf)

    chosen = grid.choose_exponent(exact, errors.counts, added, allowed, limit * base if base else 0.0,
                                  grid_bit_cost(base, float(errors.counts.sum())))
    if chosen is None:
        return None
    return grid.encode(chosen.mantissas, chosen.exponent) + scale_bytes


class _SquaredError:
    """Σ(x - c[index])² of a tensor for any codebook c, from per-entry counts and sums (Σx² - 2·Σc·S + Σn·c²), so
    one pass over the tensor serves every candidate codebook."""

    def __init__(self, values: np.ndarray, q: Quantized):
        values = np.asarray(values, dtype=np.float64)
        self.counts = q.counts.astype(np.float64)
        self.sums = np.bincount(q.indices, weights=values, minlength=q.codebook.size)
        self.energy = float(np.square(values).sum())

    def __call__(self, codebook: np.ndarray) -> np.ndarray:
        """The error of one codebook, or of each row of several (sums along rows, not BLAS: the same per row
        however many rows, and no BLAS threads spinning against the encode's)."""
        c = codebook.astype(np.float64)
        return self.energy - 2 * (c * self.sums).sum(axis=-1) + (c * c * self.counts).sum(axis=-1)


def _rounding_is_negligible(error: _SquaredError, codebook: np.ndarray, rounded: np.ndarray) -> bool:
    """Whether replacing `codebook` by `rounded` adds at most the tolerances above to the squared error."""
    base = error(codebook)
    return error(rounded) - base <= max(CODEBOOK_TOLERANCE * base, CODEBOOK_FLOOR * error.energy)


def matrix_shape(shape: list[int] | tuple[int, ...]) -> tuple[int, int]:
    """A tensor viewed as a matrix [shape[0], n / shape[0]] (a scalar as [1, 1]): what scale_axis refers to."""
    rows = shape[0] if shape else 1
    return rows, math.prod(shape) // rows if rows else 0


def scale_count(record: dict) -> int:
    """How many scales a kmeans section holds: 0 without `scale_axis`."""
    axis = record.get("scale_axis")
    return 0 if axis is None else matrix_shape(record["shape"])[axis]


@dataclass(frozen=True)
class Side:
    """What a kmeans section holds before its payload."""

    codebook: np.ndarray  # float32
    scales: np.ndarray | None  # float32, one per row or column (scale_axis), or None
    codebook_bytes: int
    size: int  # bytes of the codebook and the scales: where the payload starts


_BITS_VIEW = {"F32": "<u4", "F16": "<u2", "BF16": "<u2"}


def read_side(record: dict, section: memoryview) -> Side:
    """A kmeans section's codebook and scales as float32 (every codebook dtype converts to it exactly); a FormatError
    where a GRID codebook breaks §4.2 or the section ends inside them."""
    dtype, k, m = record["codebook_dtype"], record["codebook_size"], scale_count(record)
    if dtype == CODEBOOK_GRID:
        try:
            codebook, used = grid.decode(section, k)
        except ValueError as exc:
            raise FormatError(f"{record['name']!r}: {exc}") from None
        if used + m > len(section):
            raise FormatError(f"{record['name']!r}: section shorter than its codebook and scales")
        scales = grid.decode_scales(section[used:used + m]) if record.get("scale_axis") is not None else None
        return Side(codebook, scales, used, used + m)
    codebook_bytes, size = float_side_extent(record)
    view = _BITS_VIEW[dtype]
    codebook = bits_to_float32(np.frombuffer(section[:codebook_bytes], dtype=view), dtype)
    scales = None
    if record.get("scale_axis") is not None:
        scales = bits_to_float32(np.frombuffer(section[codebook_bytes:size], dtype=view), dtype)
    return Side(codebook, scales, codebook_bytes, size)


def float_side_extent(record: dict) -> tuple[int, int]:
    """(codebook bytes, codebook and scale bytes) of a kmeans record with an F32/F16/BF16 codebook: known from the
    record alone (a GRID codebook's only from its bytes, read_side)."""
    item = DTYPE_ITEMSIZE[record["codebook_dtype"]]
    return item * record["codebook_size"], item * (record["codebook_size"] + scale_count(record))


OUTPUT_ALIGNMENT = 64
"""Each tensor decode_tensors returns starts at a multiple of this in their shared buffer (a cache line)."""

Allocator = Callable[[int], np.ndarray]
"""Makes an uninitialised uint8 array of n bytes; raises MemoryError if it cannot."""


def _numpy_empty(size: int) -> np.ndarray:
    return np.empty(size, dtype=np.uint8)


def decode_tensors(items: list[tuple[dict, memoryview]], threads: int = 1,
                   allocate: Allocator = _numpy_empty) -> list[np.ndarray | SqzError]:
    """Decode many (record, section) pairs; each result is the tensor's little-endian bytes (a flat uint8
    array) or the error that tensor raised.

    The entropy stages run first, one tensor at a time, then the codebooks are checked and converted
    all at once. Only then is one buffer for all the outputs allocated (a header's size claims cost memory
    only once the data has backed them), and the lookups of every kmeans tensor run in one
    bitpack.lookup_many call on `threads` threads: one GIL hand-off for the batch, where threads decoding
    a tensor each would fight over the GIL at every step. One bad tensor never spoils the others.
    """
    results: list[np.ndarray | SqzError | None] = [None] * len(items)
    stages: dict[int, tuple] = {}
    for n, (record, section) in enumerate(items):
        try:
            stages[n] = _entropy_stage(record, section)
        except SqzError as exc:
            results[n] = exc
        except MemoryError:
            results[n] = _too_big(record)
    kmeans = [n for n, stage in stages.items() if stage[0] == ENCODING_KMEANS]
    tables = _code_tables([items[n][0] for n in kmeans], [stages[n][5] for n in kmeans])
    for n, table in zip(kmeans, tables):
        scales = stages[n][6]
        if not isinstance(table, SqzError) and scales is not None:
            table = _scaled_table(items[n][0], stages[n][5], scales)
        if isinstance(table, SqzError):
            results[n] = table
            del stages[n]
        else:
            stages[n] = (*stages[n][:5], table, scales)
    outputs = _output_buffers({n: _nbytes(items[n][0]) for n in stages}, allocate)
    lookups: list[tuple[int, bitpack.LookupJob]] = []
    scaled: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # n -> (scales, the lookup's float32 output)
    for n, stage in stages.items():
        out = results[n] = outputs[n]
        if out is None:
            results[n] = _too_big(items[n][0])
        elif stage[0] == ENCODING_RAW:
            out[:] = np.frombuffer(stage[1], dtype=np.uint8)
        else:
            _, stream, count, width, frame, table, scales = stage
            if scales is not None:  # the lookup writes float32 codebook values, which the scales then multiply
                target = _try_allocate(4 * count, allocate)
                if target is None:
                    results[n] = _too_big(items[n][0])
                    continue
                target = target.view(np.uint32)
                scaled[n] = scales, target
            else:
                target = out.view(table.dtype)
            lookups.append((n, (stream, count, width, table, target, *frame)))
    failed = set()
    for job, problem in bitpack.lookup_many([job for _, job in lookups], threads):
        n, (_, _, _, table, *_) = lookups[job]
        results[n] = _lookup_error(items[n][0], problem, table.size)
        failed.add(n)
    for n, (scales, values) in scaled.items():
        if n not in failed:
            _apply_scales(items[n][0], scales, values, results[n])
    return results  # type: ignore[return-value]  # every slot is filled above


def decode_index_arrays(items: list[tuple[dict, memoryview]], threads: int = 1) -> list[np.ndarray | SqzError]:
    """The indices (uint16) of many `kmeans` (record, section) pairs, or the error each raised: the decoder's own
    jobs with the identity for a table (what `sqz info --components` attributes a tensor's bits by)."""
    results: list[np.ndarray | SqzError] = []
    jobs: list[tuple[int, bitpack.LookupJob]] = []
    for n, (record, section) in enumerate(items):
        try:
            _, stream, count, width, frame, _, _ = _entropy_stage(record, section)
        except SqzError as exc:
            results.append(exc)
            continue
        out = np.empty(count, dtype=np.uint16)
        results.append(out)
        jobs.append((n, (stream, count, width, np.arange(record["codebook_size"], dtype=np.uint16), out, *frame)))
    for job, problem in bitpack.lookup_many([job for _, job in jobs], threads):
        n = jobs[job][0]
        results[n] = _lookup_error(items[n][0], problem, items[n][0]["codebook_size"])
    return results


def _scaled_table(record: dict, codebook: np.ndarray, scales: np.ndarray) -> np.ndarray | FormatError:
    """The float32 bit patterns a scaled record's lookup writes, once its scales are checked: finite, and no
    product of an entry and a scale beyond its dtype's range (the largest such product, rounded as decoding
    rounds, must be finite, so every element is)."""
    if not np.isfinite(scales).all():
        return FormatError(f"{record['name']!r}: scales must be finite")
    bound = float(np.abs(codebook).max()) * float(np.abs(scales).max()) if scales.size else 0.0
    with np.errstate(over="ignore"):
        largest = np.float32(bound)
    if not (math.isfinite(largest) and finite_bits(float32_to_bits(np.array([largest]), record["dtype"]),
                                                   record["dtype"]).all()):
        return FormatError(f"{record['name']!r}: codebook x scales reaches {bound:g}, not finite as {record['dtype']}")
    return codebook.view(np.uint32)


def _apply_scales(record: dict, scales: np.ndarray, values: np.ndarray, out: np.ndarray) -> None:
    """out = each float32 value times its row's or column's scale (in float32), rounded to the record's dtype."""
    matrix = values.view(np.float32).reshape(matrix_shape(record["shape"]))
    matrix *= scales[None, :] if record["scale_axis"] == 1 else scales[:, None]
    bits = float32_to_bits(matrix.ravel(), record["dtype"])
    out.view(bits.dtype)[:] = bits


def _lookup_error(record: dict, problem: str, k: int) -> SqzError:
    """The error for a problem bitpack.lookup_many reports."""
    if problem == "memory":
        return _too_big(record)
    what = {"index": f"packed indices: an index is outside the {k}-entry codebook",
            "frame": "bad zstd stream (not one valid frame)",
            "size": "zstd stream gave another size than its frame declares",
            "padding": "packed indices: unused bits of the last byte are not zero",
            "rans": "bad rANS stream (a last word of zero, or counts that make no model)",
            "rans-left": "rANS stream has data left after the last symbol"}[problem]
    return FormatError(f"{record['name']!r}: {what}")


def _code_tables(records: list[dict], codebooks: list[np.ndarray]) -> list[np.ndarray | FormatError]:
    """Each codebook checked (finite, strictly increasing, and still finite once rounded to its tensor's dtype:
    3e38 is a float32 but not a float16) and rounded to that dtype, as the bit patterns the lookup writes.
    All at once: one numpy pass over the concatenated codebooks."""
    if not codebooks:
        return []
    values = np.concatenate(codebooks)
    ends = np.cumsum([c.size for c in codebooks])
    rising = np.diff(values) > 0
    rising[ends[:-1] - 1] = True  # one codebook's last entry against the next one's first is no rule
    if not (np.isfinite(values).all() and rising.all()):
        if len(codebooks) == 1:
            return [FormatError(f"{records[0]['name']!r}: codebook must be finite and strictly increasing")]
        return [_code_tables([r], [c])[0] for r, c in zip(records, codebooks)]  # which ones
    dtypes = [r["dtype"] for r in records]
    if len(set(dtypes)) == 1:
        table = float32_to_bits(values, dtypes[0])
        if finite_bits(table, dtypes[0]).all():
            return np.split(table, ends[:-1])
    return [_code_table(r, c) for r, c in zip(records, codebooks)]


def _code_table(record: dict, codebook: np.ndarray) -> np.ndarray | FormatError:
    """One (finite, increasing) codebook as its dtype's bit patterns, or the error for an entry that rounds to inf."""
    table = float32_to_bits(codebook, record["dtype"])
    finite = finite_bits(table, record["dtype"])
    if finite.all():
        return table
    entry = float(codebook[np.argmin(finite)])
    return FormatError(f"{record['name']!r}: codebook entry {entry:g} is not finite as {record['dtype']}")


def _nbytes(record: dict) -> int:
    return math.prod(record["shape"]) * itemsize(record["dtype"])


def _too_big(record: dict) -> LimitError:
    return LimitError(f"{record['name']!r} ({record['shape']}) does not fit in memory")


def _output_buffers(sizes: dict[int, int], allocate: Allocator) -> dict[int, np.ndarray | None]:
    """Views of one fresh uint8 buffer, aligned; if that does not fit, a buffer each (None where even that fails)."""
    offsets = list(itertools.accumulate((-(-size // OUTPUT_ALIGNMENT) * OUTPUT_ALIGNMENT for size in sizes.values()),
                                        initial=0))
    try:
        buffer = allocate(offsets[-1])
        return {n: buffer[start:start + size] for (n, size), start in zip(sizes.items(), offsets)}
    except MemoryError:
        return {n: _try_allocate(size, allocate) for n, size in sizes.items()}


def _try_allocate(size: int, allocate: Allocator) -> np.ndarray | None:
    try:
        return allocate(size)
    except MemoryError:
        return None


def _entropy_stage(record: dict, section: memoryview) -> tuple:
    """Undo the entropy stage, or get it ready for the lookup to undo: ('raw', bytes), or
    ('kmeans', stream, count, width, frame, float32 codebook, float32 scales or None), frame being the lookup job's
    last items: (FRAME_PACKED,) for packed indices, or a stream the C extension decodes in its own threads,
    (FRAME_ZSTD,) for a zstd frame of them (NATIVE_ZSTD) and (FRAME_RANS, counts) for a rANS stream (and for
    rans-grouped and rans-trellis ones, the job's further items, bitpack.LookupJob)."""
    count = math.prod(record["shape"])
    if record["encoding"] == ENCODING_RAW:
        return ENCODING_RAW, entropy.decode_bytes(section, count * itemsize(record["dtype"]), record["entropy"])
    k, stage = record["codebook_size"], record["entropy"]
    side = read_side(record, section)
    payload, codebook, scales = section[side.size:], side.codebook, side.scales
    if bitpack.NATIVE_ZSTD and k > 1 and stage in (ENTROPY_ZSTD, ENTROPY_ZSTD_ALIGNED):
        frame, width = entropy.index_frame(payload, count, record["bits"], stage)
        return ENCODING_KMEANS, frame, count, width, (bitpack.FRAME_ZSTD,), codebook, scales
    if bitpack.native_lookup is not None and k > 1 and stage in SLOW_STAGES:
        width = 8 if k <= 1 << MAX_BITS else bitpack.WIDE  # the C decoder's indices: uint8 or (2.3) uint16
        if stage in (ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS):
            row = matrix_shape(record["shape"])[1]
            stream, params, axis = entropy.rans_grouped_frame(payload, count, k, row, stage)
            frame = (bitpack.FRAME_RANS, None, params, axis, int(stage == ENTROPY_RANS_TRELLIS))
        else:
            stream, counts = entropy.rans_frame(payload, count, k, stage)
            frame = (bitpack.FRAME_RANS, counts)
        return ENCODING_KMEANS, stream, count, width, frame, codebook, scales
    stream, width = entropy.decode_stream(payload, count, record["bits"], k, stage, matrix_shape(record["shape"])[1])
    try:
        stream = bitpack.check_stream(stream, count, width)
    except ValueError as exc:
        raise FormatError(f"{record['name']!r}: packed indices: {exc}") from None
    return ENCODING_KMEANS, stream, count, width, (bitpack.FRAME_PACKED,), codebook, scales
