"""sqz.load decodes in batches: a miss reads ahead, the batch shares one buffer and one native lookup call.

These tests pin what that must never change: what a lookup returns, how far it reads ahead, and that a
bad tensor in a batch reports on its own and spoils none of the others.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import mixed_tensors

import sqz
from sqz import bitpack, container, loader
from sqz.constants import CHUNK_SIZE, DTYPE_ITEMSIZE, ENCODING_KMEANS


@pytest.fixture(params=["auto", "zstd-aligned"])
def mixed_sqz(request, tmp_path: Path, mixed_file: Path) -> Path:
    """Every dtype and role; with zstd-aligned, every kmeans tensor goes through a zstd frame."""
    out = tmp_path / "m.sqz"
    sqz.encode(mixed_file, out, sqz.EncodeOptions(bits=3, sample=0, entropy=request.param))
    return out


def read_all(adapter: sqz.SqzAdapter) -> dict[str, torch.Tensor | sqz.SqzError]:
    """Every tensor, in file order, or the error reading it raised."""
    out: dict[str, torch.Tensor | sqz.SqzError] = {}
    for name in adapter:
        try:
            out[name] = adapter[name]
        except sqz.SqzError as exc:
            out[name] = exc
    return out


def rewrite(path: Path, edit, version: tuple[int, int] = (2, 0)) -> bytes:
    """The file re-serialized after edit(records, sections): every CRC and offset is valid again."""
    f = container.Container(path)
    header = copy.deepcopy(f.header)
    sections = [bytes(f.section(i)) for i in range(len(f.records))]
    f.close()
    edit(header["tensors"], sections)
    return b"".join(container.serialize(header, sections, version))


def test_a_miss_reads_ahead_in_file_order_up_to_the_limit(monkeypatch, mixed_sqz):
    monkeypatch.setattr(loader, "READ_AHEAD_BYTES", 1000)
    adapter = sqz.load(mixed_sqz)
    records = adapter.header["tensors"]
    sizes = [math.prod(r["shape"]) * DTYPE_ITEMSIZE[r["dtype"]] for r in records]
    adapter[records[1]["name"]]
    expected, total = [records[1]["name"]], sizes[1]
    for record, size in zip(records[2:], sizes[2:]):
        if total >= 1000:
            break
        expected.append(record["name"])
        total += size
    assert len(expected) > 1 and list(adapter._cache) == expected  # the asked-for one, then those after it
    adapter[records[0]["name"]]  # a miss before a decoded tensor stops there
    assert list(adapter._cache) == expected + [records[0]["name"]]


def test_batched_decoding_returns_what_one_at_a_time_does(monkeypatch, mixed_sqz, decoder):
    batched = read_all(sqz.load(mixed_sqz))
    monkeypatch.setattr(loader, "READ_AHEAD_BYTES", 0)  # one tensor per batch
    single = read_all(sqz.load(mixed_sqz))
    assert batched.keys() == single.keys() == mixed_tensors().keys()
    for name, tensor in batched.items():
        assert tensor.dtype == single[name].dtype and torch.equal(tensor, single[name]), name


def first_kmeans(records: list[dict], after: int = 0) -> int:
    return next(i for i, r in enumerate(records) if i > after and r["encoding"] == ENCODING_KMEANS
                and r["codebook_size"] > 2)


@pytest.mark.parametrize("damage", ["checksum", "chunk", "codebook", "index"])
def test_a_bad_tensor_in_a_batch_reports_alone(tmp_path, mixed_file, mixed_sqz, damage, decoder):
    """One damaged tensor, read ahead with the others: only it raises, and only when it is asked for. A flipped
    byte fails its section's CRC-32 in 1.x ("checksum"), its 64 KiB chunk's in 2.0 ("chunk"): there every tensor
    that shares the chunk raises (this file is one chunk; test_container shows the others unharmed)."""
    # the same file as 1.1 writes it (F32 codebooks), else as 2.1 does (F16: entries of one size to swap or drop;
    # a damaged GRID codebook: test_grid)
    fmt, version = ("1.1", (1, 1)) if damage == "checksum" else ("2.1", (2, 1))
    source = tmp_path / "src.sqz"
    entropy = sqz.load(mixed_sqz).header["options"]["entropy"]
    sqz.encode(mixed_file, source, sqz.EncodeOptions(bits=3, sample=0, entropy=entropy, format=fmt))
    clean = read_all(sqz.load(source))
    records = sqz.load(source).header["tensors"]
    victim = first_kmeans(records, after=1)
    entry = DTYPE_ITEMSIZE[records[victim]["codebook_dtype"]]

    def edit(records: list[dict], sections: list[bytes]) -> None:
        k = records[victim]["codebook_size"]
        if damage == "codebook":  # two entries swapped: no longer strictly increasing
            cb = sections[victim]
            sections[victim] = cb[entry:2 * entry] + cb[:entry] + cb[2 * entry:]
        elif damage == "index":  # the last entry dropped: the indices that used it point past the codebook
            sections[victim] = sections[victim][:entry * (k - 1)] + sections[victim][entry * k:]
            records[victim]["codebook_size"] = k - 1

    data = bytearray(rewrite(source, edit, version))
    damaged = {records[victim]["name"]}
    if damage in ("checksum", "chunk"):
        f = container.Container(bytes(data))
        data[f.data_start + f.records[victim]["offset"] + 1] ^= 0x10
        if damage == "chunk":
            assert f.header["data_size"] < CHUNK_SIZE
            damaged = {r["name"] for r in f.records if r["length"]}
    expected = {"checksum": sqz.ChecksumError, "chunk": sqz.ChecksumError, "codebook": sqz.FormatError,
                "index": sqz.FormatError}[damage]
    match = {"checksum": "CRC-32", "chunk": "CRC-32 (chunk 0", "codebook": "strictly increasing",
             "index": "outside"}[damage]
    adapter = sqz.load(bytes(data))
    if damage != "chunk":
        assert torch.equal(adapter[records[0]["name"]], clean[records[0]["name"]])  # its batch holds the victim
    got = read_all(adapter)
    for name, tensor in got.items():
        if name in damaged:
            assert isinstance(tensor, expected) and match in str(tensor), tensor
        else:
            assert torch.equal(tensor, clean[name]), name


def test_out_of_memory_falls_back_to_a_buffer_per_tensor(mixed_sqz):
    """When a batch's buffer does not fit, each tensor gets its own; one that still does not fit is a
    LimitError of its own, and the others decode as usual."""
    import numpy as np

    from sqz.codec import decode_tensors

    f = container.Container(mixed_sqz)
    items = [(r, f.section(i)) for i, r in enumerate(f.records)]
    sizes = [math.prod(r["shape"]) * DTYPE_ITEMSIZE[r["dtype"]] for r in f.records]
    limit = sorted(sizes)[len(sizes) // 2]

    def tight(size: int) -> np.ndarray:
        if size > limit:
            raise MemoryError(size)
        return np.empty(size, np.uint8)

    reference = decode_tensors(items)
    for result, want, size, (record, _) in zip(decode_tensors(items, allocate=tight), reference, sizes, items):
        if size > limit:
            assert isinstance(result, sqz.LimitError) and "does not fit in memory" in str(result), record["name"]
        else:
            assert np.array_equal(result, want), record["name"]


def test_decoding_follows_torchs_thread_count(monkeypatch, mixed_sqz):
    """sqz decodes on as many threads as torch computes with, so a process limited to one stays on one."""
    monkeypatch.setattr(loader, "READ_AHEAD_BYTES", 1 << 30)
    calls = []
    lookup_many = bitpack.lookup_many

    def spy(jobs, threads=1):
        calls.append(threads)
        return lookup_many(jobs, threads)

    monkeypatch.setattr(bitpack, "lookup_many", spy)
    reference = read_all(sqz.load(mixed_sqz))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = read_all(sqz.load(mixed_sqz))
    finally:
        torch.set_num_threads(before)
    assert calls == [before, 1]
    assert all(torch.equal(single[name], tensor) for name, tensor in reference.items())
