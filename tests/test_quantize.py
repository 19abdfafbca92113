import itertools
import os

import kmeans1d
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqz import quantize as q
from sqz.dtypes import float32_to_bits, to_float64
from sqz.errors import InputError


def heavy_tailed(n=50_000, seed=0):
    return np.random.default_rng(seed).standard_t(3, size=n) * 1e-2


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_codebook_is_kmeans1d_on_the_seeded_sample(bits):
    values = heavy_tailed()
    result = q.quantize(values, bits, sample=10_000, seed=7)
    sample = q.draw_sample(values, 10_000, 7)
    expected = np.unique(np.asarray(kmeans1d.cluster(sample, 1 << bits).centroids, np.float32))
    assert result.sample_size == 10_000
    assert np.array_equal(result.codebook, expected)
    assert result.codebook.size == 1 << bits


def test_every_value_goes_to_its_nearest_centroid():
    values = heavy_tailed(20_000, 1)
    result = q.quantize(values, 3, sample=2_000)
    distances = np.abs(values[:, None] - result.codebook.astype(np.float64)[None, :])
    chosen = distances[np.arange(values.size), result.indices]
    assert np.all(chosen <= distances.min(axis=1))


def test_sample_zero_fits_on_all_values_and_is_seeded():
    values = heavy_tailed(3_000, 2)
    exact = q.quantize(values, 2, sample=0, seed=7)
    assert exact.sample_size == 3_000 and exact.seed == 0  # no sample was drawn: no seed is recorded
    a, b = q.quantize(values, 4, sample=500, seed=1), q.quantize(values, 4, sample=500, seed=1)
    assert np.array_equal(a.codebook, b.codebook) and np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.codebook, q.quantize(values, 4, sample=500, seed=2).codebook)


def test_fewer_distinct_values_than_k_are_kept_exactly():
    values = np.array([0.5, -1.0, 0.5, 2.0, -1.0] * 100)
    result = q.quantize(values, 4)
    assert result.codebook.tolist() == [-1.0, 0.5, 2.0]  # not kmeans1d's empty clusters at 0.0
    assert np.array_equal(q.dequantize(result.codebook, result.indices), values.astype(np.float32))


def test_constant_tensor_has_one_entry():
    result = q.quantize(np.full(1000, 0.125), 3)
    assert result.codebook.tolist() == [0.125] and not result.indices.any()


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad, dtype):
    """Also where a 16-bit tensor is checked by its pattern counts, however its values are handed over."""
    values = heavy_tailed(100)
    values[17] = values[40] = bad
    given = {"F16": values.astype(np.float16), "BF16": values.astype(np.float32)}.get(dtype, values)
    with pytest.raises(InputError, match="tensor has 2 NaN/inf"):
        q.quantize(given, 3, dtype=dtype)


def test_error_shrinks_with_bits():
    values = heavy_tailed()
    errors = [np.mean((q.dequantize(r.codebook, r.indices) - values) ** 2)
              for r in (q.quantize(values, b) for b in range(1, 9))]
    assert all(a > b for a, b in itertools.pairwise(errors))


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float32, "F32")])
def test_dtype_conversions_match_torch(dtype, name):
    values = torch.from_numpy(heavy_tailed(5_000).astype(np.float32))
    original = values.to(dtype)
    raw = original.view(torch.uint8).numpy().tobytes()
    assert np.array_equal(to_float64(raw, name), original.to(torch.float64).numpy())
    bits = float32_to_bits(values.numpy(), name)
    assert torch.equal(torch.from_numpy(bits.view(np.uint8).copy()).view(dtype), original)


def sse(values: np.ndarray, codebook: np.ndarray) -> float:
    """Squared error of the nearest-centroid assignment (what the decoder reproduces)."""
    return float(((codebook.astype(np.float64)[q.assign(values, codebook)] - values) ** 2).sum())


def kmeans1d_sse(values: np.ndarray, bits: int) -> float:
    """The optimum on every value, by kmeans1d (the paper's fitter)."""
    return sse(values, q.fit_codebook(values, bits))


