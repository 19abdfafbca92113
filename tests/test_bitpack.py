import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from conftest import check_rans_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqz import bitpack, entropy
from sqz.dtypes import index_dtype
from sqz.errors import FormatError

IMPLEMENTATIONS = ["native", "numpy"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request, monkeypatch):
    """Run a test with the C extension's lookup, then with the numpy one it stands in for."""
    if request.param == "numpy":
        monkeypatch.setattr(bitpack, "native_lookup", None)
    elif bitpack.native_lookup is None:
        pytest.skip("sqz._lookup was not built (no C compiler at install)")
    return request.param


def test_the_c_extension_was_built_where_ci_requires_it():
    """CI sets SQZ_REQUIRE_NATIVE=1: there the fast path, libzstd included, must exist, so its tests never
    skip silently."""
    if os.environ.get("SQZ_REQUIRE_NATIVE") == "1":
        assert bitpack.native_lookup is not None and bitpack.NATIVE_ZSTD


def reference_pack(indices: np.ndarray, bits: int) -> bytes:
    """The spec's definition: each index's low b bits, LSB first, as numpy.packbits(bitorder='little')."""
    planes = np.unpackbits(indices.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


@st.composite
def packed_cases(draw):
    """Indices at b bits (some possibly >= the codebook size k) and a k-entry table of 16-bit words."""
    bits = draw(st.integers(1, 8))
    k = draw(st.integers(1, 1 << bits))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    table = draw(st.lists(st.integers(0, 0xFFFF), min_size=k, max_size=k))
    return bits, np.array(values, dtype=np.uint8), np.array(table, dtype=np.uint16)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packed_cases())  # the fixture picks the implementation once; every example uses it
def test_pack_matches_spec_and_lookup_inverts_it(implementation, case):
    bits, indices, table = case
    packed = bitpack.pack(indices, bits)
    assert len(packed) == bitpack.packed_size(indices.size, bits)
    assert packed == reference_pack(indices, bits)
    if indices.size and indices.max() >= table.size:
        with pytest.raises(ValueError, match="outside"):
            bitpack.lookup(packed, indices.size, bits, table)
    else:
        assert np.array_equal(bitpack.lookup(packed, indices.size, bits, table), table[indices])


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_across_chunk_boundaries(implementation, bits):
    """Large enough that every width takes several chunks; a bad index in the last chunk is still found."""
    rng = np.random.default_rng(bits)
    k = max(1, (1 << bits) - 1)  # not a power of two (except at 1 bit): the per-lane check
    indices = rng.integers(0, k, size=600_011).astype(np.uint8)
    table = rng.standard_normal(k).astype(np.float32)
    packed = bitpack.pack(indices, bits)
    assert np.array_equal(bitpack.lookup(packed, indices.size, bits, table), table[indices])
    assert np.array_equal(bitpack.lookup(packed, indices.size, bits, np.arange(k, dtype=np.uint8)), indices)
    if k < 1 << bits:
        indices[-5] = k
        with pytest.raises(ValueError, match="outside"):
            bitpack.lookup(bitpack.pack(indices, bits), indices.size, bits, table)


def test_power_of_two_limit_below_the_width(implementation):
    """k = 4 at 3 bits: any index with its top bit set is caught, wherever it is."""
    indices = np.zeros(100_000, np.uint8)
    indices[77_777] = 4
    with pytest.raises(ValueError, match="outside the 4-entry"):
        bitpack.lookup(bitpack.pack(indices, 3), indices.size, 3, np.arange(4, dtype=np.uint8))


def test_known_bytes():
    # indices 1, 2, 3 at 2 bits: 0b01 | 0b10 << 2 | 0b11 << 4 = 0b111001
    assert bitpack.pack(np.array([1, 2, 3], np.uint8), 2) == bytes([0b111001])


