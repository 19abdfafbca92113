"""Entropy-constrained scalar quantization: the codebook and cells that minimise D + λ·R with R the entropy of
the indices, which is what the entropy stage codes them at (Chou, Lookabaugh and Gray's entropy-constrained
Lloyd algorithm, in one dimension, on a tensor's value histogram).

k-means minimises the error for a given number of levels; once indices are entropy-coded, the number of levels
costs nothing by itself and the entropy is the rate. A cell then belongs to the level of least
(x - c)² + λ·(-log2 p): boundaries move away from the frequent levels, levels that do not pay for their bits
empty and vanish, and the quantizer tends to a uniform one with a wide dead zone. On the bench's LLaMA factors in
the SVD gauge (gauge.py; peaked, heavy-tailed values) that is 1.5 to 6 dB over k-means at the same index entropy,
below 2 bits a value; on the near-Gaussian MiniLM factors about 0.3 dB.

The decoder needs nothing new: the levels are a codebook like any other, and only the encoder's choice of index
(a threshold per pair of neighbours instead of the midpoint) differs.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .quantize import Fit, Histogram, as_codebook

try:
    from ._kmeans import fit_entropy as native_fit_entropy
except ImportError:  # no C compiler at install: the rate-distortion targets say they need it (fit)
    native_fit_entropy = None

MAX_ITERATIONS = 100
"""Lloyd iterations at most; the cells usually stop moving within 10-30 (an iteration is O(k log n))."""
MAX_LEVELS = 256
"""The most levels a codebook holds by default (8-bit indices); 2.3's rANS-coded records hold up to 4,096
(`max_levels`)."""
MAX_START = 4096
"""Levels of the starting grid at most (a grid finer than the bins adds nothing: at most one level per bin)."""


def fit(histogram: Histogram, slope: float, level_bits: float = 0.0, start: np.ndarray | None = None) -> Fit:
    """The entropy-constrained quantizer at `slope` (λ, in squared value units per bit) where each level costs
    `level_bits` in the codebook besides its indices, with at most MAX_LEVELS levels. By default it starts from
    a uniform grid at the step a uniform quantizer has at this slope at high rate (D = Δ²/12,
    dD/dR = -2·ln 2·D), and the iterations, which only merge and move levels, decide how many to keep. (Measured
    on the bench's LLaMA LoRA r=16 at 2 bits/param, entries priced at 16 bits: ΔW SQNR 23.1 dB and next-token KL
    0.0012, against 23.1 dB and 0.0016 from a grid at half that step, and 21.6 dB and 0.0009 from the k-means
    codebook of about 2^(rate + 1.5) levels, which costs a k-means fit as well: --bpp 2 encode of the 28.3M-param
    adapter 5.7 s against 11.2 s.) Bins are whole: each goes to one cell. The thresholds between cells are the
    cost crossings of the final levels, kept between the cells' bins. Where the grid keeps more levels than a
    codebook holds (heavy tails at 7-8 bits a value), it starts again from the companded grid (`companded`); a
    given `start` has at most MAX_LEVELS levels, and the iterations never add one."""
    return _fit(histogram, slope, level_bits, start, MAX_LEVELS)[0]


def ladder(histogram: Histogram, slopes: np.ndarray, level_bits: float = 0.0, max_levels: int = MAX_LEVELS) -> list[Fit]:
    """`fit` at each of `slopes`, steepest first. Once one slope's grid keeps more levels than a codebook holds,
    every finer slope's would too: those start from the companded grid straight away (--bpp 8 of the 28.3M-param
    LLaMA-shaped adapter: 12.5 s, against 14.3 s with each rung trying its grid first and 11.1 s when those rungs
    were given up)."""
    fits, start = [], None
    for slope in slopes:
        fitted, restart = _fit(histogram, float(slope), level_bits, start, max_levels)
        fits.append(fitted)
        start = restart if restart is not None else start
    return fits


def _fit(histogram: Histogram, slope: float, level_bits: float, start: np.ndarray | None,
         max_levels: int) -> tuple[Fit, np.ndarray | None]:
    """`fit`, and the companded grid it started again from (None if it did not)."""
    if native_fit_entropy is None:
        raise InputError("the rate-distortion targets need sqz's C extension sqz._kmeans, which was not built: "
                         "reinstall sqz where a C compiler is at hand, or use -b")
    weight, sums, squares = histogram
    centers = sums / weight
    if start is not None and len(start) > max_levels:
        raise ValueError(f"a start of {len(start)} levels: a codebook holds at most {max_levels}")
    grid = start is None
    if grid:
        step = math.sqrt(6 * slope / math.log(2))
        count = min(int((centers[-1] - centers[0]) / step) + 1 if step > 0 else MAX_START, MAX_START, centers.size)
        start = np.linspace(centers[0], centers[-1], count) if count > 1 else centers[:1].copy()
    first, restart = _cells(histogram, start, slope, level_bits), None
    if first.size > max_levels and grid:
        restart = companded(histogram, max_levels)
        first = _cells(histogram, restart, slope, level_bits)
    w, s, q = (np.add.reduceat(a, first) for a in (weight, sums, squares))
    levels, codebook = s / w, as_codebook(s / w)
    thresholds = None
    if codebook.size == levels.size and levels.size > 1:  # else float32 merged two levels: index by the nearest
        lengths = -np.log2(w / w.sum()) + level_bits / w
        crossings = (levels[:-1] + levels[1:]) / 2 + slope * (lengths[1:] - lengths[:-1]) / (
            2 * (levels[1:] - levels[:-1]))
        thresholds = np.clip(crossings, centers[first[1:] - 1], np.nextafter(centers[first[1:]], -np.inf))
    return Fit(codebook, _sse(codebook, w, s, q), w, thresholds, slope), restart


def _cells(histogram: Histogram, start: np.ndarray, slope: float, level_bits: float) -> np.ndarray:
    """The first bin of each cell the kernel's iterations end with."""
    weight, sums, _ = histogram
    return np.frombuffer(native_fit_entropy(weight, sums, np.asarray(start, np.float64), slope, level_bits,
                                            MAX_ITERATIONS), dtype=np.int32)


