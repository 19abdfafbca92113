"""The container on its own: any valid header and sections round-trip; broken files raise the right SqzError."""
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import sqz
from sqz import container
from sqz.constants import CHUNK_SIZE, MAGIC, MAX_HEADER_DEPTH
from sqz.errors import ChecksumError, FormatError, LimitError, TruncatedError, UnsupportedVersionError

names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)


@st.composite
def files(draw):
    """Raw records whose sections are stored as they are (`none`: aligned in every version) or compressed
    (`zstd`: the container never looks inside a section, so any bytes do)."""
    tensor_names = draw(st.lists(names, unique=True, max_size=6))
    sections = [draw(st.binary(max_size=300)) for _ in tensor_names]
    records = [{"name": n, "shape": [len(s)], "dtype": "U8", "role": "other", "encoding": "raw",
                "entropy": draw(st.sampled_from(["none", "zstd"]))} for n, s in zip(tensor_names, sections)]
    metadata = draw(st.none() | st.dictionaries(names, names, max_size=3))
    return {"tensors": records, "pairs": [], "config": None, "metadata": metadata}, sections


def write(tmp_path: Path, header: dict, sections: list[bytes], version: tuple[int, int] = (2, 0)) -> Path:
    path = tmp_path / "f.sqz"
    path.write_bytes(b"".join(container.serialize(header, sections, version)))
    return path


@settings(max_examples=100, deadline=None)
@given(files(), st.sampled_from([(1, 1), (2, 0), (2, 1), (2, 2)]))
def test_round_trip(tmp_path_factory, case, version):
    header, sections = case
    path = write(tmp_path_factory.mktemp("c"), header, sections, version)
    f = container.Container(path)
    assert f.version == version
    assert [r["name"] for r in f.records] == [r["name"] for r in header["tensors"]]
    assert [bytes(f.section(i)) for i in range(len(sections))] == sections
    assert f.header["metadata"] == header["metadata"]
    end = 0
    for r in f.records:  # 1.x aligns every section; 2.0 only those a reader may view in place (raw, none)
        aligned = version[0] == 1 or r["entropy"] == "none"
        assert r["offset"] == (-(-end // 8) * 8 if aligned else end)
        end = r["offset"] + r["length"]
    f.close()


def test_each_chunk_is_checked_by_the_sections_that_overlap_it(tmp_path):
    """2.0 keeps one CRC-32 per 64 KiB chunk of the data area: a flipped byte anywhere in a chunk fails every
    section that overlaps that chunk, and no other."""
    sizes = [100, CHUNK_SIZE, 50, 2 * CHUNK_SIZE + 7, 3]
    records = [{"name": f"t{i}", "shape": [n], "dtype": "U8", "role": "other", "encoding": "raw", "entropy": "zstd"}
               for i, n in enumerate(sizes)]
    sections = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    data = write(tmp_path, {"tensors": records, "pairs": [], "config": None, "metadata": None}, sections).read_bytes()
    clean = container.Container(data)
    assert [(r["offset"], r["length"]) for r in clean.records] == [(0, 100), (100, CHUNK_SIZE), (CHUNK_SIZE + 100, 50),
                                                                   (CHUNK_SIZE + 150, 2 * CHUNK_SIZE + 7),
                                                                   (3 * CHUNK_SIZE + 157, 3)]
    for chunk in range(4):
        flipped = bytearray(data)
        flipped[clean.data_start + chunk * CHUNK_SIZE + 60] ^= 1
        f = container.Container(bytes(flipped))
        for i, r in enumerate(f.records):
            overlaps = r["offset"] // CHUNK_SIZE <= chunk <= (r["offset"] + r["length"] - 1) // CHUNK_SIZE
            if overlaps:
                with pytest.raises(ChecksumError, match=f"'t{i}'.*chunk {chunk}"):
                    f.section(i)
            else:
                assert bytes(f.section(i)) == sections[i]


def simple(tmp_path: Path) -> Path:
    header = {"tensors": [{"name": "t", "shape": [5], "dtype": "U8", "role": "other", "encoding": "raw",
                           "entropy": "none"}], "pairs": [], "config": None, "metadata": None}
    return write(tmp_path, header, [b"hello"])


def test_wrong_magic(tmp_path):
    path = simple(tmp_path)
    path.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(FormatError, match="bad magic"):
        container.Container(path)


def test_future_major_version_names_both_versions(tmp_path):
    path = simple(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 3)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersionError, match=r"version 3\.\d+ .*1\.x and 2\.x.*upgrade"):
        container.Container(path)


def test_newer_minor_version_is_read(tmp_path):
    path = simple(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, 7)
    path.write_bytes(bytes(data))
    assert container.Container(path).version == (2, 7)


def test_truncation_at_every_offset_is_reported(tmp_path):
    data = simple(tmp_path).read_bytes()
    for cut in range(len(data)):
        path = tmp_path / "cut.sqz"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError) as info:
            container.Container(path).section(0)
        assert cut < 8 or isinstance(info.value, TruncatedError), (cut, info.value)


