"""Per-tensor optimal 1-D k-means quantization (the paper, section 3.1 and appendix B).

Centroids are fitted by `kmeans1d` (exact dynamic programme, O(kn + n log n)) on a seeded uniform
sample of the values; every value is then mapped to its nearest centroid. Fitting is the
expensive part (about 0.6 s at k = 256 on 10,000 values), and kmeans1d releases the GIL inside
its C core, so callers may fit many tensors on a thread pool.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import kmeans1d
import numpy as np

from .constants import MAX_BITS, MIN_BITS
from .errors import InputError

DEFAULT_SAMPLE = 10_000


@dataclass(frozen=True)
class Quantized:
    """A tensor as codebook + indices: value i is reconstructed as codebook[indices[i]]."""

    codebook: np.ndarray  # float32, strictly increasing, 1 <= len <= 2**bits
    indices: np.ndarray  # uint8, flat, same count as the tensor
    sample_size: int  # how many values the centroids were fitted on
    seed: int


def tensor_seed(base_seed: int, name: str) -> int:
    """Per-tensor sampling seed: independent of tensor order, so encoding is reproducible."""
    return (base_seed + zlib.crc32(name.encode("utf-8"))) & 0xFFFFFFFF


def draw_sample(values: np.ndarray, sample: int, seed: int) -> np.ndarray:
    """Uniform sample without replacement of at most `sample` values (0 = all values)."""
    if sample == 0 or values.size <= sample:
        return values
    rng = np.random.default_rng(seed)
    return values[rng.choice(values.size, size=sample, replace=False)]


def fit_codebook(sample: np.ndarray, bits: int) -> np.ndarray:
    """Optimal k-means centroids of the sample, k = 2**bits, as a strictly increasing float32 array.

    When the sample has no more than k distinct values, those values are the optimum (zero
    error); kmeans1d would instead return empty clusters with centroid 0.0, so they are used as-is.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InputError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")
    k = 1 << bits
    distinct = np.unique(sample)
    if distinct.size <= k:
        centroids = distinct
    else:
        centroids = np.asarray(kmeans1d.cluster(sample, k).centroids, dtype=np.float64)
    # float32 rounding can merge neighbours; the codebook must stay strictly increasing.
    return np.unique(centroids.astype(np.float32))


def assign(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry for every value (ties go to the lower entry)."""
    cb = codebook.astype(np.float64)
    midpoints = (cb[:-1] + cb[1:]) / 2
    return np.searchsorted(midpoints, values, side="left").astype(np.uint8)


def quantize(values: np.ndarray, bits: int, sample: int = DEFAULT_SAMPLE, seed: int = 0) -> Quantized:
    """Quantize a flat float array; NaN/inf are rejected (kmeans1d would poison the centroids)."""
    flat = np.ascontiguousarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise InputError("cannot quantize an empty tensor")
    if not np.isfinite(flat).all():
        bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise InputError(f"tensor has {bad} NaN/inf value(s); sqz quantizes finite values only")
    fitted_on = draw_sample(flat, sample, seed)
    codebook = fit_codebook(fitted_on, bits)
    return Quantized(codebook=codebook, indices=assign(flat, codebook), sample_size=int(fitted_on.size), seed=seed)


def dequantize(codebook: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float32 reconstruction codebook[indices]."""
    return np.take(codebook.astype(np.float32), indices)
