"""The .sqz container (spec/format.md): preamble, JSON header, data sections.

    preamble  magic[8] | major u16 | minor u16 | header_length u32 | header_crc32 u32   (little-endian)
    header    header_length bytes: one zstd frame (content size set) of UTF-8 JSON (one object)
    crc table 2.0: one u32 CRC-32 per 64 KiB chunk of the data area (1.x: none, each record holds its section's)
    padding   zeros up to the next multiple of 8: the data area starts there
    data      one section per tensor record, checked by CRC-32 when read

In memory every version has one form: records carry offset and length (and crc32 in 1.x), pairs name their
factors, kmeans records say their codebook_dtype, and data_size is set. A 2.0 file stores less (offsets follow
from lengths, pairs index records, CRCs are binary and per chunk): `serialize` writes either version from that
form and `parse_head` gives it back.
Reading validates every claim of the header against the file's real size and the limits in constants.py before
anything is allocated from it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import orjson
import zstandard
from zlib_ng import zlib_ng

from .constants import (
    ALIGNMENT,
    CHUNK_SIZE,
    CODEBOOK_DTYPES,
    CODEBOOK_GRID,
    CRC_SIZE,
    DTYPE_ITEMSIZE,
    ENCODING_KMEANS,
    ENCODINGS,
    ENTROPY_RANS_TRELLIS,
    ENTROPY_STAGES,
    EXPANSION_FLOOR,
    HEADER_DICTIONARY,
    HEADER_DICTIONARY_SHA256,
    LAYER_KINDS,
    MAGIC,
    MAX_BITS,
    MAX_EXPANSION,
    MAX_HEADER_BYTES,
    MAX_KMEANS_NUMEL,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_NUMEL,
    MAX_PAIR_MAGNITUDE,
    MAX_TENSORS,
    MAX_WIDE_BITS,
    MIN_BITS,
    MIN_GAMMA_MAGNITUDE,
    PAIR_KINDS,
    PAIR_SINE,
    PREAMBLE_SIZE,
    QUANTIZABLE_DTYPES,
    RAW_ENTROPY_STAGES,
    READABLE_MAJORS,
    ROLES,
    SCALE_AXES,
    TRELLIS_MIN_ENTRIES,
    VERSION_MAJOR,
    VERSION_MINOR,
    WIDE_ENTROPY_STAGES,
    WRITABLE_VERSIONS,
)
from .entropy import ZSTD_HEADER_LEVEL, zstd_compress, zstd_decompress
from .errors import ChecksumError, FormatError, InputError, LimitError, TruncatedError, UnsupportedVersionError

_PREAMBLE = struct.Struct("<8sHHII")


def _header_dictionary() -> zstandard.ZstdCompressionDict:
    data = (Path(__file__).parent / HEADER_DICTIONARY).read_bytes()
    if hashlib.sha256(data).hexdigest() != HEADER_DICTIONARY_SHA256:  # it is part of the format: never edited
        raise RuntimeError(f"sqz is damaged: {HEADER_DICTIONARY} is not the dictionary of format 2.0")
    return zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


V2_DICTIONARY = _header_dictionary()


def align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib; spec §1, §3.1) by zlib-ng, whose SIMD crc32 is about 8x faster than zlib's."""
    return zlib_ng.crc32(data) & 0xFFFFFFFF


def section_start(end: int, record: dict[str, Any], major: int) -> int:
    """Where a section starts, given where the previous one ended: 1.x aligns every section; 2.0 only the
    `raw`/`none` ones, whose bytes are the tensor's own (a reader may view them in place). Runs on records not
    yet validated (2.0 derives offsets first): a missing field only places the section, validation refuses it."""
    if major == 1 or (record.get("encoding") != ENCODING_KMEANS and record.get("entropy") == "none"):
        return align(end)
    return end