def test_the_histogram_kernel_was_built_where_ci_requires_it():
    """CI sets SQZ_REQUIRE_NATIVE=1: there sqz._kmeans must exist, so the exact fit is never the slow fallback."""
    if os.environ.get("SQZ_REQUIRE_NATIVE") == "1":
        assert q.native_fit is not None


@pytest.fixture(params=["native", "fallback"])
def fitter(request, monkeypatch):
    """Every fit test runs on the C kernel and on the fallback (kmeans1d on every value)."""
    if request.param == "fallback":
        monkeypatch.setattr(q, "native_fit", None)
    elif q.native_fit is None:
        pytest.skip("sqz._kmeans was not built (no C compiler at install)")
    return request.param


half_tensors = st.builds(
    lambda n, scale, tail, seed: np.clip(np.random.default_rng(seed).standard_t(tail, n) * scale, -6e4, 6e4).astype(
        np.float16),
    st.integers(1, 3000), st.sampled_from([1e-3, 0.05, 3.0, 2e3]), st.sampled_from([2.0, 3.0, 30.0]),
    st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=half_tensors, bits=st.integers(1, 8), dtype=st.sampled_from(["F16", "BF16"]))
def test_histogram_fit_is_the_optimum_over_every_value(fitter, values, bits, dtype):
    """The kernel on the histogram of a 16-bit tensor reaches kmeans1d's optimum over all of its values."""
    x = _as_dtype(values, dtype)
    codebook = q.fit_histogram(x, dtype, bits)
    assert codebook.dtype == np.float32 and np.all(np.diff(codebook) > 0) and codebook.size <= 1 << bits
    assert sse(x, codebook) <= kmeans1d_sse(x, bits) * (1 + 1e-6) + 1e-12


def _as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float16 values rounded to `dtype` (F16 or BF16), as float64."""
    x = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16 if dtype == "BF16" else torch.float16)
    return x.double().numpy()


@settings(max_examples=150, deadline=None)
@given(values=half_tensors, bits=st.integers(1, 8), dtype=st.sampled_from(["F16", "BF16"]),
       given_as=st.sampled_from([np.float16, np.float32, np.float64]), sample=st.sampled_from([0, 500]))
def test_a_16_bit_tensor_quantized_by_pattern_is_quantized_by_value(values, bits, dtype, given_as, sample):
    """A 16-bit tensor's indices come from a table over its bit patterns: exactly the nearest entry of every
    value (assign), whether its values arrive as float16, float32 or float64; the counts are the indices'."""
    x = _as_dtype(values, dtype)
    if dtype == "BF16" and given_as is np.float16:
        given_as = np.float32  # bfloat16 values need not fit in float16
    result = q.quantize(x.astype(given_as), bits, sample=sample, seed=3, dtype=dtype)
    assert np.array_equal(result.indices, q.assign(x, result.codebook))
    assert np.array_equal(result.counts, np.bincount(result.indices, minlength=result.codebook.size))
    assert np.array_equal(result.codebook, q.quantize(x, bits, sample=sample, seed=3, dtype=dtype).codebook)


@settings(max_examples=100, deadline=None)
@given(patterns=st.lists(st.integers(0, 65535), max_size=3000) | st.builds(
    lambda n, p: [p] * n, st.integers(0, 5000), st.integers(0, 65535)))
def test_pattern_counts_are_numpys_bincount(patterns):
    bits = np.array(patterns, dtype=np.uint16)
    expected = np.bincount(bits, minlength=1 << 16)
    assert np.array_equal(q.pattern_counts(bits), expected)
    if q.native_pattern_counts is not None:
        assert np.array_equal(np.frombuffer(q.native_pattern_counts(bits[::-1].copy()), np.int64), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 4000), bits=st.integers(1, 6))
def test_float32_bins_lose_nothing_measurable(fitter, seed, n, bits):
    """float32 values are fitted on bins of float16 precision: the optimum among partitions that keep each
    bin whole, within a millionth of the optimum over the raw values."""
    x = (np.random.default_rng(seed).standard_t(3, n) * 0.01).astype(np.float32).astype(np.float64)
    assert sse(x, q.fit_histogram(x, "F32", bits)) <= kmeans1d_sse(x, bits) * (1 + 1e-6) + 1e-15