def test_aligned_width_is_the_next_power_of_two():
    assert [bitpack.aligned_width(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def test_wrong_length_and_dirty_tail_are_rejected(implementation):
    table = np.arange(4, dtype=np.uint8)
    with pytest.raises(ValueError, match="expected"):
        bitpack.lookup(b"\x00\x00", 3, 2, table)
    with pytest.raises(ValueError, match="unused bits"):
        bitpack.lookup(bytes([0b11000000]), 3, 2, table)


def test_a_batch_of_lookups_on_several_threads_reports_exactly_the_bad_jobs(implementation):
    """Many streams of every width, table size and element type in one call: each output is table[index],
    and only the jobs holding an index >= their table size are reported (the others are still filled)."""
    rng = np.random.default_rng(7)
    jobs, expected, bad = [], [], set()
    for n, (bits, count, dtype) in enumerate((b, c, d) for b in range(1, 9) for c in (0, 5, 8, 4099, 300_001)
                                             for d in (np.uint8, np.uint16, np.uint32, np.uint64)):
        k = int(rng.integers(1, (1 << bits) + 1)) if n % 3 else 1 << bits
        indices = rng.integers(0, k, count).astype(np.uint8)
        if k < 1 << bits and count and n % 4 == 0:
            indices[rng.integers(count)] = rng.integers(k, 1 << bits)
            bad.add((n, "index"))
        table = rng.integers(0, np.iinfo(dtype).max, k, dtype=dtype, endpoint=True)
        stream = bitpack.check_stream(bitpack.pack(indices, bits), count, bits)
        jobs.append((stream, count, bits, table, np.empty(count, dtype), False))
        expected.append(table[np.minimum(indices, k - 1)])
    for threads in (1, 3):
        assert set(bitpack.lookup_many(jobs, threads)) == bad
        for n, (job, want) in enumerate(zip(jobs, expected)):
            if (n, "index") not in bad:
                assert np.array_equal(job[4], want), (n, job[1:3], job[3].size)


@pytest.mark.skipif(not bitpack.NATIVE_ZSTD, reason="the C extension found no libzstd")
def test_framed_lookups_decompress_in_the_extension_and_report_bad_frames():
    """zstd frames of packed streams, mapped by the C extension itself: good frames give table[index];
    a corrupt frame, one of the wrong content size, trailing bytes or dirty padding bits are reported."""
    rng = np.random.default_rng(3)
    compress = zstandard.ZstdCompressor(write_content_size=True).compress
    jobs, expected, problems = [], {}, set()
    for n, (bits, count) in enumerate((b, c) for b in range(1, 9) for c in (1, 7, 1000, 300_001)):
        indices = rng.integers(0, 1 << bits, count).astype(np.uint8)
        packed = bitpack.pack(indices, bits)
        frame = compress(packed)
        fault = ("", "frame", "size", "trailing", "padding")[n % 5]
        if fault == "frame":
            frame = frame[:-3]  # cut short: a frame without a checksum has no other tell-tale
        elif fault == "size":
            frame = compress(packed + b"\0")
        elif fault == "trailing":
            frame += b"\0"
        elif fault == "padding" and (count * bits) % 8:
            frame = compress(packed[:-1] + bytes([packed[-1] | 0x80]))
        else:
            fault = ""
        table = rng.integers(0, 2**16, 1 << bits, dtype=np.uint16)
        jobs.append((memoryview(frame), count, bits, table, np.empty(count, np.uint16), True))
        expected[n] = table[indices]
        if fault:
            problems.add((n, "frame" if fault == "trailing" else fault))
    assert set(bitpack.lookup_many(jobs, 2)) == problems
    for n, job in enumerate(jobs):
        if not any(p[0] == n for p in problems):
            assert np.array_equal(job[4], expected[n]), job[1:3]


PTHREADS_ONLY = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("sqz._lookup", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)  # the extension alone: no torch, so no OpenMP runtime in this process
assert not any("omp" in line for line in open("/proc/self/maps")), "an OpenMP runtime is loaded"
rng = np.random.default_rng(5)
indices = rng.integers(0, 6, 1_000_003).astype(np.uint8)
packed = np.packbits(np.unpackbits(indices[:, None], axis=1, bitorder="little")[:, :3].ravel(), bitorder="little")
table = rng.integers(0, 2**16, 6, dtype=np.uint16)
out = np.empty(indices.size, np.uint16)
assert native.lookup_many([(packed, indices.size, 3, table, out, False)] * 3, 2) == []
assert np.array_equal(out, table[indices])
indices[-1] = 7
packed = np.packbits(np.unpackbits(indices[:, None], axis=1, bitorder="little")[:, :3].ravel(), bitorder="little")
assert native.lookup_many([(packed, indices.size, 3, table, out, False)], 2) == [(0, "index")]
print("ok")
"""


@pytest.mark.skipif(bitpack.native_lookup is None or not sys.platform.startswith("linux"),
                    reason="needs the C extension and /proc")
def test_without_an_openmp_runtime_the_extension_runs_its_own_threads():
    """With torch loaded, batches run on its OpenMP threads; a process without one gets sqz's own."""
    import sqz._lookup

    result = subprocess.run([sys.executable, "-c", PTHREADS_ONLY, sqz._lookup.__file__], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@st.composite
def rans_cases(draw):
    """A rANS stream and its counts: either an encoded one (indices of any skew, either rANS stage) or any
    bytes under any counts at all (zero, huge, summing to anything), as a forged file may hold. Codebooks of up
    to 256 entries or (2.3) of 257 to 4,096, whose indices are 16 bits wide."""
    k = draw(st.one_of(st.integers(2, 256), st.integers(257, 4096)))
    bits = 8 if k <= 256 else 12
    if draw(st.booleans()):
        skew = draw(st.floats(0.0, 1.0))
        count = draw(st.integers(1, 3000))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        indices = rng.integers(0, k, count)
        indices = np.where(rng.random(count) < skew, indices % 3, indices).astype(index_dtype(k))
        stage = draw(st.sampled_from(["rans", "rans-compact"]))
        payload = memoryview(entropy.encode_indices(indices, bits, k, stage))
        stream, counts = entropy.rans_frame(payload, count, k, stage)
        return bytes(stream), counts, count, indices
    if k <= 256:
        counts = draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 2**32)), min_size=k, max_size=k))
    else:  # as many counts as a hypothesis list would be slow: small or huge, from a drawn seed
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        counts = np.where(rng.random(k) < draw(st.floats(0.0, 1.0)), rng.integers(0, 4, k), rng.integers(0, 2**32, k))
    return draw(st.binary(max_size=40)), np.array(counts, dtype=np.uint64), draw(st.integers(0, 300)), None