def serialize(header: dict[str, Any], sections: list[bytes],
              version: tuple[int, int] = (VERSION_MAJOR, VERSION_MINOR)) -> list[bytes]:
    """The file as a list of byte chunks, in `version`'s layout. Fills each record's offset/length/crc32 and
    data_size of the in-memory header (the same for every version)."""
    records = header["tensors"]
    if len(records) != len(sections):
        raise ValueError("one section per tensor record")
    if version not in WRITABLE_VERSIONS:
        raise InputError(f"cannot write format {version[0]}.{version[1]}: this sqz writes "
                         f"{', '.join(f'{a}.{b}' for a, b in WRITABLE_VERSIONS)}")
    end = 0
    for record, section in zip(records, sections):
        offset = section_start(end, record, version[0])
        record.update(offset=offset, length=len(section))
        if version[0] == 1:
            record["crc32"] = crc32(section)
        else:
            record.pop("crc32", None)
        end = offset + len(section)
    header["data_size"] = end
    stored = _v1_header(header) if version[0] == 1 else _v2_header(header)
    header_json = json.dumps(stored, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header_json) > MAX_HEADER_BYTES:
        raise LimitError(f"header would be {len(header_json)} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    try:  # what a reader refuses (§3: a lone surrogate, deep nesting in a config) is refused before a file exists
        orjson.loads(header_json)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"the adapter's config or metadata cannot be stored in a .sqz header: {exc}") from None
    header_bytes = zstd_compress(header_json, ZSTD_HEADER_LEVEL, None if version[0] == 1 else V2_DICTIONARY)
    data: list[bytes] = []
    position = 0
    for record, section in zip(records, sections):
        data += [b"\0" * (record["offset"] - position), section]
        position = record["offset"] + len(section)
    table = b"" if version[0] == 1 else chunk_table(b"".join(data))
    head = _PREAMBLE.pack(MAGIC, *version, len(header_bytes), crc32(header_bytes)) + header_bytes + table
    return [head, b"\0" * (align(len(head)) - len(head)), *data]


def chunk_table(data: bytes) -> bytes:
    """2.0's CRC table: the CRC-32 of each CHUNK_SIZE bytes of the data area, u32 little-endian."""
    view = memoryview(data)
    crcs = [crc32(view[at:at + CHUNK_SIZE]) for at in range(0, len(data), CHUNK_SIZE)]
    return struct.pack(f"<{len(crcs)}I", *crcs)


