"""Coverage-guided fuzzing of the .sqz reader with atheris: any input must decode or raise an SqzError.

    python fuzz/fuzz_reader.py -max_total_time=30                        # raw bytes (CI does 30 s of each)
    SQZ_FUZZ=structured python fuzz/fuzz_reader.py -max_total_time=30   # header JSON + data, CRCs made valid
    python fuzz/fuzz_reader.py fuzz/corpus -max_total_time=3600           # a long run, keeping its corpus

raw: the input is a whole file, so most mutations stop at a CRC check (which is the point of them).
structured: the input is header JSON, a NUL byte, then the data area; the target wraps it in a container
with correct CRCs, so mutations reach header validation and every decoder. A leading 0x02 byte makes it a 2.3
file (the 2.x header as stored: no offsets, pairs by index; CRC table and dictionary made by the target),
otherwise 1.0. A quarter of its mutations give one field of a record or pair a value of another JSON type
(mutate), which byte mutations almost never do: a list where a dtype goes once raised a TypeError.
Seeds are the golden files (tests/golden), copied into a fresh corpus when none is given; structured mode adds
variants at the edges of the ranges validation allows (edge_seeds). Every value a lossy tensor or a ΔW
yields must be finite (spec §5): a non-finite one is a finding like a crash. Any other
exception, a hang or a crash is a finding: libFuzzer saves the input as crash-*, which becomes a
regression test in tests/test_robustness.py.
"""
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import atheris
import torch

with atheris.instrument_imports():
    import zstandard

    import sqz
    from sqz import grid
    from sqz.constants import MAGIC, MAX_PAIR_MAGNITUDE, MIN_GAMMA_MAGNITUDE, PREAMBLE_SIZE
    from sqz.container import V2_DICTIONARY, Container, align, chunk_table

STRUCTURED = os.environ.get("SQZ_FUZZ") == "structured"

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


V2 = b"\x02"


def wrap(data: bytes) -> bytes:
    """[0x02] header JSON NUL data -> a container whose header and section (or chunk) CRCs are all correct."""
    if data.startswith(V2):
        text, _, area = data[1:].partition(b"\0")
        body = zstandard.ZstdCompressor(dict_data=V2_DICTIONARY).compress(text)
        head = MAGIC + struct.pack("<HHII", 2, 3, len(body), zlib.crc32(body)) + body + chunk_table(area)
        return head + b"\0" * (align(len(head)) - len(head)) + area
    text, _, area = data.partition(b"\0")
    try:
        header = json.loads(text)
        for record in header["tensors"]:
            start = record["offset"]
            record["crc32"] = zlib.crc32(area[start:start + record["length"]])
        text = json.dumps(header).encode()
    except Exception:  # noqa: BLE001, S110 - leave malformed headers as the fuzzer made them
        pass
    body = zstandard.ZstdCompressor().compress(text)
    head = MAGIC + struct.pack("<HHII", 1, 0, len(body), zlib.crc32(body)) + body
    return head + b"\0" * (align(len(head)) - len(head)) + area


def unwrap(data: bytes) -> bytes:
    """A real file as a structured seed: its header JSON as stored."""
    f = Container(data)
    if f.version[0] == 1:
        return json.dumps(f.header).encode() + b"\0" + data[f.data_start:]
    length = struct.unpack_from("<I", data, 12)[0]
    text = zstandard.ZstdDecompressor(dict_data=V2_DICTIONARY).decompress(data[PREAMBLE_SIZE:PREAMBLE_SIZE + length])
    return V2 + text + b"\0" + data[f.data_start:]