@pytest.mark.skipif(bitpack.native_lookup is None, reason="sqz._lookup was not built (no C compiler at install)")
@settings(max_examples=300, deadline=None)
@given(st.lists(rans_cases(), min_size=1, max_size=9), st.integers(0, 9), st.sampled_from([1, 2]))
def test_rans_jobs_decode_exactly_as_constriction_does(cases, packed_at, threads):
    """The C extension's rANS decoder against constriction's, the reference (entropy's numpy path), on a batch
    of streams decoded together (a thread interleaves up to four, of any lengths, a packed job among them): an
    encoded stream gives its indices back; any bytes under any counts give the same indices or fail in both,
    and only the jobs that fail are reported."""
    jobs, expected = [], []
    for stream, counts, count, indices in cases:
        k = counts.size
        table = np.arange(1000, 1000 + k, dtype=np.uint16)
        width = 8 if k <= 256 else bitpack.WIDE
        jobs.append((stream, count, width, table, np.empty(count, np.uint16), bitpack.FRAME_RANS, counts))
        words = np.frombuffer(stream + b"\0" * (-len(stream) % 4), dtype="<u4")
        try:
            reference = entropy._decode_rans_stream(words, counts, count)
        except (FormatError, ValueError):  # constriction refuses counts that make no model with a ValueError
            reference = None
        expected.append(None if reference is None else table[reference])
        if indices is not None:
            assert reference is not None and np.array_equal(reference, indices)
    plain = np.arange(37, dtype=np.uint8) % 4
    jobs.insert(min(packed_at, len(jobs)), (bitpack.pack(plain, 2), plain.size, 2, np.arange(4, dtype=np.uint8),
                                            np.empty(plain.size, np.uint8), bitpack.FRAME_PACKED))
    expected.insert(min(packed_at, len(expected)), plain)
    problems = bitpack.lookup_many(jobs, threads)
    assert {j for j, _ in problems} == {j for j, e in enumerate(expected) if e is None}, problems
    for job, values in zip(jobs, expected):
        if values is not None:
            assert np.array_equal(job[4], values)


