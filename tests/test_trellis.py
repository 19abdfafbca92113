"""Trellis-coded quantization (trellis.py) and its entropy stage rans-trellis (format 2.5): the Viterbi path walks the
spec's trellis, both decoders read it back exactly (and agree on any bytes), it beats the scalar quantizer at the same
rate, and the rate targets use it."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import check_rans_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import sqz
from sqz import bitpack, container, entropy, trellis
from sqz import entropy_constrained as ec
from sqz.adapter import SourceTensor
from sqz.codec import encode_tensor, matrix_shape, read_side
from sqz.constants import TRELLIS_CLASS, TRELLIS_NEXT
from sqz.errors import FormatError, InputError
from sqz.quantize import assign, histogram
from sqz.ratecontrol import Choice

needs_c = pytest.mark.skipif(trellis.native_viterbi is None or bitpack.native_lookup is None,
                             reason="sqz._trellis or sqz._lookup was not built (no C compiler at install)")


def sse(values: np.ndarray, path: trellis.Path) -> float:
    error = values - path.codebook.astype(np.float32).astype(np.float64)[path.indices]
    return float(error @ error)


def on_trellis(stream: np.ndarray) -> bool:
    """Whether every index of a stream (in the stream's order) has its state's class, walking from state 0."""
    state = 0
    for i in stream.tolist():
        if i % 2 != TRELLIS_CLASS[state]:
            return False
        state = TRELLIS_NEXT[state][(i % 4) // 2]
    return True


def native_decode(payload: bytes, codebook: np.ndarray, count: int, row: int, threads: int = 1) -> np.ndarray | None:
    """The C extension's values of a rans-trellis payload (None where it reports a problem)."""
    stream, params, axis = entropy.rans_grouped_frame(memoryview(payload), count, codebook.size, row, "rans-trellis")
    out = np.empty(count, np.float32)
    job = (stream, count, 8 if codebook.size <= 256 else bitpack.WIDE, codebook, out, bitpack.FRAME_RANS, None,
           params, axis, 1)
    return None if bitpack.lookup_many([job], threads) else out


@needs_c
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 8), row=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       rate=st.floats(0.3, 9.0), decay=st.floats(0.05, 1.0))
def test_paths_walk_the_trellis_and_both_decoders_read_them(rows, row, seed, rate, decay):
    """Any factor at any slope: each path's indices are on the trellis in the stream's order (rows or columns,
    whichever are fewer), and the payload decodes to them exactly in C and in the reference decoder."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, row)) * decay ** np.arange(rows)[:, None]).ravel()
    slope = float(ec.slopes(histogram(values.astype(np.float32), "F32"), np.array([rate]))[0])
    for path in trellis.quantize(values, slope, 4096, row):
        k = path.codebook.size
        assert 4 <= k <= 4096 and np.all(np.diff(path.codebook.astype(np.float32)) > 0)
        axis = entropy.group_axis(values.size, row)
        assert on_trellis(np.ascontiguousarray(entropy.in_groups(path.indices, row, axis)).ravel())
        payload = entropy.rans_trellis_payload(path.indices, k, row)
        assert np.array_equal(entropy.decode_indices(memoryview(payload), values.size, 12, k, "rans-trellis", row),
                              path.indices)
        decoded = native_decode(payload, path.codebook.astype(np.float32), values.size, row)
        assert decoded is not None and np.array_equal(decoded, path.codebook.astype(np.float32)[path.indices])


@st.composite
def trellis_jobs(draw):
    """Any bytes under any valid group parameters (a forged file), or an encoded stream of a random trellis path."""
    k = draw(st.one_of(st.integers(4, 300), st.integers(257, 4096)))
    rows, row = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    count = rows * row
    axis = entropy.group_axis(count, row)
    groups = rows if axis == 0 else row
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = np.empty(groups, dtype=entropy.GROUP_PARAMS)
    params["centre"], params["width"] = rng.integers(0, 16 * (k - 1) + 1, groups), rng.integers(0, 256, groups)
    if draw(st.booleans()):
        state, stream = 0, []
        for _ in range(count):  # a random walk: each index of its state's class
            i = TRELLIS_CLASS[state] + 2 * int(rng.integers(0, (k - TRELLIS_CLASS[state] + 1) // 2))
            stream.append(i)
            state = TRELLIS_NEXT[state][(i % 4) // 2]
        grouped = np.array(stream, dtype=np.uint16).reshape(groups, -1)
        indices = np.ascontiguousarray(grouped if axis == 0 else grouped.T).ravel()
        payload = entropy.rans_trellis_payload(indices, k, row)
        return payload, k, count, row, indices
    return bytes([axis]) + params.tobytes() + draw(st.binary(max_size=40)), k, count, row, None


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(trellis_jobs(), min_size=1, max_size=5), st.sampled_from([1, 2]))
def test_the_c_decoder_reads_any_bytes_as_the_reference_does(jobs, threads):
    """In one batch with a plain rANS job: an encoded path decodes to its indices; any bytes decode to the same
    indices in both decoders or fail in both, and only the jobs that fail are reported."""
    specs, expected = [], []
    for payload, k, count, row, indices in jobs:
        table = np.arange(1000, 1000 + k, dtype=np.uint16)
        stream, params, axis = entropy.rans_grouped_frame(memoryview(payload), count, k, row, "rans-trellis")
        specs.append((stream, count, 8 if k <= 256 else bitpack.WIDE, table, np.empty(count, np.uint16),
                      bitpack.FRAME_RANS, None, params, axis, 1))
        try:
            reference = entropy.decode_indices(memoryview(payload), count, 12, k, "rans-trellis", row)
        except FormatError:
            reference = None
        if indices is not None:
            assert reference is not None and np.array_equal(reference, indices)
        expected.append(None if reference is None else table[reference])
    check_rans_batch(specs, expected, threads)


@needs_c
def test_indices_off_the_trellis_are_refused_by_the_coder_and_the_c_extension_checks_its_jobs():
    with pytest.raises(ValueError, match="not on the trellis"):
        entropy.rans_trellis_payload(np.array([1, 0, 0, 0], np.uint16), 4, 4)  # state 0 takes class 0 only
    job = (b"\1\0\0\0", 4, 8, np.arange(3, dtype=np.uint8), np.empty(4, np.uint8), bitpack.FRAME_RANS, None,
           b"\0\0\0", 0, 1)
    with pytest.raises(ValueError, match="4 or more table entries"):
        bitpack.lookup_many([job])


@needs_c
def test_the_trellis_beats_the_scalar_quantizer_at_the_same_rate():
    """Gaussian values, both coded as the rate targets code them (rans-grouped, rans-trellis): at 1.5 to 4 bits a
    value the trellis's SQNR is 0.7 dB or more above the entropy-constrained scalar quantizer's curve (measured
    0.9-1.1)."""
    values = np.random.default_rng(3).standard_normal((16, 4096)).ravel()
    hist = histogram(values.astype(np.float32), "F32")
    energy = float(values @ values)
    scalar, trellised = [], []
    for rate in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5):
        slope = float(ec.slopes(hist, np.array([rate]))[0])
        fit = ec.fit(hist, slope)
        payload = entropy.encode_indices(assign(values, fit.codebook, fit.thresholds).astype(np.uint16), 12,
                                         fit.codebook.size, "rans-grouped", 4096)
        scalar.append((8 * len(payload) / values.size, 10 * math.log10(energy / fit.sse)))
        path = min(trellis.quantize(values, slope, 4096, 4096), key=lambda p: sse(values, p))
        payload = entropy.rans_trellis_payload(path.indices, path.codebook.size, 4096)
        trellised.append((8 * len(payload) / values.size, 10 * math.log10(energy / sse(values, path))))
    curve = np.array(scalar)
    gains = [db - np.interp(bits, curve[:, 0], curve[:, 1]) for bits, db in trellised if 1.5 <= bits <= 4.0]
    assert len(gains) >= 4 and min(gains) > 0.7, gains


@needs_c
def test_a_trellis_path_is_never_taken_far_coarser_than_the_plans_quantizer():
    """A rate target's choice carries the slope of its ladder rung, which at the lowest rungs can be far steeper than
    the factor is worth: the writer keeps the trellis path only within TRELLIS_MAX_ERROR of the scalar quantizer's
    error. A Gaussian factor with a 2-bit fit: at its own slope it goes on the trellis; at 30x that slope the path
    would win its comparison with 3x or more the error and is refused."""
    values = np.random.default_rng(5).standard_normal((4, 512)).astype(np.float32)
    tensor = SourceTensor("m.lora_A.weight", "F32", values.shape, values.tobytes())
    hist = histogram(values.ravel(), "F32")
    slope = float(ec.slopes(hist, np.array([2.0]))[0])
    fit = ec.fit(hist, slope)
    options = sqz.EncodeOptions(bpp=2.0)
    width = max(int(fit.codebook.size - 1).bit_length(), 1)
    steep = 30 * slope
    path = min(trellis.quantize(values.ravel().astype(np.float64), steep, 4096, 512), key=lambda p: sse(values.ravel(), p))
    assert sse(values.ravel(), path) > 3 * fit.sse  # what the steep slope's path would cost in error
    choice = lambda at: Choice(width, fit.codebook, None, fit.thresholds, at)
    assert encode_tensor(tensor, "lora_A", options, choice(slope))[0]["entropy"] == "rans-trellis"
    record, _ = encode_tensor(tensor, "lora_A", options, choice(steep))
    assert record["entropy"] != "rans-trellis" and record["codebook_size"] == fit.codebook.size


def gaussian_adapter(folder, rank=8, rows=256, cols=192):
    g = torch.Generator().manual_seed(7)
    decay = 0.7 ** torch.arange(float(rank))
    tensors = {}
    for module, dtype in (("q", torch.float16), ("v", torch.bfloat16), ("o", torch.float32)):
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(rank, rows, generator=g) * decay[:, None]).to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(cols, rank, generator=g) * 0.05).to(dtype)
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    return folder


def delta_sqnr(src, path) -> float:
    """SQNR (dB) of ΔW = B@A over the pairs of a .sqz file against its source folder."""
    ref = load_file(str(src / "adapter_model.safetensors"))
    signal = noise = 0.0
    with sqz.load(path) as adapter:
        for pair in adapter.pairs:
            a, b = ref[pair.module + ".lora_A.weight"].double(), ref[pair.module + ".lora_B.weight"].double()
            exact = b @ a
            decoded = adapter[pair.module + ".lora_B.weight"].double() @ adapter[pair.module + ".lora_A.weight"].double()
            signal += float(exact.square().sum())
            noise += float((exact - decoded).square().sum())
    return 10 * math.log10(signal / noise)


@needs_c
def test_rate_targets_quantize_on_the_trellis_where_it_pays_and_every_decoder_reads_it(tmp_path, decoder):
    """--bpp 2 of a rank-8 adapter of Gaussian factors (F16, BF16, F32): 2.5 puts factors on the trellis and gains
    0.8 dB or more of ΔW SQNR over 2.4's file of the same target (measured +1.2); the records decode as
    codebook[index] x scale on every decoder path, and -b files have no trellis."""
    src = gaussian_adapter(tmp_path / "src")
    sizes = {fmt: sqz.encode(src, tmp_path / f"{fmt}.sqz", sqz.EncodeOptions(bpp=2.0, format=fmt)).file_bytes
             for fmt in ("2.4", "2.5")}
    assert sizes["2.5"] <= 2.0 * 10752 / 8 and sizes["2.5"] <= sizes["2.4"] * 1.01
    assert delta_sqnr(src, tmp_path / "2.5.sqz") > delta_sqnr(src, tmp_path / "2.4.sqz") + 0.8
    f = container.Container(tmp_path / "2.5.sqz")
    adapter = sqz.load(tmp_path / "2.5.sqz")
    trellised = 0
    for i, record in enumerate(f.records):
        if record.get("entropy") != "rans-trellis":
            continue
        trellised += 1
        section = f.section(i)
        side = read_side(record, section)
        rows, row = matrix_shape(record["shape"])
        indices = entropy.decode_indices(section[side.size:], rows * row, record["bits"], record["codebook_size"],
                                         "rans-trellis", row)
        values = side.codebook[indices].reshape(rows, row)
        if side.scales is not None:
            values = values * side.scales[None, :]
        expected = torch.from_numpy(values.astype(np.float32)).to(adapter[record["name"]].dtype)
        assert torch.equal(adapter[record["name"]], expected), record["name"]
    assert trellised >= 3
    sqz.encode(src, tmp_path / "b3.sqz", sqz.EncodeOptions(bits=3))
    assert all(r.get("entropy") != "rans-trellis" for r in sqz.info(tmp_path / "b3.sqz")["tensors"])


def test_rans_trellis_needs_a_rate_target(tmp_path):
    with pytest.raises(InputError, match="rans-trellis codes the trellis-coded quantizer of a rate target"):
        sqz.EncodeOptions(bits=3, entropy="rans-trellis")
    with pytest.raises(InputError, match="needs --format 2.5"):
        sqz.EncodeOptions(bpp=2.0, entropy="rans-trellis", format="2.4")
    src = gaussian_adapter(tmp_path / "src")
    run = subprocess.run([sys.executable, "-m", "sqz.cli", "encode", str(src), "-b", "3", "--entropy", "rans-trellis",
                          "-o", str(tmp_path / "x.sqz")], check=False, capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.sqz").exists()
