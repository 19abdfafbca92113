"""Per-tensor optimal 1-D k-means quantization (the paper, section 3.1 and appendix B), fitted on every value.

By default (sample = 0) the centroids are the exact optimum over all of a tensor's values: its values are
binned (a float16 or bfloat16 tensor has at most 65,536 distinct values, one bin each; so has a float32 tensor
of at most 65,536 values; larger float32/float64 tensors go into bins of float16 precision, each keeping the
exact count, sum and sum of squares of its values) and the C kernel sqz._kmeans solves the weighted problem on
the bins in O(k n log n) (one codebook of 128 or more entries: by Lagrangian relaxation, ~30 passes of O(n log n)).
For 16-bit and small tensors that is the optimum over every value; for larger wider ones, the optimum among
partitions that keep each bin whole. Without the kernel (no C compiler at install), kmeans1d fits every value
instead: the same optimum, slower.

With sample > 0 the centroids are kmeans1d's on a seeded uniform sample of that many values, bit-exactly the
paper's pipeline (`--sample 10000`): the sample clips the tails, which costs up to 20 dB at 8 bits.
Every value is then mapped to its nearest centroid.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import kmeans1d
import numpy as np

from .constants import MAX_BITS, MIN_BITS
from .dtypes import finite_bits, index_dtype
from .errors import InputError

try:
    from ._kmeans import fit as native_fit
    from ._kmeans import fit_one as native_fit_one
    from ._kmeans import pattern_counts as native_pattern_counts
except ImportError:  # installed without a C compiler: kmeans1d on every value gives the same optimum, slower
    native_fit = native_fit_one = native_pattern_counts = None

DEFAULT_SAMPLE = 0
"""0 = fit on every value. The paper fitted on 10,000 sampled values (PAPER_SAMPLE)."""
PAPER_SAMPLE = 10_000
MAX_BINS = 1 << 16
"""Bins of a float32/float64 tensor's histogram, at most (the kernel's table is k x bins int32: 64 MiB at k = 256)."""
PRICED_MIN_K = 128
"""One codebook size at least this large (-b 7, -b 8) is fitted by the kernel's Lagrangian pass (fit_one: ~30
O(n log n) passes instead of k rows; 3-6x faster at k = 256, the same optimum), falling back to the full programme
where no price gives exactly k clusters."""
BIN_MANTISSA_BITS = 10
"""float32/float64 values are binned by their float32 pattern with all but this many mantissa bits dropped
(float16's precision, relative width 2^-10); coarser if that still leaves more than MAX_BINS bins."""


@dataclass(frozen=True)
class Quantized:
    """A tensor as codebook + indices: value i is reconstructed as codebook[indices[i]]."""

    codebook: np.ndarray  # float32, strictly increasing, 1 <= len <= 2**bits
    indices: np.ndarray  # uint8 (uint16 for more than 256 entries), flat, same count as the tensor
    sample_size: int  # how many values the centroids were fitted on
    seed: int
    counts: np.ndarray  # int64, how many values each entry stands for (the index histogram)


def tensor_seed(base_seed: int, name: str) -> int:
    """Per-tensor sampling seed: independent of tensor order, so encoding is reproducible."""
    return (base_seed + zlib.crc32(name.encode("utf-8"))) & 0xFFFFFFFF


def draw_sample(values: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """Uniform sample without replacement of at most `sample` values (0 = all values)."""
    if sample == 0 or values.size <= sample:
        return values
    rng = np.random.default_rng(seed)
    return values[rng.choice(values.size, size=sample, replace=False)]


def _check_bits(bits: int) -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    return 1 << bits


def as_codebook(centroids: np.ndarray) -> np.ndarray:
    """float32 rounding can merge neighbours; the codebook must stay strictly increasing."""
    return np.unique(np.asarray(centroids, dtype=np.float64).astype(np.float32))


def fit_codebook(sample: np.ndarray, bits: int) -> np.ndarray:
    """Optimal k-means centroids of the sample, k = 2**bits, as a strictly increasing float32 array.

    When the sample has no more than k distinct values, those values are the optimum (zero
    error); kmeans1d would instead return empty clusters with centroid 0.0, so they are used as-is.
    """
    k = _check_bits(bits)
    distinct = np.unique(sample)
    if distinct.size <= k:
        return as_codebook(distinct)
    return as_codebook(kmeans1d.cluster(sample, k).centroids)


Histogram = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(count, sum, sum of squares) of the values in each bin, bins in increasing order of value, float64."""


def histogram(values: np.ndarray, dtype: str) -> Histogram:
    """(count, sum, sum of squares) of the values in each bin, bins in increasing order of value, float64.

    16-bit dtypes: one bin per distinct value (by bit pattern, O(n)). Wider ones: one bin per float32 value for
    tensors of at most MAX_BINS values (exact), else one per float32 pattern with its low mantissa bits dropped
    (BIN_MANTISSA_BITS kept), so each bin is a narrow interval of values.
    """
    return _binned(values, dtype, False)[0]


def histogram_bins(values: np.ndarray, dtype: str) -> tuple[Histogram, np.ndarray]:
    """histogram(), and the bin each value fell into (int64, in the values' order): what a statistic of a subset
    of the values (a component of a factor) needs to follow a fit's cells, which are runs of whole bins."""
    hist, bins = _binned(values, dtype, True)
    assert bins is not None
    return hist, bins


def _binned(values: np.ndarray, dtype: str, with_bins: bool) -> tuple[Histogram, np.ndarray | None]:
    if dtype in SIXTEEN_BIT:
        bit_patterns = patterns(values, dtype)
        hist, order, ids = _pattern_bins(pattern_counts(bit_patterns), dtype)
        if not with_bins:
            return hist, None
        table = np.zeros(1 << 16, dtype=np.int64)
        table[order] = ids
        return hist, table[bit_patterns]
    values = np.asarray(values, dtype=np.float64)
    keys32 = values.astype(np.float32).view(np.uint32)
    first = 0 if values.size <= MAX_BINS else 23 - BIN_MANTISSA_BITS  # a small tensor: one bin per value, exact
    for drop in range(first, 32):
        keys, inverse = np.unique(keys32 >> drop, return_inverse=True)
        if keys.size <= MAX_BINS:
            break
    weight = np.bincount(inverse, minlength=keys.size).astype(np.float64)
    sums, squares = np.bincount(inverse, values, keys.size), np.bincount(inverse, values * values, keys.size)
    order = np.argsort(sums / weight, kind="stable")  # bins are disjoint intervals: their means sort like them
    hist = weight[order], sums[order], squares[order]
    if not with_bins:
        return hist, None
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return hist, rank[inverse.ravel()]


SIXTEEN_BIT = ("F16", "BF16")
_NONFINITE = {d: np.flatnonzero(~finite_bits(np.arange(1 << 16, dtype=np.uint16), d)) for d in SIXTEEN_BIT}


def patterns(values: np.ndarray, dtype: str) -> np.ndarray:
    """The uint16 bit patterns of an F16 or BF16 tensor's values (free for float16 values: a view)."""
    if dtype == "F16":
        return values.astype(np.float16, copy=False).view(np.uint16)
    return (values.astype(np.float32, copy=False).view(np.uint32) >> 16).astype(np.uint16)


def pattern_counts(bit_patterns: np.ndarray) -> np.ndarray:
    """How many values have each of the 65,536 patterns (int64), by the C kernel where it was built."""
    if native_pattern_counts is None:
        return np.bincount(bit_patterns, minlength=1 << 16)
    return np.frombuffer(native_pattern_counts(np.ascontiguousarray(bit_patterns)), dtype=np.int64)


def pattern_histogram(counts: np.ndarray, dtype: str) -> Histogram:
    """histogram() of a 16-bit tensor from its pattern counts."""
    return _pattern_bins(counts, dtype)[0]


def _pattern_bins(counts: np.ndarray, dtype: str) -> tuple[Histogram, np.ndarray, np.ndarray]:
    """pattern_histogram(), the patterns present in increasing order of value, and the bin of each."""
    present = np.flatnonzero(counts)
    bin_values = _pattern_values(present, dtype)
    order = np.argsort(bin_values, kind="stable")
    weight, value = counts[present][order].astype(np.float64), bin_values[order]
    first = np.concatenate(([True], value[1:] != value[:-1]))
    return _merge_equal(weight, weight * value, weight * value * value, first), present[order], np.cumsum(first) - 1


def _pattern_values(patterns: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (patterns.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return patterns.astype(np.uint16).view(np.float16).astype(np.float64)


def _merge_equal(weight: np.ndarray, sums: np.ndarray, squares: np.ndarray,
                 first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-0.0 and +0.0 are two patterns of one value: one bin, so that no cluster boundary falls between them
    (`first` marks each value's first pattern)."""
    if first.all():
        return weight, sums, squares
    starts = np.flatnonzero(first)
    return tuple(np.add.reduceat(a, starts) for a in (weight, sums, squares))  # type: ignore[return-value]


def fit_histogram(values: np.ndarray, dtype: str, bits: int, counts: np.ndarray | None = None) -> np.ndarray:
    """Optimal k-means codebook over every value (k = 2**bits), by the C kernel on the value histogram (a 16-bit
    tensor's made from its pattern `counts` where given)."""
    k = _check_bits(bits)
    if native_fit is None:
        return fit_codebook(np.asarray(values, dtype=np.float64), bits)
    hist = histogram(values, dtype) if counts is None else pattern_histogram(counts, dtype)
    return fit_histogram_sizes(hist, (k,))[k].codebook


@dataclass(frozen=True)
class Fit:
    """The optimal codebook of one size, with what a bit allocator needs to know of it."""

    codebook: np.ndarray  # float32, strictly increasing
    sse: float  # squared error over every value, before the codebook is rounded to float32
    counts: np.ndarray  # values per cluster: the index histogram, whose entropy the entropy stage approaches
    thresholds: np.ndarray | None = None  # where a value's index changes, if not at the midpoints (assign)
    slope: float | None = None  # an entropy-constrained fit's slope (squared error a bit), which a trellis path may take


def fit_sizes(values: np.ndarray, dtype: str, sizes: tuple[int, ...]) -> dict[int, Fit]:
    """The optimal k-means fit for each codebook size k in `sizes` (k = 1 is the mean; a k beyond the number of
    distinct values gets one entry each), from one run of the C kernel: its table's row k - 1 is the best
    partition into k clusters, for every k."""
    return fit_histogram_sizes(histogram(values, dtype), sizes)


def fit_histogram_sizes(hist: Histogram, sizes: tuple[int, ...]) -> dict[int, Fit]:
    """fit_sizes on a value histogram already made."""
    weight, sums, squares = hist
    ks = sorted({min(k, weight.size) for k in sizes})
    if native_fit is None:
        raise InputError("k-means by codebook size needs sqz's C extension sqz._kmeans, which was not built")
    priced = native_fit_one(weight, sums, squares, ks[0]) if len(ks) == 1 and ks[0] >= PRICED_MIN_K else None
    partitions = {ks[0]: priced} if priced is not None else dict(zip(ks, native_fit(weight, sums, squares, ks)))
    fits = {}
    for k in sizes:
        starts = np.frombuffer(partitions[min(k, weight.size)], dtype=np.int32)
        w, s1, s2 = (np.add.reduceat(a, starts) for a in (weight, sums, squares))
        fits[k] = Fit(as_codebook(s1 / w), float(np.maximum(s2 - s1 * s1 / w, 0).sum()), w)
    return fits


def assign(values: np.ndarray, codebook: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest codebook entry for every value (ties go to the lower entry), or of the cell between
    `thresholds` it falls in (an entropy-constrained fit's, entropy_constrained.py; a value on one goes lower)."""
    if thresholds is None:
        cb = codebook.astype(np.float64)
        thresholds = (cb[:-1] + cb[1:]) / 2
    return np.searchsorted(thresholds, values, side="left").astype(index_dtype(codebook.size))


def quantize(values: np.ndarray, bits: int, sample: int = DEFAULT_SAMPLE, seed: int = 0,
             dtype: str = "F64", codebook: np.ndarray | None = None, thresholds: np.ndarray | None = None) -> Quantized:
    """Quantize a flat float array whose values are of `dtype` (the histogram's bins depend on it), given as
    float16, float32 or float64 (any that holds them exactly); NaN/inf are rejected (they would poison the
    centroids). A `codebook` fitted already (fit_sizes, or entropy-constrained with its `thresholds`) is used as
    it is. A 16-bit tensor is counted by bit pattern once: the counts give its histogram and its finiteness, and
    every value's index is then one table lookup."""
    flat = np.ascontiguousarray(values).ravel()
    if flat.dtype not in (np.float16, np.float32, np.float64):
        flat = flat.astype(np.float64)
    if flat.size == 0:
        raise InputError("cannot quantize an empty tensor")
    bit_patterns = patterns(flat, dtype) if dtype in SIXTEEN_BIT else None
    counts = None if bit_patterns is None else pattern_counts(bit_patterns)
    bad = int(np.count_nonzero(~np.isfinite(flat))) if counts is None else int(counts[_NONFINITE[dtype]].sum())
    if bad:
        raise InputError(f"tensor has {bad} NaN/inf value(s); sqz quantizes finite values only")
    if codebook is not None or sample == 0:  # every value: no sample, and no seed to record (it would cost
        codebook = fit_histogram(flat, dtype, bits, counts) if codebook is None else codebook  # ~4 header bytes)
        fitted, seed = flat.size, 0
    else:
        fitted_on = draw_sample(flat, sample, seed).astype(np.float64)
        codebook, fitted = fit_codebook(fitted_on, bits), fitted_on.size
    if counts is None:
        indices = assign(flat, codebook, thresholds)
        index_counts = np.bincount(indices, minlength=codebook.size)
    else:
        present = np.flatnonzero(counts)
        table = np.zeros(1 << 16, dtype=index_dtype(codebook.size))
        table[present] = assign(_pattern_values(present, dtype), codebook, thresholds)
        indices = np.take(table, bit_patterns)
        index_counts = np.bincount(table[present], weights=counts[present], minlength=codebook.size).astype(np.int64)
    return Quantized(codebook=codebook, indices=indices, sample_size=int(fitted), seed=seed, counts=index_counts)


def dequantize(codebook: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float32 reconstruction codebook[indices]."""
    return np.take(codebook.astype(np.float32), indices)