@st.composite
def grouped_rans_cases(draw):
    """A rans-grouped job: an encoded one (indices whose groups differ in spread, the encoder's parameters or any)
    or any bytes under any valid parameters (centres within the codebook, any width), as a forged file may hold;
    grouped by rows or columns, whichever are fewer, of codebooks of up to 256 or (wide) 4,096 entries."""
    k = draw(st.one_of(st.integers(2, 256), st.integers(257, 4096)))
    rows, row = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    axis = draw(st.sampled_from([0, 1]))
    if (rows if axis == 0 else row) > (row if axis == 0 else rows):
        axis = 1 - axis  # spec §4.2: no more groups than indices in each
    groups = rows if axis == 0 else row
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    centres, widths = rng.integers(0, 16 * (k - 1) + 1, groups), rng.integers(0, 256, groups)
    if draw(st.booleans()):
        spread = (k / 4) * rng.random((rows, 1)) * rng.random((1, row))
        values = np.clip(np.round(rng.random() * (k - 1) + rng.normal(size=(rows, row)) * spread), 0, k - 1)
        indices = values.astype(index_dtype(k)).ravel()
        if draw(st.booleans()):
            centres, widths, _ = entropy.fit_gauss(entropy.group_counts(indices, k, row, axis))
        payload = entropy.rans_grouped_payload(indices, k, row, axis, centres, widths)
        stream = payload[1 + 3 * groups:]
    else:
        indices, stream = None, draw(st.binary(max_size=40))
    params = np.empty(groups, dtype=[("centre", "<u2"), ("width", "u1")])
    params["centre"], params["width"] = centres, widths
    return stream, params.tobytes(), k, rows, row, axis, indices


@pytest.mark.skipif(bitpack.native_lookup is None, reason="sqz._lookup was not built (no C compiler at install)")
@settings(max_examples=300, deadline=None)
@given(st.lists(grouped_rans_cases(), min_size=1, max_size=6), st.sampled_from([1, 2]))
def test_grouped_rans_jobs_decode_exactly_as_constriction_does(cases, threads):
    """2.4's rans-grouped in C against constriction (entropy's numpy path), in one batch with a plain rANS job: an
    encoded stream gives its indices back in the matrix's order (a column-grouped stream is transposed); any bytes
    under any parameters give the same indices or fail in both, and only the jobs that fail are reported."""
    jobs, expected = [], []
    for stream, params, k, rows, row, axis, indices in cases:
        table = np.arange(1000, 1000 + k, dtype=np.uint16)
        width = 8 if k <= 256 else bitpack.WIDE
        count = rows * row
        jobs.append((stream, count, width, table, np.empty(count, np.uint16), bitpack.FRAME_RANS, None, params, axis))
        words = np.frombuffer(stream + b"\0" * (-len(stream) % 4), dtype="<u4")
        try:
            grouped = entropy._decode_rans_grouped(words, memoryview(params), k, count)
            reference = grouped.reshape(row, rows).T.ravel() if axis else grouped
        except FormatError:
            reference = None
        expected.append(None if reference is None else table[reference])
        if indices is not None:
            assert reference is not None and np.array_equal(reference, indices)
    check_rans_batch(jobs, expected, threads)


