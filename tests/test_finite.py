"""A file that passes validation never yields a non-finite number (spec §3.2 ranges, §4.2, §5).

Files are forged as an attacker would: a real file's header or codebook rewritten, with every CRC made valid.
"""
from __future__ import annotations

import copy
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sqz
from sqz import container

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def factors() -> dict[str, torch.Tensor]:
    """One LoRA pair per float dtype."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for tag, dtype in DTYPES.items():
        tensors[f"m.{tag}.lora_A.weight"] = (torch.randn(2, 24, generator=g) * 0.1).to(dtype)
        tensors[f"m.{tag}.lora_B.weight"] = (torch.randn(16, 2, generator=g) * 0.01).to(dtype)
    return tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """A plain and a sine file of every float dtype, indices bit-packed (entropy none: codebook edits stay local),
    written as 1.1, whose codebooks are all F32 (forge writes them back as 2.0, which allows F32 codebooks)."""
    folder = tmp_path_factory.mktemp("finite")
    src = folder / "src.safetensors"
    save_file(factors(), str(src))
    out = {}
    for kind, sine in (("lora", sqz.SineOptions(alpha=4.0)), ("sine", sqz.SineOptions(omega=200.0, alpha=4.0))):
        sqz.encode(src, folder / f"{kind}.sqz", sqz.EncodeOptions(bits=2, entropy="none", format="1.1"), sine)
        out[kind] = (folder / f"{kind}.sqz").read_bytes()
    return out


def sections_of(f: container.Container) -> list[bytes]:
    return [bytes(f._buf[f.data_start + r["offset"]:f.data_start + r["offset"] + r["length"]]) for r in f.records]


def forge(data: bytes, pair_fields: dict | None = None, codebook: tuple[str, int, float] | None = None,
          module: str | None = None) -> bytes:
    """The file with one pair's fields replaced (`module`'s, else the first) and/or one codebook entry set to a
    float32, every offset and CRC recomputed: only validation can refuse it."""
    f = container.Container(data)
    header, sections = copy.deepcopy(f.header), sections_of(f)
    f.close()
    if pair_fields:
        next(p for p in header["pairs"] if module in (None, p["module"])).update(pair_fields)
    if codebook:
        name, entry, value = codebook
        i = next(n for n, r in enumerate(header["tensors"]) if r["name"] == name)
        section = bytearray(sections[i])
        section[4 * entry:4 * entry + 4] = struct.pack("<f", value)
        sections[i] = bytes(section)
    return b"".join(container.serialize(header, sections))


def last_entry(data: bytes, dtype: str, side: str = "A") -> tuple[str, int]:
    record = next(r for r in sqz.load(data).header["tensors"] if r["name"] == f"m.{dtype}.lora_{side}.weight")
    assert record["encoding"] == "kmeans"
    return record["name"], record["codebook_size"] - 1


@pytest.mark.parametrize("dtype,overflowing,largest", [
    ("F16", 65520.0, 65504.0),  # 65520 is half-way to 65536 and rounds (to even) to inf
    ("BF16", 3.3961775e38, 3.3895314e38),
    ("F32", math.inf, 3.4028235e38),
    ("F64", math.nan, 3.4028235e38),
])
def test_codebook_entry_that_is_not_finite_in_its_dtype_is_refused(files, dtype, overflowing, largest):
    name, entry = last_entry(files["lora"], dtype)
    with pytest.raises(sqz.FormatError, match=rf"{name}.*(not finite as {dtype}|must be finite)"):
        sqz.load(forge(files["lora"], codebook=(name, entry, overflowing)))[name]
    # the largest value the dtype holds is a legal entry, and decodes to exactly that value
    adapter = sqz.load(forge(files["lora"], codebook=(name, entry, largest)))
    values = adapter[name]
    assert torch.isfinite(values).all() and values.double().max().item() == pytest.approx(largest, rel=1e-7)


def test_every_other_tensor_of_the_file_still_decodes(files):
    name, entry = last_entry(files["lora"], "F16")
    adapter = sqz.load(forge(files["lora"], codebook=(name, entry, 1e5)))
    reference = sqz.load(files["lora"])
    for other in adapter:
        if other != name:
            assert torch.equal(adapter[other], reference[other])
    with pytest.raises(sqz.FormatError, match="100000 is not finite as F16"):
        adapter[name]


@pytest.mark.parametrize("kind,fields,message", [
    ("lora", {"scaling": 1e308}, "'scaling'"),
    ("lora", {"scaling": -1.000001e6}, "'scaling'"),
    ("sine", {"omega": 1e7}, "'omega'"),
    ("sine", {"gamma": 1e-7}, "'gamma'"),
    ("sine", {"gamma": -2e6}, "'gamma'"),
    ("sine", {"gamma": 0}, "'gamma'"),
])
def test_pair_numbers_outside_their_range_are_refused_at_open(files, kind, fields, message):
    with pytest.raises(sqz.FormatError, match=message):
        sqz.load(forge(files[kind], pair_fields=fields))


@pytest.mark.parametrize("kind,fields", [
    ("lora", {"scaling": 1e6}), ("lora", {"scaling": -1e6}), ("lora", {"scaling": 0}),
    ("sine", {"omega": -1e6, "gamma": 1e-6, "scaling": 1e6}), ("sine", {"gamma": -1e6}),
])
def test_pair_numbers_at_the_edge_of_their_range_decode_to_finite_deltas(files, kind, fields):
    adapter = sqz.load(forge(files[kind], pair_fields=fields))
    for module, delta in adapter.deltas().items():
        assert torch.isfinite(delta).all(), module


def test_a_delta_that_overflows_is_an_error_naming_the_module(files):
    """Legal parts, illegal whole: F32 codebooks of 1e20 at the largest scaling make B@A·s overflow float32."""
    data = files["lora"]
    for side in ("A", "B"):
        name, entry = last_entry(data, "F32", side)
        data = forge(data, codebook=(name, entry, 1e20))
    data = forge(data, pair_fields={"scaling": 1e6}, module="m.F32")
    adapter = sqz.load(data)
    with pytest.raises(sqz.NonFiniteError, match="'m.F32'.*overflows float32"):
        adapter.delta("m.F32")
    with pytest.raises(sqz.NonFiniteError):
        adapter.deltas()


@pytest.mark.parametrize("dtype,pattern", [("F16", 0x7C00), ("F16", 0xFE00), ("BF16", 0x7F80), ("BF16", 0xFFC1)])
def test_a_narrow_codebook_holding_inf_or_nan_is_refused(tmp_path, dtype, pattern):
    """2.0 and 2.1 store a float16 tensor's codebook as F16 (a bfloat16 one's as BF16): an entry whose bits are inf
    or NaN is refused like any other non-finite entry, and only that tensor fails. (2.2's GRID: test_grid.)"""
    src = tmp_path / "src.safetensors"
    save_file(factors(), str(src))
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(bits=2, entropy="none", format="2.1"),
               sqz.SineOptions(alpha=4.0))
    f = container.Container((tmp_path / "a.sqz").read_bytes())
    header, sections = copy.deepcopy(f.header), sections_of(f)
    name = f"m.{dtype}.lora_A.weight"
    i = next(n for n, r in enumerate(header["tensors"]) if r["name"] == name)
    assert header["tensors"][i]["codebook_dtype"] == dtype
    sections[i] = struct.pack("<H", pattern) + sections[i][2:]
    adapter = sqz.load(b"".join(container.serialize(header, sections)))
    with pytest.raises(sqz.FormatError, match=f"{name}.*must be finite"):
        adapter[name]
    assert all(torch.isfinite(adapter[other]).all() for other in adapter if other != name)


