import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sqz import entropy
from sqz.errors import FormatError, LimitError


@st.composite
def index_streams(draw):
    bits = draw(st.integers(1, 8))
    k = draw(st.integers(2, 1 << bits)) if bits > 1 else 2
    values = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=400))
    return bits, k, np.array(values, dtype=np.uint8)


@settings(max_examples=150, deadline=None)
@given(index_streams(), st.sampled_from(["none", "zstd", "rans", "zstd-aligned", "rans-compact"]))
def test_every_stage_round_trips(case, stage):
    bits, k, indices = case
    payload = entropy.encode_indices(indices, bits, k, stage)
    decoded = entropy.decode_indices(memoryview(payload), indices.size, bits, k, stage)
    assert np.array_equal(decoded, indices)


@settings(max_examples=200, deadline=None)
@given(index_streams(), st.sampled_from(["rans", "rans-compact"]), st.floats(0.0, 1.0))
def test_no_rans_payload_is_under_its_floor(case, stage, skew):
    """rans_floor lets auto skip the rANS coder where a fast stage is already smaller: it must never exceed a
    payload (streams of every length and skew, one symbol to near-uniform)."""
    bits, k, indices = case
    indices = np.where(np.random.default_rng(indices.size).random(indices.size) < skew, 0, indices).astype(np.uint8)
    counts = np.bincount(indices, minlength=k)
    assert entropy.rans_floor(counts, stage) < len(entropy.encode_indices(indices, bits, k, stage))


def rows_of_decreasing_spread(rows: int, row: int, k: int, seed: int = 0) -> np.ndarray:
    """Indices of a factor like A' in the SVD gauge: row i's values spread as σ_i (here halving every two rows)
    around the middle level, all rows under one codebook of k levels."""
    rng = np.random.default_rng(seed)
    spread = (k / 6) * 0.5 ** (np.arange(rows) / 2)
    values = np.round((k - 1) / 2 + rng.normal(size=(rows, row)) * spread[:, None])
    return np.clip(values, 0, k - 1).astype(np.uint8).ravel()


@settings(max_examples=120, deadline=None)
@given(index_streams(), st.sampled_from(["zstd", "zstd-aligned"]), st.integers(1, 400))
def test_zstd_frames_cut_at_rows_round_trip_and_are_never_larger(case, stage, row):
    """A zstd stage given the row length tries a frame whose blocks end at row boundaries: it decodes to the same
    indices (an ordinary frame, content size declared) and is kept only where smaller."""
    bits, k, indices = case
    indices = np.tile(indices, 1 + 4000 // indices.size)  # enough bytes for blocks of ROW_BLOCK_BYTES
    payload = entropy.encode_indices(indices, bits, k, stage, row=row)
    assert len(payload) <= len(entropy.encode_indices(indices, bits, k, stage))
    assert zstandard.get_frame_parameters(payload).content_size > 0
    assert np.array_equal(entropy.decode_indices(memoryview(payload), indices.size, bits, k, stage), indices)


@pytest.mark.parametrize("bits,stage,ratio", [(4, "zstd-aligned", 0.96), (5, "zstd", 0.95), (8, "zstd-aligned", 0.92)])
def test_rows_of_different_spread_code_smaller_with_a_block_a_row(bits, stage, ratio):
    """Each block gets zstd's own literal table, so rows that differ in spread (A' in the SVD gauge) cost less than
    under one table for all of them. (Huffman codes take a whole bit a symbol at least, so rows of under a bit of
    entropy keep most of their excess: measured 4-11% here, 11-12% on the A' factors of the trained-statistics
    LLaMA-shaped adapter at 3 bits/param.)"""
    k = 1 << bits
    indices = rows_of_decreasing_spread(16, 4096, k)
    whole = entropy.encode_indices(indices, bits, k, stage)
    by_rows = entropy.encode_indices(indices, bits, k, stage, row=4096)
    assert len(by_rows) < ratio * len(whole)
    assert np.array_equal(entropy.decode_indices(memoryview(by_rows), indices.size, bits, k, stage), indices)


def test_rans_reaches_the_entropy_and_beats_zstd_on_skewed_indices():
    rng = np.random.default_rng(0)
    p = np.array([0.02, 0.08, 0.2, 0.4, 0.2, 0.08, 0.015, 0.005])
    indices = rng.choice(8, size=200_000, p=p).astype(np.uint8)
    counts = np.bincount(indices, minlength=8) / indices.size
    h = -(counts * np.log2(counts)).sum()
    rans = 8 * len(entropy.encode_indices(indices, 3, 8, "rans")) / indices.size
    zstd = 8 * len(entropy.encode_indices(indices, 3, 8, "zstd")) / indices.size
    assert h <= rans < h + 0.01
    assert rans < zstd


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_zstd_aligned_stays_close_to_rans(bits):
    """zstd's Huffman coder over byte-aligned lanes: within 2% of the rANS rate at every width, far
    below zstd over the b-bit stream where lanes straddle bytes (the point of the 1.1 stage)."""
    rng = np.random.default_rng(bits)
    k = 1 << bits
    # a discretised Gaussian, like the bins of k-means on a bell-shaped factor
    p = np.exp(-0.5 * ((np.arange(k) - (k - 1) / 2) / max(k / 6, 0.4)) ** 2)
    indices = rng.choice(k, size=200_000, p=p / p.sum()).astype(np.uint8)
    size = {stage: len(entropy.encode_indices(indices, bits, k, stage)) for stage in ("rans", "zstd", "zstd-aligned")}
    assert size["zstd-aligned"] < 1.02 * size["rans"]
    if bits in (3, 5):
        assert size["zstd-aligned"] < 0.95 * size["zstd"]


def test_one_entry_codebook_has_empty_payload():
    assert entropy.encode_indices(np.zeros(50, np.uint8), 3, 1, "rans") == b""
    assert not entropy.decode_indices(memoryview(b""), 50, 3, 1, "none").any()
    with pytest.raises(FormatError, match="empty payload"):
        entropy.decode_indices(memoryview(b"\x00"), 50, 3, 1, "none")


def test_zstd_frame_claiming_more_than_expected_is_refused_before_decompressing():
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 10_000_000)
    with pytest.raises(LimitError, match="declares 10000000"):
        entropy.decode_bytes(memoryview(bomb), 100, "zstd")
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 100)
    with pytest.raises(LimitError):
        entropy.zstd_decompress(no_size, 100)