def chunk_count(data_size: int) -> int:
    return -(-data_size // CHUNK_SIZE)


def _v1_header(header: dict[str, Any]) -> dict[str, Any]:
    """The 1.x header: the in-memory form less codebook_dtype, which 1.x does not have (its codebooks are F32, and
    it has no scales)."""
    if any(r.get("codebook_dtype", "F32") != "F32" or "scale_axis" in r for r in header["tensors"]):
        raise ValueError("format 1.x stores F32 codebooks and no scales")
    return {**header, "tensors": [{k: v for k, v in r.items() if k != "codebook_dtype"} for r in header["tensors"]]}


V2_RECORD_KEYS = ("name", "shape", "dtype", "role", "encoding", "entropy", "length")
V2_KMEANS_KEYS = ("bits", "codebook_size", "codebook_dtype")
V2_PAIR_KEYS = ("module", "kind", "layer", "scaling")
V2_SINE_KEYS = ("omega", "gamma")
V2_DERIVED = ("offset", "crc32", "data_size")
"""Fields a 2.0 header leaves out: a reader derives offsets and data_size, and checks chunks, not sections."""


def _v2_header(header: dict[str, Any]) -> dict[str, Any]:
    """The 2.0 header: records without offset/crc32 (or the informative sample_size/seed), pairs naming their
    factors by record index, sine numbers only on sine pairs, no data_size."""
    records = header["tensors"]
    index = {r["name"]: i for i, r in enumerate(records)}
    tensors = [{k: r[k] for k in V2_RECORD_KEYS + (V2_KMEANS_KEYS if r["encoding"] == ENCODING_KMEANS else ())
                + (("scale_axis",) if "scale_axis" in r else ())} for r in records]
    pairs = [{**{k: p[k] for k in V2_PAIR_KEYS + (V2_SINE_KEYS if p["kind"] == PAIR_SINE else ())},
              "a": index[p["a"]], "b": index[p["b"]]} for p in header["pairs"]]
    return {**{k: v for k, v in header.items() if k not in V2_DERIVED}, "tensors": tensors, "pairs": pairs}


def write(f: BinaryIO, header: dict[str, Any], sections: list[bytes],
          version: tuple[int, int] = (VERSION_MAJOR, VERSION_MINOR)) -> int:
    """Write a container to an open binary file; returns the number of bytes written."""
    total = 0
    for chunk in serialize(header, sections, version):
        f.write(chunk)
        total += len(chunk)
    return total


class Container:
    """A validated, memory-mapped .sqz file. Sections are CRC-checked each time they are read."""

    def __init__(self, source: str | Path | bytes, label: str = "<bytes>"):
        """Open a file by path (memory-mapped), or parse a complete file held in memory, which messages call
        `label`."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.where, self._map = label, None  # what messages call the file (a Path would rewrite a label's /)
            self._buf = memoryview(source)
        else:
            path = Path(source)
            self.where, self._map = str(path), self._open_map(path)
            self._buf = memoryview(self._map) if self._map is not None else memoryview(b"")
        self.size = len(self._buf)
        if self.size < PREAMBLE_SIZE:
            if self.size and MAGIC.startswith(bytes(self._buf[:len(MAGIC)])):
                raise TruncatedError(f"{self.where}: truncated: {self.size} bytes, shorter than the preamble")
            raise FormatError(f"{self.where}: not a .sqz file (too short, {self.size} bytes)")
        self.version, self.header, self.data_start, self._chunk_crcs = parse_head(self._buf, self.size, self.where)
        self.records: list[dict[str, Any]] = self.header["tensors"]
        self._checked = bytearray(len(self._chunk_crcs))  # 2.0: which chunks have passed their CRC

    @staticmethod
    def _open_map(path: Path) -> mmap.mmap | None:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return None  # mmap cannot map an empty file; the size check reports it
                return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise FormatError(f"{path}: cannot open: {exc.strerror or exc}") from None

    def section(self, index: int) -> memoryview:
        """A section's bytes, checked: against its record's CRC-32 (1.x) or each chunk it overlaps (2.0; a
        chunk once checked stays checked, so a whole load checks every byte once)."""
        record = self.records[index]
        start = self.data_start + record["offset"]
        view = self._buf[start:start + record["length"]]
        if self.version[0] == 1:
            if crc32(view) != record["crc32"]:
                raise ChecksumError(f"{self.where}: tensor {record['name']!r}: data fails its CRC-32 (corrupted file)")
            return view
        first, stop = record["offset"] // CHUNK_SIZE, -(-(record["offset"] + record["length"]) // CHUNK_SIZE)
        for chunk in range(first, stop if record["length"] else first):  # an empty section has nothing to check
            if not self._checked[chunk]:
                at = self.data_start + chunk * CHUNK_SIZE
                if crc32(self._buf[at:min(at + CHUNK_SIZE, self.size)]) != self._chunk_crcs[chunk]:
                    raise ChecksumError(f"{self.where}: tensor {record['name']!r}: data fails its CRC-32 "
                                        f"(chunk {chunk}; corrupted file)")
                self._checked[chunk] = 1
        return view

    def close(self) -> None:
        """Never fails: while a view of the map is alive (a tensor read without a copy, or an error's traceback
        that holds a section: a corrupted tensor's) the map stays open and closes when the last view goes."""
        self._buf.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()


VALIDATED_HEADERS = 1024
"""Digests of header bytes already validated in this process (LRU): validation is a pure function of them, so a file
opened again (a server decoding an adapter it evicted) skips the header's per-record checks, most of the open
cost. The file-dependent checks (size, padding) run on every open, and every header is parsed afresh."""
_VALIDATED: OrderedDict[bytes, None] = OrderedDict()  # 16-byte BLAKE2b digests: a few KB in all
_VALIDATED_LOCK = threading.Lock()


def parse_head(buf: memoryview, size: int,
               where: str) -> tuple[tuple[int, int], dict[str, Any], int, tuple[int, ...]]:
    """Check preamble and header; return (version, header in its in-memory form, data_start, 2.0's chunk CRCs).
    Never trusts a claim unchecked."""
    magic, major, minor, header_length, header_crc = _PREAMBLE.unpack(buf[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise FormatError(f"{where}: not a .sqz file (bad magic)")
    if major not in READABLE_MAJORS:
        hint = "; a newer sqz wrote it, upgrade sqz" if major > max(READABLE_MAJORS) else ""
        known = " and ".join(f"{m}.x" for m in READABLE_MAJORS)
        raise UnsupportedVersionError(
            f"{where}: format version {major}.{minor} is not supported (this reader knows {known}){hint}")
    if header_length > MAX_HEADER_BYTES:
        raise LimitError(f"{where}: header claims {header_length} bytes, over the {MAX_HEADER_BYTES}-byte limit")
    header_end = PREAMBLE_SIZE + header_length
    if header_end > size:
        raise TruncatedError(f"{where}: truncated inside the header ({size} bytes, header needs {header_end})")
    header_bytes = buf[PREAMBLE_SIZE:header_end]
    if crc32(header_bytes) != header_crc:
        raise ChecksumError(f"{where}: header fails its CRC-32 (corrupted file)")
    try:
        header_json = zstd_decompress(header_bytes, MAX_HEADER_BYTES, exact=False,
                                      dictionary=None if major == 1 else V2_DICTIONARY)
    except FormatError as exc:
        raise type(exc)(f"{where}: header: {exc}") from None
    header = _parse_json(header_json, where)
    chunk_crcs: tuple[int, ...] = ()
    if major == 1:
        _from_v1(header, where)
    else:
        header_end, chunk_crcs = _from_v2(header, buf, size, header_end, where)
    data_start = align(header_end)
    key = hashlib.blake2b(bytes([major]) + header_bytes, digest_size=16).digest()
    with _VALIDATED_LOCK:
        known = _VALIDATED.pop(key, False) is None
    if not known:
        validate_header(header, where, major)
    with _VALIDATED_LOCK:
        _VALIDATED[key] = None  # (re)inserted last: the most recently used
        if len(_VALIDATED) > VALIDATED_HEADERS:
            _VALIDATED.popitem(last=False)
    end = data_start + header["data_size"]
    if size < end:
        raise TruncatedError(f"{where}: truncated: {size} bytes, the header describes {end}")
    if size > end:
        raise FormatError(f"{where}: {size - end} unexpected bytes after the last section")
    _check_padding(buf, header_end, data_start, header["tensors"], where)
    return (major, minor), header, data_start, chunk_crcs


def _records(header: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The header's tensor records, once they are a list of objects within MAX_TENSORS."""
    records = header.get("tensors")
    if not isinstance(records, list):
        _bad(where, "'tensors' must be a list")
    if len(records) > MAX_TENSORS:
        raise LimitError(f"{where}: {len(records)} tensors, over the limit of {MAX_TENSORS}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            _bad(where, f"tensor record {i} must be an object")
    return records


def _from_v1(header: dict[str, Any], where: str) -> None:
    """A 1.x header in the in-memory form: its codebooks are F32 (a codebook_dtype it holds is an unknown 1.x
    field, which a reader ignores, and so is a scale_axis)."""
    for record in _records(header, where):
        record.pop("codebook_dtype", None)
        record.pop("scale_axis", None)
        if record.get("encoding") == ENCODING_KMEANS:
            record["codebook_dtype"] = "F32"


def _from_v2(header: dict[str, Any], buf: memoryview, size: int, header_end: int,
             where: str) -> tuple[int, tuple[int, ...]]:
    """A 2.0 header in the in-memory form: offsets and data_size derived from the lengths (spec §4), pairs'
    factor indices turned into names. Returns where the CRC table ends, and the table."""
    records = _records(header, where)
    end = 0
    for record in records:
        length = record.get("length")
        if not (_is_int(length) and length >= 0):
            _bad(where, f"{record.get('name')!r}: 'length' must be an integer >= 0")
        record.pop("crc32", None)  # not a 2.0 field
        record["offset"] = section_start(end, record, 2)
        end = record["offset"] + length
    header["data_size"] = end
    chunks = chunk_count(end)
    table_end = header_end + CRC_SIZE * chunks
    if table_end > size:  # before the table is read: its length is a claim of the header's
        raise TruncatedError(f"{where}: truncated: {size} bytes, the header describes {table_end + end} or more")
    crcs = struct.unpack_from(f"<{chunks}I", buf, header_end)
    pairs = header.get("pairs")
    if isinstance(pairs, list):
        for pair in pairs:
            if not isinstance(pair, dict):
                continue  # validate_header says what is wrong with it
            for side in ("a", "b"):
                at = pair.get(side)
                if not (_is_int(at) and 0 <= at < len(records)):
                    _bad(where, f"pair {pair.get('module')!r}: {side!r} must be the index of a tensor record")
                pair[side] = records[at].get("name")
            for key in V2_SINE_KEYS:
                pair.setdefault(key, None)
    return table_end, crcs


def _check_padding(buf: memoryview, header_end: int, data_start: int, records: list[dict], where: str) -> None:
    """The bytes between header and sections, and between sections, must be zero (they carry nothing)."""
    gaps = [(header_end, data_start)]
    position = data_start
    for record in records:
        gaps.append((position, data_start + record["offset"]))
        position = data_start + record["offset"] + record["length"]
    for start, stop in gaps:
        if not _all_zero(buf, start, stop):
            raise FormatError(f"{where}: non-zero padding at bytes {start}..{stop}")


_ZERO_PAGE = memoryview(bytes(4096))


def _all_zero(buf: memoryview, start: int, stop: int) -> bool:
    """buf[start:stop] holds only zero bytes; compared a page at a time in C (`any` over a memoryview took a
    third of a 320-tensor open), so a hostile gigabyte gap costs no allocation."""
    while start < stop:
        n = min(stop - start, len(_ZERO_PAGE))
        if buf[start:start + n] != _ZERO_PAGE[:n]:
            return False
        start += n
    return True


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    """orjson, 2.3x faster than json on a 320-tensor header (0.43 against 1.0 ms, most of an open), and stricter:
    it refuses NaN, Infinity, numbers that overflow a double (1e400), lone surrogates and invalid UTF-8. Nesting
    beyond 1024 levels it refuses as well, which is a limit rather than a syntax error."""
    try:
        header = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit"):
            raise LimitError(f"{where}: header JSON nests too deeply ({exc})") from None
        raise FormatError(f"{where}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: header must be a JSON object")
    return header


def _bad(where: str, what: str) -> NoReturn:
    """Validation checks read `if not (cond): _bad(...)`: the message is built only for a bad header."""
    raise FormatError(f"{where}: bad header: {what}")


def _is_int(v: Any) -> bool:
    return type(v) is int  # JSON gives exact ints; this also leaves out bool, an int subclass


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def validate_header(header: dict[str, Any], where: str, major: int = VERSION_MAJOR) -> None:
    """Every field a reader relies on has the right type and a sane value; sections tile the data area. Takes
    the in-memory form of a `major` header (2.0's derived offsets cannot be misaligned: checking costs little)."""
    records = _records(header, where)
    if not (_is_int(header.get("data_size")) and header["data_size"] >= 0):
        _bad(where, "'data_size' must be an integer >= 0")
    for key in ("config", "metadata"):
        if not (header.get(key) is None or isinstance(header[key], dict)):
            _bad(where, f"'{key}' must be an object or null")
    metadata = header.get("metadata") or {}
    if not all(isinstance(v, str) for v in metadata.values()):
        _bad(where, "metadata values must be strings")
    names: set[str] = set()
    end = 0
    for record in records:
        _validate_record(record, where, major)
        if record["name"] in names:
            _bad(where, f"duplicate tensor name {record['name']!r}")
        names.add(record["name"])
        if record["offset"] % ALIGNMENT and major == 1:  # 2.0 derives its offsets (§4)
            _bad(where, f"{record['name']!r}: offset not {ALIGNMENT}-byte aligned")
        if record["offset"] < end:
            _bad(where, f"{record['name']!r}: section overlaps the previous one")
        end = record["offset"] + record["length"]
        if end > header["data_size"]:
            _bad(where, f"{record['name']!r}: section runs past data_size")
    pairs = header.get("pairs")
    if not isinstance(pairs, list):
        _bad(where, "'pairs' must be a list")
    by_name = {r["name"]: r for r in records}
    modules: set[str] = set()
    for pair in pairs:
        _validate_pair(pair, by_name, where)
        if pair["module"] in modules:
            _bad(where, f"duplicate pair module {pair['module']!r}")
        modules.add(pair["module"])


_NEWER = (f"(a newer minor version? this sqz reads "
          f"{' and '.join(f'{major}.0-{major}.{minor}' if minor else f'{major}.0' for major, minor in READABLE_MAJORS.items())}"
          f"; upgrade sqz)")


def _validate_record(r: dict[str, Any], where: str, major: int) -> None:
    """One record's checks, in the order their messages are reported. Written for speed (a first open validates
    every record: a 320-tensor header's checks were 2.3 of its 5.5 ms): dict lookups bound once, ints checked
    by exact type inline (JSON gives exact ints; this also leaves out bool), messages built only on failure."""
    get = r.get
    name = get("name")
    if not (isinstance(name, str) and 0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES):
        _bad(where, "tensor name must be a non-empty string")
    for key in ("offset", "length", "crc32") if major == 1 else ("offset", "length"):
        value = get(key)
        if not (type(value) is int and value >= 0):
            _bad(where, f"{name!r}: '{key}' must be an integer >= 0")
    if major == 1 and r["crc32"] > 0xFFFFFFFF:
        _bad(where, f"{name!r}: crc32 out of range")
    shape, numel, good = get("shape"), 1, False
    if isinstance(shape, list) and len(shape) <= MAX_NDIM:
        for d in shape:
            if not (type(d) is int and d >= 0):
                break
            numel *= d
        else:
            good = True
    if not good:
        _bad(where, f"{name!r}: 'shape' must be a list of at most {MAX_NDIM} integers >= 0")
    if numel > MAX_NUMEL:
        raise LimitError(f"{where}: {name!r} claims {numel} elements, over the limit of {MAX_NUMEL}")
    dtype, length = get("dtype"), r["length"]
    if not (isinstance(dtype, str) and dtype in DTYPE_ITEMSIZE):  # a JSON list would not even hash
        _bad(where, f"{name!r}: unknown dtype {dtype!r}")
    decoded = numel * DTYPE_ITEMSIZE[dtype]
    if decoded > EXPANSION_FLOOR and decoded > MAX_EXPANSION * length:
        raise LimitError(f"{where}: {name!r} would expand {length} bytes into {decoded}, beyond what a "
                         f"{length}-byte section can justify")
    if get("role") not in ROLES:
        _bad(where, f"{name!r}: unknown role {get('role')!r}")
    encoding, entropy = get("encoding"), get("entropy")
    if encoding not in ENCODINGS:
        _bad(where, f"{name!r}: unknown encoding {encoding!r} {_NEWER}")
    if encoding == ENCODING_KMEANS:
        if entropy not in ENTROPY_STAGES:
            _bad(where, f"{name!r}: unknown entropy stage {entropy!r} {_NEWER}")
        if dtype not in QUANTIZABLE_DTYPES:
            _bad(where, f"{name!r}: kmeans needs a float dtype")
        bits, k = get("bits"), get("codebook_size")
        if not (type(bits) is int and MIN_BITS <= bits <= MAX_WIDE_BITS):
            _bad(where, f"{name!r}: bits must be 1..{MAX_WIDE_BITS}")
        if bits > MAX_BITS and (major == 1 or entropy not in WIDE_ENTROPY_STAGES):
            _bad(where, f"{name!r}: bits over {MAX_BITS} need format 2.3 and entropy rans, rans-compact, "
                        f"rans-grouped or rans-trellis, not {entropy!r}")
        if not (type(k) is int and 1 <= k <= (1 << bits)):
            _bad(where, f"{name!r}: codebook_size must be 1..2**bits")
        if entropy == ENTROPY_RANS_TRELLIS and k < TRELLIS_MIN_ENTRIES:
            _bad(where, f"{name!r}: rans-trellis needs a codebook_size of at least {TRELLIS_MIN_ENTRIES}")
        if numel <= 0:
            _bad(where, f"{name!r}: kmeans tensor must not be empty")
        if numel > MAX_KMEANS_NUMEL:
            raise LimitError(f"{where}: {name!r} claims {numel} quantized elements, over the limit of {MAX_KMEANS_NUMEL}")
        codebook_dtype = get("codebook_dtype")
        if codebook_dtype not in CODEBOOK_DTYPES:
            _bad(where, f"{name!r}: unknown codebook_dtype {codebook_dtype!r} {_NEWER}")
        scales = 0
        if "scale_axis" in r:
            axis = r["scale_axis"]
            if axis not in SCALE_AXES or type(axis) is not int:
                _bad(where, f"{name!r}: scale_axis must be 0 or 1")
            rows = shape[0] if shape else 1
            scales = rows if axis == 0 else numel // rows
        if codebook_dtype == CODEBOOK_GRID:  # e, p, m_0 and a unary byte a gap at least; a byte a scale
            least = 3 + -(-(k - 1) // 8) + scales
        else:
            least = DTYPE_ITEMSIZE[codebook_dtype] * (k + scales)
        if length < least:
            _bad(where, f"{name!r}: section shorter than its codebook and scales")
        for key in ("sample_size", "seed") if major == 1 else ():  # informative, and 2.0 leaves them out
            value = get(key)
            if not (type(value) is int and value >= 0):
                _bad(where, f"{name!r}: '{key}' must be an integer >= 0")
    else:
        if entropy not in RAW_ENTROPY_STAGES:
            _bad(where, f"{name!r}: raw tensors use entropy 'none' or 'zstd'")
        if entropy == "none" and length != numel * DTYPE_ITEMSIZE[dtype]:
            _bad(where, f"{name!r}: raw section length != shape x dtype")


def _validate_pair(p: Any, records: dict[str, dict[str, Any]], where: str) -> None:
    """One pair's checks, written for speed as _validate_record is."""
    if not (isinstance(p, dict) and isinstance(p.get("module"), str)):
        _bad(where, "pair must be an object with a 'module'")
    get = p.get
    label = f"pair {p['module']!r}"
    a_name, b_name = get("a"), get("b")  # 1.x: straight from the JSON, so maybe not even hashable
    a = records.get(a_name) if isinstance(a_name, str) else None
    b = records.get(b_name) if isinstance(b_name, str) else None
    if a is None or b is None:
        _bad(where, f"{label}: 'a' and 'b' must name tensors")
    if not (a["dtype"] in QUANTIZABLE_DTYPES and b["dtype"] in QUANTIZABLE_DTYPES):
        _bad(where, f"{label}: factors must be floats")
    a_shape, b_shape = a["shape"], b["shape"]
    if not (len(a_shape) in (2, 4) and len(b_shape) in (2, 4) and a_shape[0] == b_shape[1] > 0
            and math.prod(b_shape[2:]) == 1):
        _bad(where, f"{label}: factor shapes {a_shape} and {b_shape} do not make a LoRA pair")
    kind = get("kind")
    if kind not in PAIR_KINDS:
        _bad(where, f"{label}: unknown kind {kind!r}")
    if get("layer") not in LAYER_KINDS:
        _bad(where, f"{label}: unknown layer {get('layer')!r}")
    if not (_is_num(get("scaling")) and abs(p["scaling"]) <= MAX_PAIR_MAGNITUDE):
        _bad(where, f"{label}: 'scaling' must be a number with |scaling| <= {MAX_PAIR_MAGNITUDE:g}")
    if kind == PAIR_SINE:
        if not (_is_num(get("omega")) and abs(p["omega"]) <= MAX_PAIR_MAGNITUDE):
            _bad(where, f"{label}: sine pairs need a number 'omega' with |omega| <= {MAX_PAIR_MAGNITUDE:g}")
        if not (_is_num(get("gamma")) and MIN_GAMMA_MAGNITUDE <= abs(p["gamma"]) <= MAX_PAIR_MAGNITUDE):
            _bad(where, f"{label}: sine pairs need a number 'gamma' with {MIN_GAMMA_MAGNITUDE:g} <= |gamma| <= "
                        f"{MAX_PAIR_MAGNITUDE:g}")
