import kmeans1d
import numpy as np
import pytest
import torch

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
    assert q.quantize(values, 2, sample=0).sample_size == 3_000
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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    values = heavy_tailed(100)
    values[17] = bad
    with pytest.raises(InputError, match="NaN/inf"):
        q.quantize(values, 3)


def test_error_shrinks_with_bits():
    values = heavy_tailed()
    errors = [np.mean((q.dequantize(r.codebook, r.indices) - values) ** 2)
              for r in (q.quantize(values, b) for b in range(1, 9))]
    assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16"), (torch.float32, "F32")])
def test_dtype_conversions_match_torch(dtype, name):
    values = torch.from_numpy(heavy_tailed(5_000).astype(np.float32))
    original = values.to(dtype)
    raw = original.view(torch.uint8).numpy().tobytes()
    assert np.array_equal(to_float64(raw, name), original.to(torch.float64).numpy())
    bits = float32_to_bits(values.numpy(), name)
    assert torch.equal(torch.from_numpy(bits.view(np.uint8).copy()).view(dtype), original)