def test_lossless_factors_come_back_as_stored_inf_and_nan_included(tmp_path):
    tensors = {k: v.float() for k, v in factors().items() if ".F32." in k}
    tensors["m.F32.lora_A.weight"][0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    save_file(tensors, str(tmp_path / "src.safetensors"))
    sqz.encode(tmp_path / "src.safetensors", tmp_path / "a.sqz", sqz.EncodeOptions(lossless=("*lora_A*",)))
    adapter = sqz.load(tmp_path / "a.sqz")
    stored = adapter["m.F32.lora_A.weight"]
    assert torch.equal(stored.view(torch.int32), tensors["m.F32.lora_A.weight"].view(torch.int32))  # NaN bits too
    with pytest.raises(sqz.NonFiniteError, match="'m.F32'.*a factor holds inf or NaN"):
        adapter.delta("m.F32")


@pytest.mark.parametrize("sine,message", [
    (sqz.SineOptions(alpha=1e9), "scaling"),
    (sqz.SineOptions(omega=1e7), "ω"),
    (sqz.SineOptions(omega=30.0, gamma="1e-9"), "γ"),
])
def test_the_encoder_refuses_numbers_no_reader_would_accept(tmp_path: Path, sine, message):
    save_file(factors(), str(tmp_path / "src.safetensors"))
    with pytest.raises(sqz.InputError, match=message):
        sqz.encode(tmp_path / "src.safetensors", tmp_path / "a.sqz", sine=sine)
    assert not (tmp_path / "a.sqz").exists()


floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from(
    [65504.0, 65519.99, 65520.0, 3.39e38, 3.4028235e38, 1e-45, -0.0, 1e6, 1e6 * (1 + 1e-9), 1e-6])
header_numbers = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e308, -1e308, 1e6, -1e6, 1e-6, 1e-300, 0.0, 5e-324])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forged_numbers_decode_to_finite_values_or_raise(files, data):
    """The attack the issue describes, as a property: rewrite pair numbers and codebook entries (CRCs valid);
    the reader either refuses, or every lossy value and every ΔW it returns is finite."""
    kind = data.draw(st.sampled_from(sorted(files)))
    fields = data.draw(st.dictionaries(st.sampled_from(["scaling", "omega", "gamma"]), header_numbers, max_size=3))
    dtype, side = data.draw(st.sampled_from(sorted(DTYPES))), data.draw(st.sampled_from("AB"))
    name, last = last_entry(files[kind], dtype, side)
    codebook = (name, data.draw(st.integers(0, last)), data.draw(floats)) if data.draw(st.booleans()) else None
    forged = forge(files[kind], pair_fields=fields if kind == "sine" else {k: v for k, v in fields.items()
                                                                             if k == "scaling"}, codebook=codebook)
    try:
        adapter = sqz.load(forged)
        for record in adapter.header["tensors"]:
            if record["encoding"] == "kmeans":
                assert torch.isfinite(adapter[record["name"]]).all(), record["name"]
        for module, delta in adapter.deltas().items():
            assert torch.isfinite(delta).all(), module
    except sqz.SqzError:
        pass
