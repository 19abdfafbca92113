"""Coverage-guided fuzzing of the .sqz reader with atheris: any input must decode or raise an SqzError.

    python fuzz/fuzz_reader.py -max_total_time=30                        # raw bytes (CI does 30 s of each)
    SQZ_FUZZ=structured python fuzz/fuzz_reader.py -max_total_time=30   # header JSON + data, CRCs made valid
    python fuzz/fuzz_reader.py fuzz/corpus -max_total_time=3600           # a long run, keeping its corpus

raw: the input is a whole file, so most mutations stop at a CRC check (which is the point of them).
structured: the input is header JSON, a NUL byte, then the data area; the target wraps it in a container
with correct CRCs, so mutations reach header validation and every decoder.
Seeds are the golden files (tests/golden), copied into a fresh corpus when none is given. Any other
exception, a hang or a crash is a finding: libFuzzer saves the input as crash-*, which becomes a
regression test in tests/test_robustness.py.
"""
import json
import os
import shutil
import struct
import sys
import zlib
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import zstandard

    import sqz
    from sqz.constants import MAGIC
    from sqz.container import Container, align

STRUCTURED = os.environ.get("SQZ_FUZZ") == "structured"

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


def wrap(data: bytes) -> bytes:
    """header JSON NUL data -> a container whose header and section CRCs are all correct."""
    text, _, area = data.partition(b"\0")
    try:
        header = json.loads(text)
        for record in header["tensors"]:
            start = record["offset"]
            record["crc32"] = zlib.crc32(area[start:start + record["length"]])
        text = json.dumps(header).encode()
    except Exception:  # noqa: BLE001 - leave malformed headers as the fuzzer made them
        pass
    body = zstandard.ZstdCompressor().compress(text)
    head = MAGIC + struct.pack("<HHII", 1, 0, len(body), zlib.crc32(body)) + body
    return head + b"\0" * (align(len(head)) - len(head)) + area


def unwrap(data: bytes) -> bytes:
    """A real file as a structured seed."""
    f = Container(data)
    return json.dumps(f.header).encode() + b"\0" + data[f.data_start:]


def test_one_input(data: bytes) -> None:
    if STRUCTURED:
        data = wrap(data)
    try:
        adapter = sqz.load(data)
        for name in adapter:
            adapter[name]
        for pair in adapter.pairs:
            adapter.delta(pair.module)
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
                (corpus / name).write_bytes(unwrap(seed.read_bytes()))
            else:
                shutil.copy(seed, corpus / name)
        args.append(str(corpus))
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