def companded(histogram: Histogram, count: int) -> np.ndarray:
    """`count` levels (fewer where bins are fewer) spaced as a fixed-rate quantizer's are at high rate, with
    density ∝ f^(1/3) of the values' density f (Panter and Dite): where the slope's uniform grid would keep
    more levels than a codebook holds (heavy tails at 7-8 bits a value), the iterations start from these."""
    weight, sums, _ = histogram
    centers = sums / weight
    if centers.size <= count:
        return centers.copy()
    gaps = np.diff(centers)
    widths = np.concatenate(([gaps[0]], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1]]))  # each bin's share of the line
    mass = np.cbrt(weight) * np.power(widths, 2 / 3)  # f^(1/3) integrated over the bin: (w/Δ)^(1/3)·Δ
    return np.unique(np.interp((np.arange(count) + 0.5) / count * mass.sum(), np.cumsum(mass) - mass / 2, centers))


def mean(histogram: Histogram) -> Fit:
    """The one-level quantizer: every value decodes as the mean (a zero-bit group)."""
    w, s, q = (np.array([a.sum()]) for a in histogram)
    codebook = as_codebook(s / w)
    return Fit(codebook, _sse(codebook, w, s, q), w)


def _sse(codebook: np.ndarray, w: np.ndarray, s: np.ndarray, q: np.ndarray) -> float:
    c = codebook.astype(np.float64)
    return float(np.maximum(q - 2 * c * s + w * c * c, 0).sum())


def slopes(histogram: Histogram, rates: np.ndarray) -> np.ndarray:
    """A ladder of slopes that land near the given index rates (bits a value): at high rate dD/dR of a quantizer
    is -2·ln 2·D with D ≈ σ²·2^(-2R)."""
    weight, _, squares = histogram
    power = float(squares.sum() / weight.sum())
    return 2 * math.log(2) * power * np.exp2(-2 * np.asarray(rates, np.float64))