def test_rans_count_table_must_sum_to_count_and_indices_stay_in_codebook():
    indices = np.array([0, 1, 2, 1, 0], np.uint8)
    payload = bytearray(entropy.encode_indices(indices, 2, 3, "rans"))
    with pytest.raises(FormatError, match="sums to"):
        entropy.decode_indices(memoryview(bytes(payload)), 6, 2, 3, "rans")
    for bits, stage in ((2, "none"), (3, "zstd"), (3, "zstd-aligned"), (5, "zstd-aligned")):
        packed = entropy.encode_indices(np.array([3, 0, 1], np.uint8), bits, 4, stage)
        with pytest.raises(FormatError, match="outside the 3-entry"):
            entropy.decode_indices(memoryview(packed), 3, bits, 3, stage)


def test_zstd_aligned_frame_must_hold_the_aligned_stream():
    """At 3 bits the frame holds 4-bit lanes: a frame of the 3-bit packing (a 1.0 'zstd' payload) is refused."""
    indices = np.arange(8, dtype=np.uint8).repeat(100)
    wrong = entropy.encode_indices(indices, 3, 8, "zstd")
    with pytest.raises(LimitError, match="expected 400"):
        entropy.decode_indices(memoryview(wrong), indices.size, 3, 8, "zstd-aligned")


def test_rans_stream_ending_in_a_zero_word_is_a_format_error():
    """Fuzzing finding: constriction's AnsCoder() itself raises ValueError on such a stream."""
    indices = np.array([0, 1, 2, 1, 0], np.uint8)
    payload = entropy.encode_indices(indices, 2, 3, "rans") + b"\0\0\0\0"
    with pytest.raises(FormatError, match="bad rANS stream"):
        entropy.decode_indices(memoryview(payload), 5, 2, 3, "rans")


