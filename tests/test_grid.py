"""GRID codebooks (format 2.2, spec §4.2): the bytes round-trip, the C and numpy readers agree on any bytes, the
writer's grid is the coarsest within the tolerance, and files use GRID where it is smaller, decoding within it."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sqz
from sqz import container, grid
from sqz.codec import CODEBOOK_FLOOR, GRID_LIMIT
from sqz.constants import CODEBOOK_GRID, GRID_MAX_MANTISSA, GRID_MIN_EXPONENT

native = pytest.mark.skipif(grid.native_grid_codebook is None, reason="sqz._lookup was not built")


@st.composite
def grids(draw) -> tuple[np.ndarray, int]:
    """Strictly increasing mantissas (|m| < 2^24) and an exponent that keeps every entry finite in float32; gaps
    small (as real codebooks have) or anywhere in range."""
    k = draw(st.one_of(st.integers(1, 256), st.integers(257, 4096)))  # 2.3: up to 4,096 entries
    cap = draw(st.sampled_from([0, 3, 200, 1 << 16, 1 << 24]))
    first = draw(st.integers(-(GRID_MAX_MANTISSA - 1), GRID_MAX_MANTISSA - 1))
    if k <= 256:
        gaps = draw(st.lists(st.integers(0, cap), min_size=k - 1, max_size=k - 1))
    else:  # a hypothesis list this long is slow to draw: the gaps of a drawn seed
        gaps = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, cap + 1, k - 1)
    mantissas = first + np.concatenate(([0], np.cumsum(np.array(gaps, dtype=np.int64) + 1))).astype(np.int64)
    assume(mantissas[-1] < GRID_MAX_MANTISSA)
    return mantissas, draw(st.integers(-128, 104))


@settings(max_examples=300, deadline=None)
@given(grids(), st.binary(max_size=8))
def test_encoded_grids_decode_to_their_entries(case, tail):
    mantissas, exponent = case
    data = grid.encode(mantissas, exponent)
    assert len(data) == grid.size(mantissas)
    for decode in (grid.decode_numpy, grid.decode):
        entries, used = decode(data + tail, mantissas.size)
        assert used == len(data)
        np.testing.assert_array_equal(entries, np.ldexp(mantissas.astype(np.float64), exponent).astype(np.float32))


@native
@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=48), st.integers(1, 4096))
def test_the_c_reader_agrees_with_numpy_on_any_bytes(data, k):
    """Same entries and length, or a ValueError with the same message: the fuzzers instrument only Python."""
    results = []
    for decode in (grid.decode_numpy, grid.decode):
        try:
            entries, used = decode(data, k)
            results.append((entries.tobytes(), used))
        except ValueError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


@native
@settings(max_examples=200, deadline=None)
@given(grids(), st.integers(0, 64), st.integers(0, 7))
def test_the_c_reader_agrees_on_damaged_grids(case, at, bit):
    """Valid codebooks with one bit flipped, so that damage reaches past the first bytes."""
    mantissas, exponent = case
    data = bytearray(grid.encode(mantissas, exponent))
    data[at % len(data)] ^= 1 << bit
    results = []
    for decode in (grid.decode_numpy, grid.decode):
        try:
            entries, used = decode(bytes(data), mantissas.size)
            results.append((entries.tobytes(), used))
        except ValueError as exc:
            results.append(str(exc))
    assert results[0] == results[1]


@pytest.mark.parametrize("data,k,match", [
    (b"\x00\x19\x00", 1, "Rice width 25"),
    (b"\x00\x00", 1, "truncated"),
    (b"\x00\x00\x80\x80\x80\x80\x00", 1, "more than 4 bytes"),
    (b"\x00\x00\x80\x00", 1, "shortest form"),
    (b"\x00\x00\x00\x00", 3, "truncated"),  # two gaps, no one bits
    (b"\x00\x00\x00\x07", 3, "unused bits"),  # a third one bit in the last unary byte
    (b"\x00\x01\x00\x04\x03", 3, "unused bits"),  # p = 1: two remainder bits, the third set
    (b"\x00\x00\xff\xff\xff\x0f", 1, "out of range"),  # zigzag 2^25 - 1: m_0 = -2^24
    (b"\x7f\x00\x04", 1, "not finite"),  # m_0 = 2, e = 127: 2^128 (m_0 = 1 would be finite)
])
def test_grids_that_break_the_spec_are_refused(data, k, match):
    decoders = [grid.decode_numpy] + ([grid.decode] if grid.native_grid_codebook else [])
    for decode in decoders:
        with pytest.raises(ValueError, match=match):
            decode(data, k)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64, unique=True),
       st.floats(1e-9, 1e-1))
def test_the_chosen_grid_is_the_coarsest_within_the_allowance_from_where_the_search_starts(values, allowed):
    codebook = np.sort(np.array(values, dtype=np.float32))
    counts = np.arange(1, codebook.size + 1, dtype=np.float64)

    def added(entries: np.ndarray) -> np.ndarray:
        return (np.square(entries.astype(np.float64) - codebook) * counts).sum(axis=-1)

    chosen = grid.choose_exponent(codebook, counts, added, allowed)
    if chosen is None:  # only where no grid of at most 2^24 steps keeps the entries apart within the allowance
        return
    exponent, size = chosen.exponent, chosen.size
    fine = grid.snap(codebook, exponent)
    assert (np.diff(fine) > 0).all() and added(grid.values(fine, exponent)) <= allowed
    assert size == len(grid.encode(fine, exponent))
    if exponent < grid.start_exponent(codebook.astype(np.float64), counts, allowed):
        coarse = grid.snap(codebook, exponent + 1)
        assert not (np.diff(coarse) > 0).all() or added(grid.values(coarse, exponent + 1)) > allowed


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=64, unique=True),
       st.floats(1e-9, 1e-1), st.floats(1.0, 1e3), st.floats(1e-12, 1e-2))
def test_a_priced_grid_is_the_cheapest_within_the_limit(values, allowed, limit_share, bit_cost):
    """With a price per bit the grid is the one of least added error plus bits x price among those within the
    limit, from the search's start down to the first within the allowance (finer grids cost only more bits)."""
    codebook = np.sort(np.array(values, dtype=np.float32))
    counts = np.arange(1, codebook.size + 1, dtype=np.float64)

    def added(entries: np.ndarray) -> np.ndarray:
        return (np.square(entries.astype(np.float64) - codebook) * counts).sum(axis=-1)

    limit = allowed * limit_share
    chosen = grid.choose_exponent(codebook, counts, added, allowed, limit, bit_cost)
    exponent = None if chosen is None else chosen.exponent
    unpriced_grid = grid.choose_exponent(codebook, counts, added, allowed)
    unpriced = None if unpriced_grid is None else unpriced_grid.exponent
    costs = {}
    for e in range(grid.start_exponent(codebook.astype(np.float64), counts, limit), GRID_MIN_EXPONENT - 1, -1):
        if np.abs(np.rint(np.ldexp(codebook.astype(np.float64), -e))).max() >= GRID_MAX_MANTISSA:
            break
        m = grid.snap(codebook, e)
        if (np.diff(m) > 0).all() and added(grid.values(m, e)) <= limit:
            costs[e] = added(grid.values(m, e)) + bit_cost * (8 * grid.size(m))
            if added(grid.values(m, e)) <= allowed:
                break
    assert exponent == (min(costs, key=lambda e: (costs[e], -e)) if costs else None)
    assert exponent is None or unpriced is None or exponent >= unpriced  # never finer than the unpriced choice


