"""The SVD gauge: new factors with the same product, and a decoded folder PEFT still loads to the same model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import llama_lora_dir, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sqz
from sqz.adapter import read_adapter
from sqz.dtypes import to_float64
from sqz.gauge import in_svd_gauge, svd_factors


@st.composite
def pairs(draw):
    rank = draw(st.integers(1, 6))
    rows, cols = draw(st.integers(rank, 40)), draw(st.integers(rank, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 10.0 ** draw(st.integers(-4, 2))
    return rng.standard_t(3, (rank, cols)) * scale, rng.standard_normal((rows, rank))


@settings(max_examples=200, deadline=None)
@given(pair=pairs())
def test_the_gauge_keeps_the_product_and_orders_the_components(pair):
    a, b = pair
    a2, b2 = svd_factors(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape
    np.testing.assert_allclose(b2 @ a2, b @ a, rtol=1e-9, atol=1e-12 * np.abs(b @ a).max())
    np.testing.assert_allclose(b2.T @ b2, np.eye(a.shape[0]), atol=1e-9)  # B' = U: orthonormal columns
    norms = np.linalg.norm(a2, axis=1)
    assert (np.diff(norms) <= 1e-9 * norms[0]).all()  # A' = S·Vᵀ: the strongest component first
    peaks = b2[np.abs(b2).argmax(axis=0), np.arange(b2.shape[1])]
    assert (peaks > 0).all()  # signs fixed, so the result does not depend on the LAPACK build


def values(adapter, name):
    t = adapter.tensors[name]
    return to_float64(t.raw, t.dtype).reshape(t.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gauged_tensors_keep_name_dtype_shape_and_delta(tmp_path, dtype):
    src = llama_lora_dir(tmp_path / "src", r=4)
    weights = src / "adapter_model.safetensors"
    save_file({n: v.to(dtype) for n, v in load_file(str(weights)).items()}, str(weights))
    adapter = read_adapter(src)
    gauged = in_svd_gauge(adapter, adapter.pairs)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for pair in adapter.pairs:
        for name in (pair.a, pair.b):
            old, new = adapter.tensors[name], gauged.tensors[name]
            assert (new.name, new.dtype, new.shape) == (old.name, old.dtype, old.shape)
        before = values(adapter, pair.b).reshape(-1, 4) @ values(adapter, pair.a).reshape(4, -1)
        after = values(gauged, pair.b).reshape(-1, 4) @ values(gauged, pair.a).reshape(4, -1)
        assert not np.allclose(values(gauged, pair.a), values(adapter, pair.a))  # the factors did change
        assert np.linalg.norm(after - before) <= tolerance * np.linalg.norm(before)


def test_pairs_without_room_or_range_stay_as_trained(tmp_path):
    adapter = read_adapter(llama_lora_dir(tmp_path / "src", r=4))
    first = adapter.pairs[0]
    raw = np.full(adapter.tensors[first.a].numel, np.nan, dtype="<f4").tobytes()
    adapter.tensors[first.a] = type(adapter.tensors[first.a])(first.a, "F32", adapter.tensors[first.a].shape, raw)
    gauged = in_svd_gauge(adapter, adapter.pairs)
    assert gauged.tensors[first.a] is adapter.tensors[first.a] and gauged.tensors[first.b] is adapter.tensors[first.b]
    assert gauged.tensors[adapter.pairs[1].a] is not adapter.tensors[adapter.pairs[1].a]


def test_a_target_file_decodes_to_a_peft_folder_with_the_same_model(tmp_path):
    """The decoded factors are in the SVD gauge, not the trained one; PEFT loads them and computes the same ΔW."""
    from peft import PeftModel

    src = llama_lora_dir(tmp_path / "src", r=4)
    ids = torch.arange(40).reshape(2, 20) % 64
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
        original = PeftModel.from_pretrained(tiny_llama(), str(src)).eval()(input_ids=ids).logits
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(sqnr=40.0))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "out") + "/")
    decoded = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    trained = load_file(str(src / "adapter_model.safetensors"))
    name = next(n for n in trained if ".lora_A." in n)
    assert not torch.allclose(decoded[name], trained[name], atol=1e-2)  # another gauge
    with torch.no_grad():
        restored = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()(input_ids=ids).logits
    drift = (restored - original).norm() / (original - base).norm()
    assert drift < 0.02, float(drift)