@pytest.mark.skipif(bitpack.native_lookup is None, reason="sqz._lookup was not built (no C compiler at install)")
@pytest.mark.parametrize("params, axis, count, message", [
    (b"\0\0\0\0", 0, 4, "3 bytes of params"), (b"", 0, 4, "3 bytes of params"), (b"\0\0\0" * 3, 0, 4, "divide"),
    (b"\0\0\0", 2, 4, "axis of 0 or 1"), ((16 * 4 + 1).to_bytes(2, "little") + b"\0", 0, 4, "past its last"),
    (b"\0\0\0" * 4, 1, 12, "no more groups than indices"),
])
def test_the_c_extension_refuses_grouped_jobs_it_cannot_run(params, axis, count, message):
    """Parameters the Python side never passes (entropy.rans_grouped_frame checks them) are refused, not read."""
    job = (b"\1\0\0\0", count, 8, np.arange(5, dtype=np.uint8), np.empty(count, np.uint8), bitpack.FRAME_RANS, None,
           params, axis)
    with pytest.raises(ValueError, match=message):
        bitpack.lookup_many([job])


def test_wide_indices_are_looked_up_in_numpy_and_checked():
    """2.3's rANS-coded codebooks of more than 256 entries decode to uint16 indices (bitpack.WIDE): the numpy path
    (decoders without the C extension, and entropy.decode_indices) maps them and refuses one outside the table or a
    stream of the wrong length."""
    indices = np.array([0, 4095, 300, 7, 4095], dtype="<u2")
    table = np.arange(4096, dtype=np.float32) * 0.5
    assert np.array_equal(bitpack.lookup(indices.tobytes(), 5, bitpack.WIDE, table), table[indices])
    with pytest.raises(ValueError, match="outside the 4095-entry codebook"):
        bitpack.lookup(indices.tobytes(), 5, bitpack.WIDE, table[:4095])
    with pytest.raises(ValueError, match="expected 4"):
        bitpack.lookup(indices.tobytes(), 4, bitpack.WIDE, table)
    out = np.empty(5, np.float32)
    saved, bitpack.native_lookup = bitpack.native_lookup, None
    try:
        assert bitpack.lookup_many([(indices, 5, bitpack.WIDE, table, out, bitpack.FRAME_PACKED)]) == []
        assert bitpack.lookup_many([(indices, 5, bitpack.WIDE, table[:10], out, bitpack.FRAME_PACKED)]) == [(0, "index")]
    finally:
        bitpack.native_lookup = saved
    assert np.array_equal(out, table[indices])


@pytest.mark.skipif(bitpack.native_lookup is None, reason="sqz._lookup was not built (no C compiler at install)")
@pytest.mark.parametrize("width,entries,frame,ok", [
    (bitpack.WIDE, 4096, bitpack.FRAME_RANS, True), (bitpack.WIDE, 4097, bitpack.FRAME_RANS, False),
    (8, 256, bitpack.FRAME_RANS, True), (8, 257, bitpack.FRAME_RANS, False), (12, 300, bitpack.FRAME_RANS, False),
    (bitpack.WIDE, 300, bitpack.FRAME_PACKED, False), (9, 300, bitpack.FRAME_PACKED, False)])
def test_the_c_extension_takes_wide_tables_only_in_rans_jobs(width, entries, frame, ok):
    """A table of up to 4,096 entries only with a rANS stream decoded to 16-bit indices; the table of a packed job
    still has at most 2^b <= 256 entries."""
    counts = np.ones(entries, dtype=np.uint64)
    indices = np.arange(entries, dtype=index_dtype(entries))
    stream = entropy.encode_indices(indices, 12 if entries > 256 else 8, entries, "rans")[4 * entries:]
    table = np.arange(entries, dtype=np.uint32)
    job = (stream if frame == bitpack.FRAME_RANS else b"\0" * bitpack.packed_size(entries, min(width, 8)),
           entries, width, table, np.empty(entries, np.uint32), frame, counts)
    if ok:
        assert bitpack.lookup_many([job]) == [] and np.array_equal(job[4], table)
    else:
        with pytest.raises(ValueError):
            bitpack.lookup_many([job])