def test_scales_are_stored_as_exponents_only_when_they_are_powers_of_two():
    scales = np.array([1.0, 2.0, 1024.0, 0.5, 2.0 ** -126], dtype=np.float32)
    stored = grid.encode_scales(scales)
    assert stored == bytes([0, 1, 10, 255, 130])
    np.testing.assert_array_equal(grid.decode_scales(stored), scales)
    assert grid.encode_scales(np.array([1.0, 3.0], dtype=np.float32)) is None


def _factors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
        tensors[f"base_model.model.m{i}.lora_A.weight"] = (torch.randn(4, 256, generator=g) * 0.05).to(dtype)
        tensors[f"base_model.model.m{i}.lora_B.weight"] = (torch.randn(128, 4, generator=g) * 0.02).to(dtype)
    return tensors


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_files_store_grid_where_smaller_and_decode_within_the_tolerance(tmp_path, bits, decoder):
    """2.2 against 2.1: GRID on every quantized factor (each saves bytes here), a smaller file, and each factor
    quantized in both files with the same indices, its squared error more by at most the codebook tolerance (or
    the floor). (At 8 bits a 512-value factor's F16 codebook made its section larger than its exact bytes, which
    2.1 then stored; 2.2's GRID section is smaller, so it is quantized there.)"""
    source = tmp_path / "a.safetensors"
    tensors = _factors()
    save_file(tensors, str(source))
    sizes, decoded, records = {}, {}, {}
    for fmt in ("2.1", "2.2"):
        out = tmp_path / f"{fmt}.sqz"
        sizes[fmt] = sqz.encode(source, out, sqz.EncodeOptions(bits=bits, sample=0, format=fmt)).file_bytes
        adapter = sqz.load(out)
        decoded[fmt] = {name: adapter[name].double() for name in tensors}
        records[fmt] = {r["name"]: r for r in adapter.header["tensors"]}
    assert not any(r.get("codebook_dtype") == CODEBOOK_GRID for r in records["2.1"].values())
    quantized = [n for n, r in records["2.2"].items() if r["encoding"] == "kmeans"]
    assert quantized and all(records["2.2"][n]["codebook_dtype"] == CODEBOOK_GRID for n in quantized)
    assert sizes["2.2"] < sizes["2.1"]
    for name in quantized:
        if records["2.1"][name]["encoding"] != "kmeans":
            continue
        exact = tensors[name].double()
        base = float((decoded["2.1"][name] - exact).square().sum())
        error = float((decoded["2.2"][name] - exact).square().sum())
        assert error - base <= max(GRID_LIMIT * base, CODEBOOK_FLOOR * float(exact.square().sum())) * 1.01
    f = container.Container(tmp_path / "2.2.sqz")
    for i, row in enumerate(sqz.info(tmp_path / "2.2.sqz")["tensors"]):
        if row["codebook_dtype"] == CODEBOOK_GRID:  # what info says a GRID codebook takes is what it takes
            assert row["codebook_bytes"] == grid.decode(f.section(i), row["codebook_size"])[1]
            assert row["codebook_bytes"] < 2 * row["codebook_size"]
    f.close()