@settings(max_examples=100, deadline=None)
@given(index_streams())
def test_rans_compact_is_the_rans_stream_with_a_smaller_table(case):
    """The same words under the same model: only the table shrinks and the last word loses its zero high bytes."""
    bits, k, indices = case
    rans = entropy.encode_indices(indices, bits, k, "rans")
    compact = entropy.encode_indices(indices, bits, k, "rans-compact")
    counts = np.bincount(indices, minlength=k)
    width = int(counts[:-1].max(initial=0)).bit_length()
    table = 1 + -(-(k - 1) * width // 8)
    assert compact[0] == width and len(compact) - table <= len(rans) - 4 * k
    assert rans[4 * k:].startswith(compact[table:])
    assert not any(rans[4 * k + len(compact) - table:])  # what was left out is zero
    assert len(compact) <= len(rans)


def test_rans_compact_table_costs_a_few_bytes_on_a_small_tensor():
    """A rank-2 MiniLM factor's 768 indices at 5 levels: the table is 6 bytes (rans: 20), the stream within
    4 bytes of the entropy."""
    rng = np.random.default_rng(0)
    indices = rng.choice(5, size=768, p=[0.05, 0.2, 0.5, 0.2, 0.05]).astype(np.uint8)
    p = np.bincount(indices) / indices.size
    entropy_bytes = -(p * np.log2(p)).sum() * indices.size / 8
    compact = entropy.encode_indices(indices, 3, 5, "rans-compact")
    assert len(compact) < entropy_bytes + 6 + 4 < len(entropy.encode_indices(indices, 3, 5, "rans")) - 12


@pytest.mark.parametrize("damage, message", [
    (lambda p: b"", "count width"),
    (lambda p: bytes([33]) + p[1:], "count width"),
    (lambda p: p[:1], "shorter than its count table"),
    (lambda p: bytes([32]) + p[1:4], "shorter than its count table"),
    (lambda p: bytes([12, 0xFF, 0xFF, 0xFF]) + p[4:], "sums to more than 7"),
    (lambda p: p + b"\0\0\0\0", "bad rANS|data left"),
    (lambda p: p[:-1], "bad rANS|data left|not empty"),
])
def test_rans_compact_payload_damage_is_a_format_error(damage, message):
    indices = np.array([0, 1, 2, 1, 0, 2, 2], np.uint8)
    payload = entropy.encode_indices(indices, 2, 3, "rans-compact")
    assert payload[0] == 2  # counts 2 and 2 at 2 bits: one byte of table
    with pytest.raises(FormatError, match=message):
        entropy.decode_indices(memoryview(damage(payload)), 7, 2, 3, "rans-compact")


def test_rans_compact_with_nonzero_unused_table_bits_is_refused():
    indices = np.array([0, 1, 2, 1, 0, 2, 2], np.uint8)
    payload = bytearray(entropy.encode_indices(indices, 2, 3, "rans-compact"))
    payload[1] |= 0x80  # the table's 4 bits of counts leave the byte's top 4 unused
    with pytest.raises(FormatError, match="unused bits"):
        entropy.decode_indices(memoryview(bytes(payload)), 7, 2, 3, "rans-compact")


def test_rans_grouped_models_are_the_specs_integer_gaussians():
    """Spec §4.2 rans-grouped: E by its recurrence, and count_j = (E[x mod 256] >> x div 256) + 1 with
    x = ((16j - M)^2 * E[32 (S mod 8)]) >> (23 + S div 8), worked by hand: S = 56 is λ = 1 (2^(-d^2): a level one
    index from the centre gets half the centre's count), M = 8 puts the centre between levels 0 and 1, and S = 0
    (λ = 128) shifts every level but the centre's past 63 bits, leaving the floor of 1."""
    assert entropy.EXP2[0] == 1 << 30 and entropy.EXP2[1] == 1070838486 and entropy.EXP2[255] == 538326470
    assert np.allclose(entropy.EXP2 / 2**30, 2 ** (-np.arange(256) / 256), rtol=1e-7)
    counts = entropy.gauss_counts(np.array([16, 8, 0]), np.array([56, 56, 0]), 4)
    assert counts[0].tolist() == [2**29 + 1, 2**30 + 1, 2**29 + 1, 2**26 + 1]
    assert counts[1].tolist() == [int(entropy.EXP2[64]) + 1] * 2 + [(int(entropy.EXP2[64 * 9 % 256]) >> 2) + 1,
                                                                    (int(entropy.EXP2[64 * 25 % 256]) >> 6) + 1]
    assert counts[2].tolist() == [2**30 + 1, 1, 1, 1]


@st.composite
def grouped_cases(draw):
    """A matrix of indices whose rows or columns differ in spread (any shape, 2 to 4,096 levels) and the parameters
    of its groups: fitted by the encoder, or any at all (centres anywhere in the codebook, any width code)."""
    rows, row = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    k = draw(st.one_of(st.integers(2, 40), st.integers(257, 4096)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = (k / 4) * rng.random((rows, 1)) * rng.random((1, row))
    values = np.clip(np.round(rng.random() * (k - 1) + rng.normal(size=(rows, row)) * spread), 0, k - 1)
    indices = values.astype(np.uint16 if k > 256 else np.uint8).ravel()
    axis = entropy.group_axis(indices.size, row)
    groups = rows if axis == 0 else row
    if draw(st.booleans()):
        centres, widths, _ = entropy.fit_gauss(entropy.group_counts(indices, k, row, axis))
    else:
        centres = rng.integers(0, 16 * (k - 1) + 1, groups)
        widths = rng.integers(0, 256, groups)
    return indices, k, row, axis, centres, widths


@settings(max_examples=150, deadline=None)
@given(grouped_cases())
def test_rans_grouped_round_trips_under_any_group_parameters(case):
    """Any parameters code any indices (every count is at least 1), never below grouped_floor, by which auto skips
    fitting the groups where another stage is already smaller."""
    indices, k, row, axis, centres, widths = case
    bits = 12 if k > 256 else 8
    payload = entropy.rans_grouped_payload(indices, k, row, axis, centres, widths)
    assert payload[0] == axis and len(payload) >= 1 + 3 * centres.size
    assert entropy.grouped_floor(entropy.group_counts(indices, k, row, axis)) < len(payload)
    decoded = entropy.decode_indices(memoryview(payload), indices.size, bits, k, "rans-grouped", row)
    assert np.array_equal(decoded, indices)


def test_rans_grouped_codes_components_of_different_spread_near_their_own_entropies():
    """Rows of A' in the SVD gauge (spread halving every two rows): one count table for all (rans-compact) codes
    them at the entropy of the rows pooled; a Gaussian a row, 3 bytes each, comes within 2% of the sum of the rows'
    own empirical entropies, a bound no coder that stores a count table a row reaches once its tables are paid
    (measured: 3,173 bytes against rans-compact's 3,658, the rows' own entropies 3,132)."""
    rows, row, k = 8, 1024, 40
    indices = rows_of_decreasing_spread(rows, row, k)
    grouped = entropy.encode_indices(indices, 8, k, "rans-grouped", row)
    compact = entropy.encode_indices(indices, 8, k, "rans-compact")
    own = 0.0
    for group in indices.reshape(rows, row):
        p = np.bincount(group, minlength=k) / row
        own -= row * (p[p > 0] * np.log2(p[p > 0])).sum() / 8
    assert len(grouped) < 1.02 * own + 3 * rows + 8 and len(grouped) < 0.9 * len(compact)


@pytest.mark.parametrize("damage, message", [
    (lambda p: b"", "axis of 0 or 1"),
    (lambda p: bytes([2]) + p[1:], "axis of 0 or 1"),
    (lambda p: bytes([1]) + p[1:], "axis 1 makes 64 groups of 4 indices"),  # the longer side: 64 models of 4 values
    (lambda p: p[:1 + 3 * 4 - 1], "shorter than its 4 groups' parameters"),
    (lambda p: p[:1] + (16 * 9 + 1).to_bytes(2, "little") + p[3:], r"centre 145/16 is past the codebook's last index"),
    (lambda p: p + b"\0\0\0\1", "bad rANS|data left"),
    (lambda p: p[:-2], "bad rANS|data left|not empty"),
])
def test_rans_grouped_payload_damage_is_a_format_error(damage, message):
    indices = rows_of_decreasing_spread(4, 64, 10)
    payload = entropy.encode_indices(indices, 4, 10, "rans-grouped", 64)
    assert payload[0] == 0  # 4 rows of 64: grouped by rows
    with pytest.raises(FormatError, match=message):
        entropy.decode_indices(memoryview(damage(payload)), indices.size, 4, 10, "rans-grouped", 64)