def edge_seeds(seed: bytes) -> list[bytes]:
    """Structured seeds at the edges of what validation allows (spec §3.2, §4.2): pair numbers at their limits,
    and each float16 codebook's last entry at 65504, the largest finite float16 (a GRID codebook's largest entry
    as near it as its exponent puts it), so that one mutation away lies a file that must be refused."""
    version = V2 if seed.startswith(V2) else b""
    text, _, area = seed[len(version):].partition(b"\0")
    seeds = []
    for fields in ({"scaling": MAX_PAIR_MAGNITUDE}, {"omega": -MAX_PAIR_MAGNITUDE, "gamma": MIN_GAMMA_MAGNITUDE}):
        edited = json.loads(text)
        for pair in edited["pairs"]:
            pair.update({k: v for k, v in fields.items() if k == "scaling" or pair["kind"] == "sine"})
        seeds.append(version + json.dumps(edited).encode() + b"\0" + area)
    f = Container(wrap(seed))
    edited_area = bytearray(area)
    for record in f.records:  # the largest finite float16 as the last entry: F32 in 1.x, F16 in 2.0 (not GRID)
        if (record["encoding"] == "kmeans" and record["dtype"] == "F16" and record["codebook_size"] > 1
                and record["codebook_dtype"] in ("F32", "F16")):
            entry = 4 if record["codebook_dtype"] == "F32" else 2
            last = record["offset"] + entry * (record["codebook_size"] - 1)
            edited_area[last:last + entry] = struct.pack("<f" if entry == 4 else "<e", 65504.0)
        elif record["encoding"] == "kmeans" and record["dtype"] == "F16" and record["codebook_dtype"] == "GRID":
            start = record["offset"]  # GRID: the exponent that puts the largest entry just under 65504
            entries, _ = grid.decode(area[start:], record["codebook_size"])
            top = float(abs(entries).max()) / 2.0 ** struct.unpack_from("<b", area, start)[0]
            if top:
                edited_area[start:start + 1] = struct.pack("<b", max(-128, min(127, math.floor(math.log2(65504 / top)))))
    seeds.append(version + text + b"\0" + bytes(edited_area))
    return seeds


JSON_VALUES = (None, True, False, 0, -1, 1 << 40, 1 << 70, 0.5, -1e300, "", "F32", "kmeans", "rans-trellis", [],
               ["F32"], [1, 2], {}, {"a": 1})
"""What mutate puts in a field: a value of every JSON type, and some of the right type at an edge."""


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """Structured mode's mutator: one time in four, one field of a tensor record or pair of the header JSON
    gets one of JSON_VALUES; otherwise (or where the JSON does not parse) libFuzzer's own byte mutations."""
    rng = random.Random(seed)
    if rng.random() < 0.25:
        version = V2 if data.startswith(V2) else b""
        text, _, area = data[len(version):].partition(b"\0")
        try:
            header = json.loads(text)
            fields = [o for key in ("tensors", "pairs") for o in header[key] if isinstance(o, dict) and o]
            target = rng.choice(fields)
            target[rng.choice(sorted(target))] = rng.choice(JSON_VALUES)
            mutated = version + json.dumps(header).encode() + b"\0" + area
            if len(mutated) <= max_size:
                return mutated
        except (ValueError, KeyError, TypeError, IndexError):  # not JSON, no such lists, nothing to pick
            pass
    return atheris.Mutate(data, max_size)


def test_one_input(data: bytes) -> None:
    if STRUCTURED:
        data = wrap(data)
    try:
        adapter = sqz.load(data)
        lossy = {r["name"] for r in adapter.header["tensors"] if r["encoding"] == "kmeans"}
        for name in adapter:
            tensor = adapter[name]
            if name in lossy and not torch.isfinite(tensor).all():
                raise AssertionError(f"{name}: a lossy tensor decoded to a non-finite value")
        for pair in adapter.pairs:
            if not torch.isfinite(adapter.delta(pair.module)).all():
                raise AssertionError(f"{pair.module}: delta() returned a non-finite value")
        adapter.close()
    except sqz.SqzError:
        pass


def main() -> None:
    args = list(sys.argv)
    if not any(Path(a).is_dir() for a in args[1:] if not a.startswith("-")):
        corpus = Path(tempfile.mkdtemp(prefix="sqz-fuzz-"))
        for seed in GOLDEN.glob("v*/*.sqz"):
            name = f"{seed.parent.name}-{seed.name}"  # versions reuse file names
            if STRUCTURED:
                structured = unwrap(seed.read_bytes())
                (corpus / name).write_bytes(structured)
                for n, edge in enumerate(edge_seeds(structured)):
                    (corpus / f"{name}.edge{n}").write_bytes(edge)
            else:
                shutil.copy(seed, corpus / name)
        args.append(str(corpus))
    atheris.Setup(args, test_one_input, **({"custom_mutator": mutate} if STRUCTURED else {}))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
