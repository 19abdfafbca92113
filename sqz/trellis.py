"""Trellis-coded quantization (TCQ) with entropy coding: the quantizer of a rate target's factors (format 2.5).

A scalar quantizer, even the entropy-constrained one (entropy_constrained.py), stays 1.53 dB (a quarter of a bit a
value) from the rate-distortion bound at high rate: its cells are intervals. TCQ (Marcellin and Fischer 1990; with
entropy coding, Fischer and Wang 1992) quantizes a sequence to a path through an 8-state trellis over a uniform
grid of levels: a state allows one class of levels (every other one, i mod 2), and the level taken decides the next
state (i mod 4). The decoder walks the trellis from the indices alone. Each value sees a grid twice as coarse as the
levels, yet the paths together reach every level: 0.9-1.1 dB more SQNR than the entropy-constrained scalar quantizer
at the same rate on Gaussian values from 1 to 4.5 bits a value (within 0.5 dB of the Gaussian bound), and on the
MiniLM LoRA r=2's factors in the SVD gauge from 1 to 2.4 (0.5 dB at 0.7).

The indices are coded as rans-grouped codes a scalar quantizer's (entropy.py): a factor's components (A' rows, B'
columns) differ in spread, and each is a group with its own discrete Gaussian, here restricted to the class of each
index's state. The encoder is the Viterbi search (sqz._trellis) of the path of least squared error plus slope x
bits, in the stream's order, each index costing -log2 of its probability under that model; the groups' models are
refitted from the path and the search run again with the levels at the centroids of the values each took. At the slope of an entropy-constrained fit, a grid of half its step lands at about its rate. The caller
(codec.py) keeps a path only where it costs less than the scalar quantizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import entropy
from .constants import TRELLIS_MIN_ENTRIES

try:
    from ._trellis import viterbi as native_viterbi
except ImportError:  # no C compiler at install: rate targets quantize with the scalar quantizer alone
    native_viterbi = None

STEP_MANTISSAS = (4, 6)
"""The grid's step is g·2^e for one of these g, the nearest to the slope's step: levels on it cost a GRID codebook
(spec §4.2) 1 bit an entry (g = 4: gaps of 0 on the grid 2^(e+2)) or about 3 (g = 6), where free centroids cost 8-16.
A trellis codebook has about twice the levels of the scalar quantizer at the same slope, which on small factors at
high rates is most of what the trellis saves. Measured on a rank-8 adapter of 2,048-value Gaussian factors, against
any g of 4-7 (up to 4 bits an entry): `--bpp 8` 42.3 dB of ΔW SQNR at 7.98 bits/param against 41.7 at 7.91 (where
no factor took the trellis); the MiniLM LoRA r=2's `--bpp 4` 19.98 against 19.66 dB."""


CENTROID_LEVELS = 256
"""The levels are moved to their centroids and searched again only on grids of at most this many levels: on finer
ones (7-8 bits a value) the centroids' codebook costs more than the error they save (`--bpp 8` of the bench's
28.3M-parameter adapter kept them on 4 of 287 factors), and the search costs encode time."""
MOMENTS = (0, 0)
"""The search prices indices under each group's Gaussian of the last path's moments (entropy.fit_gauss with no search
either side, half its cost): the payload fits its own, and this one only steers the path."""


@dataclass(frozen=True)
class Path:
    """A tensor quantized on the trellis: codebook[indices] are the reconstructed values (codebook float64,
    strictly increasing, as float32 too)."""

    codebook: np.ndarray
    indices: np.ndarray  # uint16, in the tensor's order (row-major)


def quantize(values: np.ndarray, slope: float, max_levels: int, row: int) -> list[Path]:
    """Trellis paths of `values` (float64, flat, rows of `row` values) at `slope` (squared value units a bit, as the
    entropy-constrained fit's), on a grid of about half the step a scalar quantizer has at that slope (STEP_MANTISSAS):
    a Viterbi search on the grid under the models of the values rounded to it, then one with the levels moved to the
    centroids of the values that path gave them, under its models. Both paths are returned (the cheaper codebook
    against the smaller error: the caller prices them; the centroids' only on grids of at most CENTROID_LEVELS);
    none where the grid would need more than `max_levels` levels or fewer than TRELLIS_MIN_ENTRIES. (A second search
    on the grid under the first path's models measured no better: BD-rate against the paper's pipeline on the MiniLM
    LoRA r=2 -21.6% against -21.5%, SineLoRA r=8 -21.6% against -21.7%.)"""
    if native_viterbi is None or values.size == 0 or not slope > 0:
        return []
    step = _step(math.sqrt(6 * slope / math.log(2)) / 2)
    low, high = math.floor(float(values.min()) / step) - 1, math.ceil(float(values.max()) / step) + 1
    low -= low % 4  # the first level's index is 0: i mod 4 is the grid's own subset
    if not TRELLIS_MIN_ENTRIES <= high - low + 1 <= max_levels:
        return []
    grid = np.arange(low, high + 1, dtype=np.float64) * step
    k = grid.size
    axis = entropy.group_axis(values.size, row)
    grouped = entropy.in_groups(values, row, axis)  # [groups, length]: the stream's order
    stream, length = np.ascontiguousarray(grouped).ravel(), grouped.shape[1]

    def search(levels: np.ndarray, last: np.ndarray) -> np.ndarray:
        """The path on `levels` under the groups' models of the `last` path's indices."""
        centres, widths, _ = entropy.fit_gauss(entropy.group_counts(last, k, length, 0), MOMENTS)
        bits = entropy.trellis_bits(entropy.gauss_counts(centres, widths, k))
        return np.frombuffer(native_viterbi(stream, levels, bits, slope), dtype=np.uint16)

    def path(levels: np.ndarray, indices: np.ndarray) -> Path | None:
        in_order = indices.reshape(-1, row) if axis == 0 else indices.reshape(row, -1).T
        return _trimmed(levels, np.ascontiguousarray(in_order).ravel())

    indices = search(grid, np.clip(np.rint(stream / step).astype(np.int64) - low, 0, k - 1))
    paths = [path(grid, indices)]
    if k > CENTROID_LEVELS:
        return [p for p in paths if p is not None]
    counts = np.bincount(indices, minlength=k)
    centroids = np.where(counts > 0, np.bincount(indices, weights=stream, minlength=k) / np.maximum(counts, 1), grid)
    if np.all(np.diff(centroids.astype(np.float32)) > 0):
        paths.append(path(centroids, search(centroids, indices)))
    return [p for p in paths if p is not None]


def _step(ideal: float) -> float:
    """The step g·2^e nearest `ideal`, g one of STEP_MANTISSAS."""
    exponent = math.floor(math.log2(ideal / STEP_MANTISSAS[0]))
    return min((g * 2.0 ** e for g in STEP_MANTISSAS for e in (exponent, exponent + 1)), key=lambda s: abs(s - ideal))


def _trimmed(levels: np.ndarray, indices: np.ndarray) -> Path | None:
    """The path with the grid's unused levels cut: any above the last taken, and below the first taken in fours (an
    index keeps its value mod 4, which the trellis reads); None if fewer than TRELLIS_MIN_ENTRIES remain."""
    first, last = int(indices.min()), int(indices.max())
    first -= first % 4
    if last - first + 1 < TRELLIS_MIN_ENTRIES:
        last = first + TRELLIS_MIN_ENTRIES - 1
        if last >= levels.size:
            return None
    return Path(levels[first:last + 1], (indices - first).astype(np.uint16))