def test_default_fit_beats_the_sample_on_heavy_tails():
    """The reason for the default: a 10,000-value sample of a Student-t(3) tensor clips its tails."""
    x = (heavy_tailed(200_000, 4).astype(np.float16)).astype(np.float64)
    exact, sampled = q.quantize(x, 8, dtype="F16"), q.quantize(x, 8, sample=q.PAPER_SAMPLE, dtype="F16")
    assert exact.sample_size == x.size and sampled.sample_size == q.PAPER_SAMPLE
    gain_db = 10 * np.log10(sse(x, sampled.codebook) / sse(x, exact.codebook))
    assert gain_db > 6, gain_db


def test_float32_tensor_with_too_many_bins_is_binned_coarser():
    """A tensor spanning every binade has more float16-precision bins than the kernel's table allows."""
    rng = np.random.default_rng(3)
    x = (rng.choice([-1, 1], 300_000) * np.exp2(rng.uniform(-120, 120, 300_000))).astype(np.float32).astype(np.float64)
    weight, sums, _ = q.histogram(x, "F32")
    assert weight.size <= q.MAX_BINS and weight.sum() == x.size and np.all(np.diff(sums / weight) > 0)
    assert q.fit_histogram(x, "F32", 3).size == 8


histograms = st.builds(
    lambda n, seed, kind: _histogram(n, seed, kind), st.integers(1, 600), st.integers(0, 2**32 - 1),
    st.sampled_from(["t3", "even", "clumps"]))


def _histogram(n: int, seed: int, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n bins (weight, sum, sum of squares) in increasing order: heavy-tailed, evenly spaced (ties everywhere),
    or a few clumps of equal values with large counts."""
    rng = np.random.default_rng(seed)
    if kind == "even":
        value, weight = np.arange(n, dtype=np.float64), np.ones(n)
    elif kind == "clumps":
        value, weight = np.sort(rng.integers(0, 20, n)).astype(np.float64) + np.arange(n) * 1e-3, rng.integers(1, 50, n)
    else:
        value, weight = np.sort(rng.standard_t(3, n)), rng.integers(1, 5, n)
    weight = weight.astype(np.float64)
    return weight, weight * value, weight * value * value


def partition_sse(starts: bytes, weight, sums, squares) -> float:
    s = np.frombuffer(starts, dtype=np.int32)
    assert s[0] == 0 and np.all(np.diff(s) > 0) and s[-1] < weight.size
    w, s1, s2 = (np.add.reduceat(a, s) for a in (weight, sums, squares))
    return float(np.maximum(s2 - s1 * s1 / w, 0).sum())


@settings(max_examples=200, deadline=None)
@given(histogram=histograms, k_share=st.floats(0, 1))
def test_the_priced_fit_of_one_k_is_the_full_programmes_optimum(histogram, k_share):
    """fit_one (Lagrangian relaxation) returns an optimal k-partition whenever it returns one at all."""
    if q.native_fit_one is None:
        pytest.skip("sqz._kmeans was not built")
    weight, sums, squares = histogram
    k = 1 + int(k_share * (weight.size - 1))
    exact = partition_sse(q.native_fit(weight, sums, squares, [k])[0], weight, sums, squares)
    priced = q.native_fit_one(weight, sums, squares, k)
    if priced is not None:
        assert np.frombuffer(priced, dtype=np.int32).size == k
        assert partition_sse(priced, weight, sums, squares) <= exact * (1 + 1e-9) + 1e-9


def test_wide_codebooks_take_the_priced_fit_and_lose_nothing():
    values = np.random.default_rng(0).standard_t(3, 60_000).astype(np.float16).astype(np.float64)
    weight, sums, squares = q.histogram(values, "F16")
    assert q.native_fit_one is None or q.native_fit_one(weight, sums, squares, 256) is not None
    fit = q.fit_sizes(values, "F16", (256,))[256]
    full = q.native_fit(weight, sums, squares, [256])[0] if q.native_fit is not None else None
    if full is not None:
        assert fit.sse == pytest.approx(partition_sse(full, weight, sums, squares), rel=1e-12)