def _grid_file(tmp_path: Path) -> tuple[dict, list[bytes], int]:
    """The -b 5 file of _factors: its header, its sections and the index of its first GRID record."""
    source = tmp_path / "a.safetensors"
    save_file(_factors(), str(source))
    sqz.encode(source, tmp_path / "a.sqz", sqz.EncodeOptions(bits=5, sample=0))
    f = container.Container(tmp_path / "a.sqz")
    header = copy.deepcopy(f.header)
    sections = [bytes(f.section(i)) for i in range(len(f.records))]
    f.close()
    return header, sections, next(i for i, r in enumerate(header["tensors"]) if r.get("codebook_dtype") == CODEBOOK_GRID)


def test_a_damaged_grid_codebook_fails_its_tensor_alone(tmp_path):
    """A GRID codebook whose Rice width is over the limit, in a file with valid CRCs: that tensor raises a
    FormatError naming it, the others decode."""
    header, sections, victim = _grid_file(tmp_path)
    sections[victim] = sections[victim][:1] + bytes([25]) + sections[victim][2:]
    adapter = sqz.load(b"".join(container.serialize(header, sections)))
    name = header["tensors"][victim]["name"]
    with pytest.raises(sqz.FormatError, match=f"{name}.*Rice width 25"):
        adapter[name]
    others = [r["name"] for i, r in enumerate(header["tensors"]) if i != victim]
    assert all(torch.isfinite(adapter[n]).all() for n in others)


def test_a_grid_section_shorter_than_its_least_codebook_is_refused_at_open(tmp_path):
    header, sections, victim = _grid_file(tmp_path)
    k = header["tensors"][victim]["codebook_size"]
    sections[victim] = sections[victim][:2 + -(-(k - 1) // 8)]
    with pytest.raises(sqz.FormatError, match="shorter than its codebook"):
        sqz.load(b"".join(container.serialize(header, sections)))
