"""The catalog manifest: OUT/manifest.jsonl, one JSON row per adapter encoded (or failed), appended as each
finishes, by the driver only. The last row for an output name is its state; a rerun skips a name whose last
row is good for the same source bytes and options. SCHEMA is the JSON Schema every row validates against
(the README prints it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

NAME = "manifest.jsonl"
ROW_VERSION = 1
CHUNK = 1 << 20

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_SHA_OR_NULL = {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sqz encode-many manifest row",
    "type": "object",
    "required": ["version", "name", "source", "source_sha256", "source_bytes", "output", "output_sha256",
                 "output_bytes", "params", "bits_per_param", "sqnr_db", "encode_s", "options", "status", "error",
                 "warnings", "sqz", "engine", "finished"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": ROW_VERSION},
        "name": {"type": "string", "minLength": 1},  # the output's path under OUT: the row's key
        "source": {"type": "string"},
        "source_sha256": _SHA_OR_NULL,  # null: the source could not be read
        "source_bytes": _INT_OR_NULL,
        "output": {"type": "string"},
        "output_sha256": _SHA_OR_NULL,  # null on error rows (no output written)
        "output_bytes": _INT_OR_NULL,
        "params": _INT_OR_NULL,
        "bits_per_param": _NUMBER_OR_NULL,
        "sqnr_db": _NUMBER_OR_NULL,  # ΔW SQNR of the file; null when nothing was lost (infinite) or on error
        "encode_s": {"type": "number", "minimum": 0},
        "options": {"type": "object"},
        "status": {"enum": ["ok", "error"]},
        "error": {"type": ["string", "null"]},  # one line: why the adapter failed
        "warnings": {"type": "array", "items": {"type": "string"}},  # what the encoder warned about
        "sqz": {"type": "string"},  # the sqz version that wrote the row
        "engine": {"enum": ["local", "ray"]},
        "finished": {"type": "string"},  # ISO 8601, UTC
    },
}


def sha256_of(paths: list[Path]) -> tuple[str, int]:
    """sha256 and total size of a source: its weights file, then (a PEFT folder) its adapter_config.json."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def read(path: Path) -> dict[str, dict[str, Any]]:
    """The last row of every name. A last line cut short (a driver killed mid-write) is cut off the file, so
    that the next row starts on a line of its own."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows: dict[str, dict[str, Any]] = {}
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line that is not JSON is no row (the file is append-only; nothing else writes it)
        if isinstance(row, dict) and isinstance(row.get("name"), str):
            rows[row["name"]] = row
    return rows


def is_good(row: dict[str, Any] | None, source_sha256: str, options: dict[str, Any], output: Path) -> bool:
    """Whether `row` already holds this source encoded with these options, and its output is still there intact."""
    if not row or row.get("status") != "ok" or row.get("source_sha256") != source_sha256 or row.get("options") != options:
        return False
    try:
        return output.stat().st_size == row["output_bytes"] and sha256_of([output])[0] == row["output_sha256"]
    except OSError:
        return False


def append(f: IO[str], row: dict[str, Any]) -> None:
    """One row, flushed and fsynced: a row in the manifest is a row on disk."""
    f.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