def test_flipped_data_byte_fails_the_section_checksum(tmp_path):
    path = simple(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    f = container.Container(path)
    with pytest.raises(ChecksumError, match="'t'"):
        f.section(0)


def forge(tmp_path: Path, header: dict, data: bytes = b"") -> Path:
    """A file with a correct preamble and CRC around an arbitrary (hostile) header."""
    body = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    head = MAGIC + struct.pack("<HHII", 1, 0, len(body), zlib.crc32(body)) + body
    path = tmp_path / "forged.sqz"
    path.write_bytes(head + b"\0" * (-len(head) % 8) + data)
    return path


def base_record(**changes) -> dict:
    record = {"name": "t", "shape": [4], "dtype": "F32", "role": "other", "encoding": "raw", "entropy": "none",
              "offset": 0, "length": 16, "crc32": 0}
    return {**record, **changes}


@pytest.mark.parametrize("changes,error,match", [
    ({"shape": [1 << 30, 1 << 30]}, LimitError, "elements"),
    ({"shape": [1] * 9}, FormatError, "shape"),
    ({"dtype": "F128"}, FormatError, "dtype"),
    ({"encoding": "kmeans", "bits": 9, "codebook_size": 4, "sample_size": 0, "seed": 0}, FormatError,
     "bits over 8 need format 2.3 and entropy rans, rans-compact, rans-grouped or rans-trellis, not 'none'"),
    ({"encoding": "kmeans", "entropy": "rans", "bits": 9, "codebook_size": 4, "sample_size": 0, "seed": 0},
     FormatError, "bits over 8 need format 2.3"),  # this file is 1.0
    ({"encoding": "kmeans", "entropy": "rans", "bits": 13, "codebook_size": 4, "sample_size": 0, "seed": 0},
     FormatError, r"bits must be 1\.\.12"),
    ({"encoding": "kmeans", "entropy": "rans-compact", "bits": 0, "codebook_size": 1, "sample_size": 0, "seed": 0},
     FormatError, r"bits must be 1\.\.12"),
    ({"encoding": "kmeans", "bits": 2, "codebook_size": 5, "sample_size": 0, "seed": 0}, FormatError, "codebook_size"),
    ({"encoding": "kmeans", "entropy": "rans-trellis", "bits": 2, "codebook_size": 3, "sample_size": 0, "seed": 0},
     FormatError, "rans-trellis needs a codebook_size of at least 4"),
    ({"offset": 3}, FormatError, "aligned"),
    ({"length": 1 << 40, "entropy": "zstd"}, FormatError, "data_size"),
    ({"length": 12}, FormatError, "raw section length"),
    ({"shape": [1 << 26], "encoding": "kmeans", "entropy": "none", "bits": 1, "codebook_size": 1, "sample_size": 1,
      "seed": 0, "length": 4}, LimitError, "expand 4 bytes into 268435456"),
    ({"encoding": "kmeans", "entropy": "zstd-2030", "bits": 2, "codebook_size": 4, "sample_size": 0, "seed": 0},
     FormatError, r"unknown entropy stage 'zstd-2030' \(a newer minor version\? this sqz reads 1\.0-1\.1 and 2\.0-2\.5; upgrade"),
    ({"encoding": "vq"}, FormatError, "unknown encoding 'vq' .*upgrade sqz"),
])
def test_hostile_records_are_refused_at_open(tmp_path, changes, error, match):
    path = forge(tmp_path, {"tensors": [base_record(**changes)], "pairs": [], "data_size": 16}, b"\0" * 16)
    with pytest.raises(error, match=match):
        container.Container(path)


def forge_v2(header: dict, area: bytes, table: bytes | None = None) -> bytes:
    """A 2.0 file of any header, compressed with the format's dictionary; the chunk table made valid unless given."""
    body = zstandard.ZstdCompressor(dict_data=container.V2_DICTIONARY).compress(json.dumps(header).encode())
    table = container.chunk_table(area) if table is None else table
    head = MAGIC + struct.pack("<HHII", 2, 0, len(body), zlib.crc32(body)) + body + table
    return head + b"\0" * (container.align(len(head)) - len(head)) + area


def v2_record(**changes) -> dict:
    record = {"name": "t", "shape": [4], "dtype": "F32", "role": "other", "encoding": "raw", "entropy": "none",
              "length": 16}
    return {k: v for k, v in {**record, **changes}.items() if v is not None}


PAIR_OF_TWO = [v2_record(name="a", shape=[2, 2], role="lora_A"), v2_record(name="b", shape=[2, 2], role="lora_B")]


@pytest.mark.parametrize("header,error,match", [
    ({"tensors": [v2_record(encoding=None)]}, FormatError, "unknown encoding None"),  # fuzzing: a KeyError once
    ({"tensors": [v2_record(entropy=None)]}, FormatError, "raw tensors use entropy"),
    ({"tensors": [v2_record(length=-16)]}, FormatError, "'length' must be an integer"),
    ({"tensors": [v2_record(length="16")]}, FormatError, "'length' must be an integer"),
    ({"tensors": [v2_record(length=1 << 40, entropy="zstd")]}, TruncatedError, "truncated"),
    ({"tensors": ["t"]}, FormatError, "tensor record 0 must be an object"),
    ({"tensors": [v2_record(encoding="kmeans", entropy="none", bits=2, codebook_size=4, codebook_dtype="F8")]},
     FormatError, "unknown codebook_dtype 'F8'"),
    ({"tensors": [v2_record(encoding="kmeans", entropy="none", bits=2, codebook_size=4)]},
     FormatError, "unknown codebook_dtype None"),
    ({"tensors": [v2_record(encoding="kmeans", entropy="zstd-aligned", bits=12, codebook_size=4,
                            codebook_dtype="F16")]}, FormatError, "bits over 8 need format 2.3 and entropy rans"),
    ({"tensors": [v2_record(encoding="kmeans", entropy="rans", bits=12, codebook_size=4097, codebook_dtype="F16")]},
     FormatError, "codebook_size must be 1..2\\*\\*bits"),
    ({"tensors": PAIR_OF_TWO, "pairs": [{"module": "m", "a": 0, "b": 2, "kind": "lora", "layer": "linear",
                                         "scaling": 1.0}]}, FormatError, "'b' must be the index of a tensor record"),
    ({"tensors": PAIR_OF_TWO, "pairs": [{"module": "m", "a": "a", "b": "b", "kind": "lora", "layer": "linear",
                                         "scaling": 1.0}]}, FormatError, "'a' must be the index of a tensor record"),
    ({"tensors": PAIR_OF_TWO, "pairs": [{"module": "m", "a": 0, "b": 1, "kind": "sine", "layer": "linear",
                                         "scaling": 1.0}]}, FormatError, "sine pairs need a number 'omega'"),
])
def test_hostile_2_0_headers_are_refused_at_open(header, error, match):
    area = b"\0" * sum(r.get("length", 0) for r in header["tensors"] if isinstance(r, dict) and
                       isinstance(r.get("length"), int) and 0 <= r["length"] < 1 << 20)
    with pytest.raises(error, match=match):
        container.Container(forge_v2({"pairs": [], **header}, area))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=4)
RECORD_KEYS = ["name", "shape", "dtype", "role", "encoding", "entropy", "offset", "length", "crc32", "bits",
               "codebook_size", "codebook_dtype", "scale_axis", "sample_size", "seed"]
PAIR_KEYS = ["module", "a", "b", "kind", "layer", "scaling", "omega", "gamma"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([1, 2]), st.data())
def test_any_json_value_in_any_field_is_read_or_refused_with_an_sqz_error(tmp_path_factory, major, data):
    """A forged header may hold any JSON in any field of a record or pair (a list where a name or dtype goes
    would not even hash): opening it either works or raises an SqzError, never anything else."""
    kmeans = {"encoding": "kmeans", "bits": 2, "codebook_size": 4, "codebook_dtype": "F32", "sample_size": 0, "seed": 0}
    records = [base_record(name="a", shape=[2, 2], role="lora_A", **kmeans),
               base_record(name="b", shape=[2, 2], role="lora_B", offset=16)]
    pair = {"module": "m", "a": "a" if major == 1 else 0, "b": "b" if major == 1 else 1, "kind": "sine",
            "layer": "linear", "scaling": 1.0, "omega": 2.0, "gamma": 1.5}
    if data.draw(st.booleans()):
        records[data.draw(st.integers(0, 1))][data.draw(st.sampled_from(RECORD_KEYS))] = data.draw(JSON_VALUES)
    else:
        pair[data.draw(st.sampled_from(PAIR_KEYS))] = data.draw(JSON_VALUES)
    header = {"tensors": records, "pairs": [pair], "data_size": 32}
    if major == 1:
        path = forge(tmp_path_factory.mktemp("any"), header, b"\0" * 32)
    else:
        for record in records:
            for key in ("offset", "crc32", "sample_size", "seed"):
                record.pop(key, None)
        path = tmp_path_factory.mktemp("any") / "forged.sqz"
        path.write_bytes(forge_v2({"tensors": records, "pairs": [pair]}, b"\0" * 32))
    try:
        container.Container(path).close()
    except sqz.SqzError:
        pass


def test_a_2_0_file_with_a_bad_or_cut_crc_table(tmp_path):
    """The CRC table is read only once the header's lengths say how long it is, and it must be all there; a wrong
    entry fails the chunk (and its sections) when read, not the open."""
    header = {"tensors": [v2_record(entropy="zstd", length=5)], "pairs": []}
    good = forge_v2(header, b"hello")
    assert bytes(container.Container(good).section(0)) == b"hello"
    bad = container.Container(forge_v2(header, b"hello", table=struct.pack("<I", zlib.crc32(b"hellO"))))
    with pytest.raises(ChecksumError, match="chunk 0"):
        bad.section(0)
    cut = good[:container.Container(good).data_start - 8]  # into the table: the data area is gone too
    with pytest.raises(TruncatedError):
        container.Container(cut)


def test_overlapping_sections_and_giant_header_claims(tmp_path):
    records = [base_record(), base_record(name="u", offset=8)]
    with pytest.raises(FormatError, match="overlaps"):
        container.Container(forge(tmp_path, {"tensors": records, "pairs": [], "data_size": 24}, b"\0" * 24))
    path = simple(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 12, 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    with pytest.raises(LimitError, match="header claims"):
        container.Container(path)


@pytest.mark.parametrize("depth,error,match", [(MAX_HEADER_DEPTH, FormatError, "must be a JSON object"),
                                               (MAX_HEADER_DEPTH + 1, LimitError, "nests"),
                                               (100_000, LimitError, "nests")])
def test_deep_json_is_refused(tmp_path, depth, error, match):
    body = zstandard.ZstdCompressor().compress(b"[" * depth + b"]" * depth)
    path = tmp_path / "deep.sqz"
    path.write_bytes(MAGIC + struct.pack("<HHII", 1, 0, len(body), zlib.crc32(body)) + body)
    with pytest.raises(error, match=match):
        container.Container(path)


@pytest.mark.parametrize("body", [b'{"data_size": NaN}', b'{"data_size": Infinity}', b'{"data_size": 1e400}',
                                  b'{"name": "\\ud800"}', b'{"name": "\xff"}', b'{"a": 1} x'])
def test_header_json_that_is_not_strict_json_is_refused(tmp_path, body):
    frame = zstandard.ZstdCompressor().compress(body)
    path = tmp_path / "loose.sqz"
    path.write_bytes(MAGIC + struct.pack("<HHII", 1, 0, len(frame), zlib.crc32(frame)) + frame)
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        container.Container(path)


def test_a_config_the_reader_would_refuse_is_refused_before_any_file_exists(peft_dir, tmp_path):
    config = peft_dir / "adapter_config.json"
    config.write_text(config.read_text().replace('"bias"', '"note": "\\ud800", "bias"', 1))  # a lone surrogate
    out = tmp_path / "a.sqz"
    with pytest.raises(sqz.InputError, match="config or metadata cannot be stored"):
        sqz.encode(peft_dir, out, sqz.EncodeOptions(bits=2))
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no output, no temporary file left behind


def test_writer_is_deterministic():
    header = {"tensors": [{"name": "t", "shape": [3], "dtype": "U8", "role": "other", "encoding": "raw",
                           "entropy": "none"}], "pairs": [], "config": None, "metadata": None}
    a, b = io.BytesIO(), io.BytesIO()
    container.write(a, json.loads(json.dumps(header)), [b"abc"])
    container.write(b, json.loads(json.dumps(header)), [b"abc"])
    assert a.getvalue() == b.getvalue()


def test_a_header_is_validated_once_per_process_and_a_bad_one_every_time(tmp_path, monkeypatch):
    calls = []
    validate = container.validate_header
    monkeypatch.setattr(container, "validate_header",
                        lambda header, where, major: (calls.append(where), validate(header, where, major)))
    good = write(tmp_path, {"tensors": [{"name": "t", "shape": [3], "dtype": "U8", "role": "other", "encoding": "raw",
                                         "entropy": "none"}], "pairs": [], "config": None, "metadata": {"n": "x"}},
                 [b"abc"])
    for _ in range(3):
        assert container.Container(good).section(0).tobytes() == b"abc"
        assert container.Container(good.read_bytes()).header["metadata"] == {"n": "x"}
    assert len(calls) == 1  # the same header bytes: validated once
    data = bytearray(good.read_bytes())
    data[-1] ^= 1  # the data changes, the header does not: still caught, by the section's CRC
    with pytest.raises(ChecksumError):
        container.Container(bytes(data)).section(0)
    bad = forge(tmp_path, {"tensors": [base_record(offset=3)], "pairs": [], "data_size": 16}, b"\0" * 16)
    for _ in range(2):
        with pytest.raises(FormatError, match="aligned"):
            container.Container(bad)
    assert len(calls) == 3  # a refused header is never remembered as good
