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
from sqz.constants import MAGIC, MAX_HEADER_DEPTH
from sqz.errors import ChecksumError, FormatError, LimitError, TruncatedError, UnsupportedVersionError

names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20)


@st.composite
def files(draw):
    tensor_names = draw(st.lists(names, unique=True, max_size=6))
    sections = [draw(st.binary(max_size=300)) for _ in tensor_names]
    records = [{"name": n, "shape": [len(s)], "dtype": "U8", "role": "other", "encoding": "raw", "entropy": "none"}
               for n, s in zip(tensor_names, sections)]
    metadata = draw(st.none() | st.dictionaries(names, names, max_size=3))
    return {"tensors": records, "pairs": [], "config": None, "metadata": metadata}, sections


def write(tmp_path: Path, header: dict, sections: list[bytes]) -> Path:
    path = tmp_path / "f.sqz"
    path.write_bytes(b"".join(container.serialize(header, sections)))
    return path


@settings(max_examples=100, deadline=None)
@given(files())
def test_round_trip(tmp_path_factory, case):
    header, sections = case
    path = write(tmp_path_factory.mktemp("c"), header, sections)
    f = container.Container(path)
    assert [r["name"] for r in f.records] == [r["name"] for r in header["tensors"]]
    assert [bytes(f.section(i)) for i in range(len(sections))] == sections
    assert f.header["metadata"] == header["metadata"]
    assert all(r["offset"] % 8 == 0 for r in f.records)
    f.close()


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
    struct.pack_into("<H", data, 8, 2)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedVersionError, match=r"version 2\.\d+ .*1\.x.*upgrade"):
        container.Container(path)


def test_newer_minor_version_is_read(tmp_path):
    path = simple(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 10, 7)
    path.write_bytes(bytes(data))
    assert container.Container(path).version == (1, 7)


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
    ({"encoding": "kmeans", "bits": 9, "codebook_size": 4, "sample_size": 0, "seed": 0}, FormatError, "bits"),
    ({"encoding": "kmeans", "bits": 2, "codebook_size": 5, "sample_size": 0, "seed": 0}, FormatError, "codebook_size"),
    ({"offset": 3}, FormatError, "aligned"),
    ({"length": 1 << 40, "entropy": "zstd"}, FormatError, "data_size"),
    ({"length": 12}, FormatError, "raw section length"),
    ({"shape": [1 << 26], "encoding": "kmeans", "entropy": "none", "bits": 1, "codebook_size": 1, "sample_size": 1,
      "seed": 0, "length": 4}, LimitError, "expand 4 bytes into 268435456"),
    ({"encoding": "kmeans", "entropy": "zstd-2030", "bits": 2, "codebook_size": 4, "sample_size": 0, "seed": 0},
     FormatError, r"unknown entropy stage 'zstd-2030' \(a newer minor version\? this sqz reads 1\.0-1\.1; upgrade"),
    ({"encoding": "vq"}, FormatError, "unknown encoding 'vq' .*upgrade sqz"),
])
def test_hostile_records_are_refused_at_open(tmp_path, changes, error, match):
    path = forge(tmp_path, {"tensors": [base_record(**changes)], "pairs": [], "data_size": 16}, b"\0" * 16)
    with pytest.raises(error, match=match):
        container.Container(path)


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
    monkeypatch.setattr(container, "validate_header", lambda header, where: (calls.append(where), validate(header, where)))
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
