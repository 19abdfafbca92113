"""The rate-distortion encoder's plan: the encoding of each LoRA factor that meets a --bpp, --size or --sqnr target.

For every pair whose factors are both quantized, each factor is offered entropy-constrained quantizers at a ladder
of slopes (entropy_constrained.py: the index rate falls in steps of about a quarter bit, and for the same index
entropy the error is up to 6 dB below k-means' on heavy-tailed factors), its mean (a zero-bit group), its exact
bytes, and where it is small (KMEANS_MAX_BINS) its k-means codebooks of every width. Each candidate's rate is
estimated from its index entropy (what the entropy stage approaches) plus its codebook. A pair's options are its
A's candidates paired with its B's, each priced by the error of the pair's ΔW it leaves: in the SVD gauge (gauge.py;
every pair the gauge takes) exactly, from each candidate's moments per component (component_moments), since where
both factors are coarse their errors compound to less than their sum, with the part that shrinks ΔW's own
components counted twice (BIAS_WEIGHT); else by that sum to first order (an error δA reaches ΔW as s·B·δA, so A's
squared error is weighted by s²·||B||²/r, and likewise B's). Sine pairs are weighted
by s·ω/γ and the mean of cos²(ω·B@A), the sine's slope. Each pair's error is then divided by ||ΔW||^1.5 (not for
--sqnr, which asks for the SQNR of all of ΔW). One slope over all pairs (allocate.py) picks the options; the caller
encodes them, checks the real file against the target, and plans again with the budget corrected by what the
estimate missed.

Why pairs and not tensors: at 0.5-1.5 bits/param the first-order sum overstates a coarse pair's error by up to a
third, and most where both factors are coarsest, so it planned by a wrong price exactly where bits are scarce. Priced
as pairs (with the shrinkage of ΔW's components counted twice, BIAS_WEIGHT), the bench's plans gained ΔW SQNR at
0.25-1.5 bits/param (MiniLM SineLoRA r=4 at --bpp 1: 3.8 dB against 2.9) and next-token KL on its LLM adapters
(LoRA r=2 at --bpp 1: 0.37 against 0.70), the same above 3 bits/param, where the product of two factors' errors is
negligible.

Why divided by a power of ||ΔW||, measured on the bench's LLaMA (bench/llm.py): the next-token KL caused by an
error in one module falls off with that module's ||ΔW||, so the summed absolute error starved the small modules
(k_proj, v_proj) of bits: on its LoRA r=16 at 2 bits/param the KL was 0.47 with summed absolute error, 0.12 with
error relative to ||ΔW||², 0.014 with that in the SVD gauge (the paper's fixed 2-bit widths: 0.074). The power
is a measured compromise. BD-rate on KL against the paper's pipeline over the 7 LLM adapters at 1-4 bits/param
(with entropy-constrained candidates started from k-means codebooks): -32.4% relative to ||ΔW||², -33.1% to
||ΔW||^1.5, -31.6% to ||ΔW||, so KL cannot tell them apart; BD-rate on ΔW SQNR over the MiniLM adapters: -3%,
-8%, -12%. Below 1.5 a module with 1,000x less ΔW energy than the others gets no bits at all (test_ratecontrol).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import allocate, entropy_constrained
from . import grid as grid_codebook
from .adapter import Pair, SourceTensor
from .codec import (
    BYTE_WORTH_NS,
    CODEBOOK_FLOOR,
    CODEBOOK_TOLERANCE,
    GRID_DECODE_NS,
    GRID_MIN_SHARE,
    GRID_PRICED_ENTRIES,
    grid_bit_cost,
    width_of,
)
from .constants import MAX_WIDE_BITS, PAIR_SINE
from .dtypes import itemsize, to_float64, to_narrowest
from .quantize import Fit, Histogram, fit_histogram_sizes, histogram_bins

try:
    from ._kmeans import piece_sums as native_piece_sums
except ImportError:  # no C compiler at install: the targets refuse in one line before they get here (quantizer fits)
    native_piece_sums = None

RAW = 0
"""The column of the lossless candidate; then MEAN, the one-level quantizer (a zero-bit group: the factor's mean),
then the entropy-constrained quantizers, one per rate of the ladder, then for B factors with column scales
(format 2.0) the same ladder fitted on the scaled values, then k-means codebooks of 2^1 to 2^widest entries
(factors of at most KMEANS_MAX_BINS distinct values)."""
MEAN = 1
EC_STEP = 0.25
"""Entropy-constrained quantizers are fitted at slopes aimed at index rates from EC_STEP bits a value to the
widest width, EC_STEP apart (entropy_constrained.slopes)."""
MAX_WIDTH = 8
"""Index bits a factor gets at most where the format has only byte-wide indices; 2.3's rANS-coded records take up
to MAX_WIDE_BITS (prepare's `wide`)."""
KMEANS_MAX_BINS = 4096
"""A tensor of at most this many distinct values (bins) is also offered its optimal k-means codebooks of 2 to
2^widest entries (one run of the kernel, at most ~25 ms): on small factors, whose codebooks are a large share
of their bits, they beat the entropy-constrained fits at high rates."""
WIDE_FROM_RATE = 7.0
"""Only rungs aimed at index rates above this may keep more than 256 levels (2.3). Below it a 256-level codebook
costs next to nothing (on the trained-statistics LLaMA-shaped adapter's scaled B factors at 5.5 bits: 33.3 dB at 3.89
bits an index with 212 levels, 33.3 at 3.85 with 312), but only such a codebook can go to zstd, which codes a scaled
B factor's indices below their entropy (its columns' levels differ: 3.45 bits a value at 4.59 bits of entropy), which
the plan's entropy estimate does not see: with every rung free to widen, --bpp 4 of that adapter took rANS-coded
300-450-level codebooks everywhere and lost 2.3 dB (33.8 against 36.0)."""
HEADROOM_BITS = 3
"""The ladder reaches this many bits a value above the target's average (a global slope that gives one factor 3
bits more than the average gives it rarely more, and every rung is one more fit of every factor)."""
DB_PER_BIT = 6.02


def max_width(bpp: float | None = None, sqnr_db: float | None = None, most: int = MAX_WIDTH) -> int:
    """The highest index rate worth fitting for a bits/param target, or for an SQNR target (about 6 dB a bit), up to
    `most` bits."""
    average = bpp if bpp is not None else max(sqnr_db or 0.0, 0.0) / DB_PER_BIT
    return min(most, math.ceil(average) + HEADROOM_BITS)


ENTROPY_SLACK = 1.01
FRAME_BITS = 8 * 24
"""The entropy stage codes indices within about 1% of their entropy (zstd-aligned), plus a frame header."""
COMPACT_FRAME_BITS = 8 * 4
"""With rans-compact (2.1) a small tensor's payload is its entropy plus its count table (a width byte and a
count a level) plus about 3 bytes of the stream's end: 4 + 1.05 bytes a level over the entropy, measured over a
rank-2 MiniLM-shaped adapter's 72 factors at --bpp 1-3 (5-14 levels)."""
SECTION_BITS = 8 * 8
"""A section's alignment padding, on average, and its share of the header (informative: the search corrects it)."""
RELATIVE_POWER = 0.75
"""A pair's squared ΔW error is divided by its ||ΔW||² to this power (see the module's docstring)."""
ENERGY_FLOOR = 1e-4
"""A pair's error is measured relative to its own ||ΔW||² (to RELATIVE_POWER), or to this share of the adapter's
mean ||ΔW||² if that is larger (a pair that does next to nothing is not worth bits kept in proportion to it)."""
SINE_ROWS = 256
"""Rows of B@A a sine pair's ΔW energy and slope are measured on (rows of B@A are exact, so this is unbiased)."""


@dataclass(frozen=True)
class Choice:
    """What one tensor is encoded as: `bits` None is lossless; else the index width of `codebook` (0: one entry),
    fitted on the values divided by `scales` along their columns where a B factor has them, its cells split at
    `thresholds` where they are not the midpoints (an entropy-constrained fit, at `slope`: the writer may quantize
    on the trellis at that slope instead, trellis.py)."""

    bits: int | None
    codebook: np.ndarray | None = None
    scales: np.ndarray | None = None
    thresholds: np.ndarray | None = None
    slope: float | None = None


@dataclass
class Prepared:
    """Everything the plan is searched over: one row per allocated pair, one column per option, an option being a
    candidate for its A (a column of the candidate table, RAW, MEAN, ...) with one for its B."""

    names: list[str]  # the allocated tensors, each pair's A then its B
    fits: dict[str, dict[int, Fit]]  # each tensor's fit in each candidate column it has (not RAW)
    scaled: list[bool]  # per candidate column: fitted on the values divided by their column scales (B factors)
    rate: np.ndarray  # bits, [pairs, options] (inf: no option)
    distortion: np.ndarray  # squared error of ΔW, each pair's divided by a power of its ||ΔW|| or not
    options: np.ndarray  # [pairs, options, 2]: the candidate columns of A and of B
    uniform: list[np.ndarray]  # the plans that give every tensor one candidate column, as -b gives one width
    signal: float  # the same measure of ΔW itself
    scales: dict[str, np.ndarray]  # B factors' column scales (component_scales), float32

    def tensor_picks(self, picks: np.ndarray) -> np.ndarray:
        """The candidate column of each of `names` under a plan's option for each pair."""
        return self.options[np.arange(picks.size), picks].reshape(-1)

    def choices(self, picks: np.ndarray) -> dict[str, Choice]:
        """What each of `names` is encoded as, given its candidate column in `picks`."""
        return {name: self._choice(name, int(c)) for name, c in zip(self.names, picks)}

    def _choice(self, name: str, column: int) -> Choice:
        if column == RAW:
            return Choice(None)
        fit = self.fits[name][column]
        return Choice(width_of(fit.codebook.size), fit.codebook, self.scales[name] if self.scaled[column] else None,
                      fit.thresholds, fit.slope)


def lowrank_inner(b1: np.ndarray, a1: np.ndarray, b2: np.ndarray, a2: np.ndarray) -> float:
    """The Frobenius inner product <B1@A1, B2@A2> = tr(B1ᵀB2 · A2A1ᵀ), from r x r products: ||B@A||² and
    ||BA - B'A'||² without forming any [out, in] matrix. Factors as [out, r] and [r, in]."""
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def slope_weight(pair: Pair, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(e, ||ΔW||²) of a pair: ΔW's error is e times that of B@A to first order, and its energy."""
    rank = a.shape[0]
    a2, b2 = a.reshape(rank, -1), b.reshape(b.shape[0], rank)
    if pair.kind != PAIR_SINE:
        return pair.scaling ** 2, pair.scaling ** 2 * lowrank_inner(b2, a2, b2, a2)
    rows = _sine_rows(b2.shape[0])
    phase = pair.omega * (b2[rows] @ a2)
    scale = (pair.scaling / pair.gamma) ** 2
    energy = scale * float(np.square(np.sin(phase)).sum()) * b2.shape[0] / rows.size
    return scale * pair.omega ** 2 * float(np.square(np.cos(phase)).mean()), energy


MAX_SCALE_EXPONENT = 10
"""Column scales go up to 2^10: components weaker than about 1/1000 of a pair's strongest are quantized a little
coarser than their weight asks (they carry next to nothing), and decoded factors stay within float16's range."""


def component_scales(a: np.ndarray) -> np.ndarray:
    """Column scales for B in the SVD gauge (B' = U, A' = S·Vᵀ): an error in column i of B' reaches ΔW times
    ||A'_i|| = σ_i, so B' is quantized as B'_i · σ_i/σ_1 with one codebook, which weighs every element by what it
    does to ΔW, and decoded times σ_1/σ_i. Rounded to powers of two, which every codebook dtype holds exactly and
    multiply exactly. (Measured on the bench's LLaMA LoRA r=16, B quantized alone: at 2 bits/index the index
    entropy fell from 9,126 to 1,945 bits a module for 8.9 against 8.2 dB; A' needs none, its rows carry σ_i.)"""
    norms = np.sqrt(np.square(a.reshape(a.shape[0], -1)).sum(axis=1))
    top = norms.max(initial=0.0)
    with np.errstate(divide="ignore"):
        exponents = np.round(np.log2(np.where(norms > 0, top / np.where(norms > 0, norms, 1.0), np.inf)))
    return np.exp2(np.clip(exponents, 0, MAX_SCALE_EXPONENT)).astype(np.float32)


def rate_bits(fit: Fit, width: int, count: int, entry_bits: int = 32, compact: bool = False,
              energy: float | None = None) -> tuple[float, float]:
    """Estimated bits of a kmeans section, and the squared error its codebook's storage adds: codebook
    (`entry_bits` an entry: 32 in 1.x, 16 in 2.0, which stores codebooks as F16 where that is exact or costs next
    to nothing; with the tensor's `energy` (2.2) GRID where the writer would store that, grid_bits), then the
    indices at about their entropy (never more than bit-packed) with the stage's table (rans-compact's where
    `compact`, else a frame's worth), plus the section's share of alignment and header. GRID is priced only for
    codebooks of at most GRID_PRICED_ENTRIES entries (the writer tries it on any)."""
    k = fit.codebook.size
    if k == 1:
        index_bits = 0.0
    else:
        p = fit.counts / count
        entropy = float(-(p * np.log2(np.where(p > 0, p, 1))).sum())
        table = COMPACT_FRAME_BITS + (k - 1) * count_bits(int(fit.counts.max())) if compact else FRAME_BITS
        index_bits = min(count * width, ENTROPY_SLACK * count * entropy + table)
    codebook, added = float(entry_bits * k), 0.0
    if energy is not None and k <= GRID_PRICED_ENTRIES and codebook >= GRID_MIN_SHARE * count * max(width, 1):
        codebook, added = grid_bits(fit, energy, codebook)
    return index_bits + codebook + SECTION_BITS, added


def grid_bits(fit: Fit, energy: float, plain_bits: float) -> tuple[float, float]:
    """(bits, added squared error) of the fit's codebook as GRID, as codec.stored_side would choose it for a
    rate-controlled tensor: at the least error plus bits at the tensor's own slope (grid_bit_cost), with no limit
    (the error it adds estimated as Σ count·(c - c')², exact where entries are their cells' means), and only where
    it saves bytes worth its decode time; else (`plain_bits`, 0)."""
    c = fit.codebook.astype(np.float64)
    counts = fit.counts.astype(np.float64)
    allowed = max(CODEBOOK_TOLERANCE * fit.sse, CODEBOOK_FLOOR * energy)
    added = lambda x: (np.square(x - c) * counts).sum(axis=-1)  # a candidate codebook a row
    chosen = grid_codebook.choose_exponent(c, counts, added, allowed, math.inf if fit.sse else 0.0,
                                           grid_bit_cost(fit.sse, float(counts.sum())))
    if chosen is None or (plain_bits - 8 * chosen.size) / 8 * BYTE_WORTH_NS < GRID_DECODE_NS:
        return plain_bits, 0.0
    return 8 * chosen.size, chosen.added


def count_bits(count: int) -> int:
    """Bits of one count in a rans-compact table whose largest count is `count`."""
    return max(count.bit_length(), 1)


def prepare(tensors: dict[str, SourceTensor], pairs: Iterable[Pair], quantized: Callable[[str], bool],
            workers: int, progress: Callable, widest: int = MAX_WIDTH, relative: bool = True,
            entry_bits: int = 32, scaled: bool = False, compact: bool = False, grid: bool = False,
            wide: bool = False) -> Prepared:
    """The candidate table of every factor of every pair whose two factors are both quantized: its mean, and
    entropy-constrained quantizers at index rates up to `widest` bits. Distortion is each pair's squared ΔW error
    divided by ||ΔW||^(2·RELATIVE_POWER), or with `relative` False the plain squared error of ΔW summed over the
    pairs (what --sqnr asks for). With `scaled`, B factors are also offered the ladder on their values divided
    by component_scales (format 2.0), which the plan takes where it serves better. With `compact` the indices
    are priced with rans-compact's count table (2.1), with `grid` codebooks as GRID where the writer would store
    that (2.2), and with `wide` the entropy-constrained quantizers may keep up to 4,096 levels (2.3, rANS-coded).
    (The fits themselves price a level at its codebook entry alone: adding a table count to it made
    the --sqnr 40 file of a tiny rank-4 LLaMA 1.7% larger, where small factors at many levels are bit-packed and
    have no table, and changed nothing measurable on a rank-2 MiniLM-shaped adapter at --bpp 1-3.)"""
    pairs = [p for p in pairs if quantized(p.a) and quantized(p.b)]
    weights, energies, scales, scaled_values, scaled_weights = {}, [], {}, {}, {}
    layout, component_norms, products = {}, {}, []
    for pair in pairs:
        a_src, b_src = tensors[pair.a], tensors[pair.b]
        a = to_float64(a_src.raw, a_src.dtype).reshape(a_src.shape)
        b = to_float64(b_src.raw, b_src.dtype).reshape(b_src.shape)
        e, energy = slope_weight(pair, a, b)
        energies.append(energy)
        rank = a.shape[0]
        weights[pair.a], weights[pair.b] = e * float(np.square(b).sum()) / rank, e * float(np.square(a).sum()) / rank
        a2, b2 = a.reshape(rank, -1), b.reshape(-1, rank)
        layout[pair.a], layout[pair.b] = (rank, True), (rank, False)
        component_norms[pair.a], component_norms[pair.b] = np.square(a2).sum(axis=1), np.square(b2).sum(axis=0)
        products.append(e if _orthogonal(a2 @ a2.T) and _orthogonal(b2.T @ b2) else None)
        s_b = component_scales(a) if scaled else None
        if s_b is not None and (s_b != 1).any():  # all ones: the same ladder again plus the scales' bytes, never taken
            # B's error in ΔW, per scaled element: its column's scale² x ||A'_i||², on average over columns
            scales[pair.b] = s_b
            scaled_values[pair.b] = (b.reshape(b.shape[0], rank) / s_b[None, :]).ravel()
            scaled_weights[pair.b] = e * float((np.square(s_b.astype(np.float64)) * component_norms[pair.a]).mean())
    floor = ENERGY_FLOOR * (float(np.mean(energies)) if energies else 0.0) or 1.0
    norms = [max(energy, floor) ** RELATIVE_POWER if relative else 1.0 for energy in energies]
    for pair, norm in zip(pairs, norms):
        weights[pair.a] /= norm
        weights[pair.b] /= norm
        if pair.b in scaled_weights:
            scaled_weights[pair.b] /= norm
    signal = sum(energy / norm for energy, norm in zip(energies, norms))
    pair_weights = [None if e is None else e / norm for e, norm in zip(products, norms)]
    names = [n for p in pairs for n in (p.a, p.b)]
    rates = np.arange(EC_STEP, widest + EC_STEP / 2, EC_STEP)
    first_scaled = MEAN + 1 + rates.size  # columns: RAW, MEAN, the ladder, the ladder on scaled values, k-means
    first_kmeans = first_scaled + (rates.size if scales else 0)
    kmeans_widest = min(widest, MAX_WIDTH)  # (k-means codebooks past 256 entries would cost seconds a factor)
    levels = 1 << MAX_WIDE_BITS if wide else entropy_constrained.MAX_LEVELS
    with ThreadPoolExecutor(max_workers=workers) as pool:  # the kernel releases the GIL
        jobs = [(n, to_narrowest(tensors[n].raw, tensors[n].dtype), tensors[n].dtype, False) for n in names]
        jobs += [(n, v, "F64", True) for n, v in scaled_values.items()]  # scaled: not values of the tensor's dtype
        done = pool.map(lambda job: _candidates(job[1], job[2], rates, entry_bits, 0 if job[3] else kmeans_widest,
                                                levels, *layout[job[0]]), jobs)
        fits: dict[str, dict[int, Fit]] = {n: {} for n in names}
        moments: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {n: {} for n in names}
        for (name, _, _, is_scaled), (mean, ladder, kmeans, coarse) in zip(jobs, progress(done, len(jobs), "fit")):
            first = first_scaled if is_scaled else MEAN + 1
            columns_of = [MEAN] + [first + i for i in range(len(ladder))] + [first_kmeans + i for i in range(len(kmeans))]
            # a scaled B's component i decodes as scale_i times its codebook's values (its mean is not a candidate)
            square = np.square(scales[name].astype(np.float64)) if is_scaled else 1.0
            fits[name].update(zip(columns_of[is_scaled:], ([] if is_scaled else [mean]) + ladder + kmeans))
            moments[name].update((columns_of[i], (g * square, h * square)) for i, (g, h) in coarse.items()
                                 if i or not is_scaled)
    columns = first_kmeans + kmeans_widest  # (k-means on scaled values measured no better than on the values)
    is_scaled = [first_scaled <= column < first_kmeans for column in range(columns)]
    rate = np.full((len(names), columns), np.inf)
    distortion = np.full_like(rate, np.inf)
    stored = np.zeros_like(rate)  # what storing a codebook (as GRID) adds to a candidate's distortion
    for row, name in enumerate(names):
        count = tensors[name].numel
        energy = float(np.square(to_float64(tensors[name].raw, tensors[name].dtype)).sum()) if grid else None
        moments[name][RAW] = (component_norms[name], component_norms[name])
        for column, fit in fits[name].items():
            weight, extra = (scaled_weights[name], entry_bits * scales[name].size) if is_scaled[column] else (
                weights[name], 0)  # the scales are stored after the codebook
            bits, added = rate_bits(fit, max(width_of(fit.codebook.size), 1), count, entry_bits, compact, energy)
            rate[row, column] = bits + extra
            distortion[row, column] = weight * (fit.sse + added)
            stored[row, column] = weight * added
        rate[row, RAW], distortion[row, RAW] = 8 * count * itemsize(tensors[name].dtype) + SECTION_BITS, 0.0
    uniform_columns = [c for c in range(columns) if np.isfinite(rate[:, c]).all()]
    tables = [_pair_options(rate[2 * k:2 * k + 2], distortion[2 * k:2 * k + 2], stored[2 * k:2 * k + 2], moments[pair.a],
                            moments[pair.b], pair_weights[k], uniform_columns) for k, pair in enumerate(pairs)]
    width = max((len(t[0]) for t in tables), default=1)
    pair_rate = np.full((len(pairs), width), np.inf)
    pair_distortion = np.full_like(pair_rate, np.inf)
    options = np.zeros((len(pairs), width, 2), dtype=np.int64)
    uniform = [np.zeros(len(pairs), dtype=np.int64) for _ in uniform_columns]
    for k, (r, d, o, where) in enumerate(tables):
        pair_rate[k, :r.size], pair_distortion[k, :d.size], options[k, :len(o)] = r, d, o
        for plan, at in zip(uniform, where):
            plan[k] = at
    return Prepared(names, fits, is_scaled, pair_rate, pair_distortion, options, uniform, signal, scales)


def _candidates(values: np.ndarray, dtype: str, rates: np.ndarray, level_bits: int, widest: int, max_levels: int,
                rank: int, by_row: bool) -> tuple[Fit, list[Fit], list[Fit], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One tensor's mean; its entropy-constrained quantizer at each of `rates`' slopes with each level priced
    at `level_bits`, of at most `max_levels` levels; if it has at most KMEANS_MAX_BINS distinct values, its
    k-means codebooks of 2^1 to 2^widest entries; and the component_moments of those of at most MOMENTS_MAX_LEVELS
    levels, by their place in that order (on the values widened to float64 here: one tensor's at a time a worker)."""
    hist, bins = histogram_bins(values, dtype)
    slopes = entropy_constrained.slopes(hist, rates)
    narrow = rates <= WIDE_FROM_RATE  # these rungs keep at most 256 levels whatever max_levels says
    ladder = entropy_constrained.ladder(hist, slopes[narrow], level_bits) + entropy_constrained.ladder(
        hist, slopes[~narrow], level_bits, max_levels)
    sizes = tuple(1 << w for w in range(1, widest + 1)) if hist[0].size <= KMEANS_MAX_BINS else ()
    kmeans = fit_histogram_sizes(hist, sizes) if sizes else {}
    mean = entropy_constrained.mean(hist)
    fits = [mean, *ladder, *(kmeans[k] for k in sizes)]
    coarse = [i for i, fit in enumerate(fits) if fit.counts.size <= MOMENTS_MAX_LEVELS]
    g, h = component_moments(hist, bins, np.asarray(values, np.float64), rank, by_row, [fits[i] for i in coarse])
    return mean, ladder, [kmeans[k] for k in sizes], dict(zip(coarse, zip(g, h)))


MOMENTS_MAX_LEVELS = 64
"""Fits of more levels are priced with a partner by the first-order sum of errors (their error, relative to the
factor's, is about 1e-3 or less, and what it compounds with the partner's is that much smaller again); their
moments would cost passes over the factor for nothing (--bpp 8 of the 28.3M-param adapter: 7.5 s with every fit's
moments, 6.6 s with these, 5.8 s pricing every option to first order)."""
ORTHOGONAL = 1e-2
"""A pair's components count as orthogonal (component_moments applies) where no two of A's rows, nor two of B's
columns, have a cosine above this: every pair in the SVD gauge (stored in float16, ~1e-3), no trained one."""
BIAS_WEIGHT = 2.0
"""How many times a pair's shrinkage counts in its price: the part of its error along ΔW's own components,
Σ_i (1 - c_i)²·||B_i||²·||A_i||² with c_i = <B'_i, B_i><A'_i, A_i> / (||B_i||²·||A_i||²), what the module loses
of what it learned, where the rest of the error is noise spread over every input direction of the module, most of
which its inputs barely use (a LoRA's components are where they do). Next-token KL on the bench's LLM adapters,
planned by the exact ΔW error: counted once, plans at 1-2 bits/param left whole pairs at their means (rank 1 at
--bpp 1.5: 3 of 28 pairs; KL 0.30 -> 0.47) and the KL BD-rate against the paper was -48.7% (-49.0% with the
first-order sum of the factors' errors, which overstates exactly the coarse options); counted twice, -49.4%, with
ΔW SQNR's -48.1% (-48.2% once, -47.9% first-order)."""


def _orthogonal(gram: np.ndarray) -> bool:
    """No two components of this Gram matrix have a cosine above ORTHOGONAL."""
    scale = np.sqrt(np.diag(gram))
    cosines = np.abs(gram) / np.maximum(np.outer(scale, scale), np.finfo(np.float64).tiny)
    return bool((cosines[~np.eye(len(gram), dtype=bool)] <= ORTHOGONAL).all())


def _pair_options(rate: np.ndarray, distortion: np.ndarray, stored: np.ndarray, moments_a: dict, moments_b: dict,
                  weight: float | None, uniform_columns: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """(rate, distortion, candidate columns of A and B, the index of each uniform column's option) of the options
    of one pair worth planning with: those that no other option beats on both rate and distortion, and each
    uniform column's. Its ΔW error from its components' moments where they are orthogonal (`weight` the pair's
    factor on ||B'A' - BA||²; see component_moments) where both candidates have them, its shrinkage counted
    BIAS_WEIGHT times, plus what storing their codebooks adds (`stored`); else the sum of its factors' first-order
    errors (`distortion`, rows A and B)."""
    col_a, col_b = (np.flatnonzero(np.isfinite(row)) for row in rate)
    total_rate = (rate[0, col_a][:, None] + rate[1, col_b][None, :]).ravel()
    total = distortion[0, col_a][:, None] + distortion[1, col_b][None, :]
    if weight is not None:
        in_a, in_b = (np.array([c in m for c in cols]) for m, cols in ((moments_a, col_a), (moments_b, col_b)))
        g_a, h_a = (np.stack([moments_a[c][i] for c in col_a[in_a]]) for i in (0, 1))
        g_b, h_b = (np.stack([moments_b[c][i] for c in col_b[in_b]]) for i in (0, 1))
        norms_a, norms_b = moments_a[RAW][0], moments_b[RAW][0]
        signal, cross = float(norms_a @ norms_b), h_a @ h_b.T
        exact = g_a @ g_b.T - 2 * cross + signal
        safe_a, safe_b = np.where(norms_a > 0, norms_a, 1.0), np.where(norms_b > 0, norms_b, 1.0)
        bias = signal - 2 * cross + (np.square(h_a) / safe_a) @ (np.square(h_b) / safe_b).T
        priced = np.maximum(exact, 0.0) + (BIAS_WEIGHT - 1) * np.maximum(bias, 0.0)
        added = stored[0, col_a[in_a]][:, None] + stored[1, col_b[in_b]][None, :]
        total[np.ix_(in_a, in_b)] = weight * priced + added
    total = total.ravel()
    order = np.lexsort((total, total_rate))
    best_before = np.minimum.accumulate(total[order])
    kept = order[np.concatenate(([True], total[order][1:] < best_before[:-1]))]
    diagonal = [int(np.searchsorted(col_a, c)) * col_b.size + int(np.searchsorted(col_b, c)) for c in uniform_columns]
    kept = np.union1d(kept, diagonal)
    columns = np.stack([col_a[kept // col_b.size], col_b[kept % col_b.size]], axis=1)
    return total_rate[kept], total[kept], columns, [int(np.searchsorted(kept, d)) for d in diagonal]


def component_moments(hist: Histogram, bins: np.ndarray, values: np.ndarray, rank: int, by_row: bool,
                      fits: list[Fit]) -> tuple[np.ndarray, np.ndarray]:
    """(||Q(X)_i||², <Q(X)_i, X_i>) of each component i of a factor X (A's rows where `by_row`, B's columns) under
    each of `fits`, [fits, rank] each. For a pair whose components are orthogonal (the SVD gauge) its error is
    ||B'A' - BA||² = Σ_i ||B'_i||²·||A'_i||² - 2<B'_i, B_i><A'_i, A_i> + ||B_i||²·||A_i||², up to products of the
    two factors' errors' correlations across components, which is what a plan needs to price A's candidates with
    B's: where both are coarse their errors compound less than their sum (the centroid condition makes each
    decoded factor's error orthogonal to it), which the first-order sum overstates, by up to a third at 0.5-1
    bits/param. A fit's cells are runs of whole bins of the factor's histogram (`bins`: each value's), so
    per-component prefix sums over the runs of bins between any fit's cell boundaries (the C kernel's piece_sums,
    one pass over the values) give each fit's moments in O(rank x levels)."""
    weight, sums, _ = hist
    cum_weight = np.cumsum(weight)
    ends = [np.where(c > 0, np.searchsorted(cum_weight, c - 0.5) + 1, 0) for c in
            (np.cumsum(np.asarray(f.counts, np.float64)) for f in fits)]  # each cell's end, exclusive, in bins
    starts = np.concatenate([np.concatenate(([0], e[:-1])) for e in ends])
    segments = np.cumsum([0] + [e.size for e in ends[:-1]])
    ends = np.concatenate(ends)
    cuts = np.unique(np.concatenate((starts, ends)))  # the bins where some cell starts or ends: pieces between
    piece_of_bin = np.searchsorted(cuts, np.arange(weight.size), side="right").astype(np.int32)  # 1..cuts.size-1
    sums_by_piece = native_piece_sums(np.ascontiguousarray(bins, np.int64), piece_of_bin,
                                      np.ascontiguousarray(values, np.float64).ravel(), rank, cuts.size + 1, by_row)
    counts, totals = np.cumsum(np.frombuffer(sums_by_piece, np.float64).reshape(2, rank, -1), axis=2)  # [:, j]:
    # the count and the sum of each component's values below cut j
    first, last = np.searchsorted(cuts, starts), np.searchsorted(cuts, ends)
    all_weight, all_sums = np.concatenate(([0.0], cum_weight)), np.concatenate(([0.0], np.cumsum(sums)))
    cell = all_weight[ends] - all_weight[starts]
    level = np.divide(all_sums[ends] - all_sums[starts], cell, out=np.zeros_like(cell), where=cell > 0)
    g = np.add.reduceat((counts[:, last] - counts[:, first]) * np.square(level), segments, axis=1)
    h = np.add.reduceat((totals[:, last] - totals[:, first]) * level, segments, axis=1)
    return g.T, h.T


def plan_for_rate(prepared: Prepared, budget_bits: float) -> np.ndarray:
    """Each tensor's candidate column in the least-distortion plan within `budget_bits`."""
    return prepared.tensor_picks(allocate.for_rate(prepared.rate, prepared.distortion, budget_bits, prepared.uniform))


def plan_for_sqnr(prepared: Prepared, sqnr_db: float) -> np.ndarray:
    limit = prepared.signal / 10 ** (sqnr_db / 10) if math.isfinite(sqnr_db) else 0.0
    return prepared.tensor_picks(allocate.for_distortion(prepared.rate, prepared.distortion, limit, prepared.uniform))


def _sine_rows(count: int) -> np.ndarray:
    """The seeded rows of B@A a sine pair is measured on (the same for weights, energy and measured error)."""
    return np.sort(np.random.default_rng(0).choice(count, min(SINE_ROWS, count), replace=False))


def measured_sqnr(pairs: Iterable[Pair], reference: dict[str, np.ndarray], decoded: dict[str, np.ndarray]) -> float:
    """SQNR (dB) of ΔW summed over `pairs`, decoded factors against the trained ones (any float arrays: widened to
    float64 a pair at a time): exact for plain pairs (||BA - B'A'||² from r x r Gram matrices), over SINE_ROWS seeded
    rows for sine pairs."""
    signal = noise = 0.0
    wide = lambda x: np.asarray(x, dtype=np.float64)
    for pair in pairs:
        rank = reference[pair.a].shape[0]
        a, b = wide(reference[pair.a]).reshape(rank, -1), wide(reference[pair.b]).reshape(-1, rank)
        a2, b2 = wide(decoded[pair.a]).reshape(rank, -1), wide(decoded[pair.b]).reshape(-1, rank)
        if pair.kind != PAIR_SINE:
            energy = lowrank_inner(b, a, b, a)
            signal += pair.scaling ** 2 * energy
            noise += pair.scaling ** 2 * max(0.0, energy - 2 * lowrank_inner(b, a, b2, a2)
                                             + lowrank_inner(b2, a2, b2, a2))
        else:
            rows = _sine_rows(b.shape[0])
            exact, approx = np.sin(pair.omega * (b[rows] @ a)), np.sin(pair.omega * (b2[rows] @ a2))
            scale = (pair.scaling / pair.gamma) ** 2 * b.shape[0] / rows.size
            signal += scale * float(np.square(exact).sum())
            noise += scale * float(np.square(exact - approx).sum())
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf
