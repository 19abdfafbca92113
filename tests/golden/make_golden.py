"""Write the golden .sqz files of this format version, with the tensors they must decode to.

Run once per format version (python tests/golden/make_golden.py); never regenerate an existing folder:
those files are what old writers produced, and every later reader must still decode them exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import mixed_tensors, sine_dir

import sqz
from sqz.constants import VERSION_MAJOR, VERSION_MINOR

CASES = {  # per version: the stages and widths that version added, and auto as that version wrote it
    (1, 0): {"b3-auto": {"bits": 3}, "b2-zstd": {"bits": 2, "entropy": "zstd"},
             "b5-none": {"bits": 5, "entropy": "none"}, "b4-rans": {"bits": 4, "entropy": "rans"},
             "b1-auto": {"bits": 1}},
    (1, 1): {"b3-auto": {"bits": 3}, "b3-zstd-aligned": {"bits": 3, "entropy": "zstd-aligned"},
             "b6-zstd-aligned": {"bits": 6, "entropy": "zstd-aligned"},
             "b1-zstd-aligned": {"bits": 1, "entropy": "zstd-aligned"}, "b7-zstd": {"bits": 7, "entropy": "zstd"}},
}


def main() -> None:
    folder = HERE / f"v{VERSION_MAJOR}.{VERSION_MINOR}"
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} exists: golden files are never regenerated")
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "source.safetensors"
    save_file(mixed_tensors(), str(src), metadata={"format": "pt", "golden": "yes"})
    for name, options in CASES[VERSION_MAJOR, VERSION_MINOR].items():
        _write(src, folder / name, sqz.EncodeOptions(sample=64, **options))
    sine = sine_dir(folder / "sine-src")
    _write(sine, folder / "sine-b3", sqz.EncodeOptions(bits=3))
    for leftover in sine.iterdir():
        leftover.unlink()
    sine.rmdir()
    src.unlink()


def _write(src: Path, stem: Path, options: sqz.EncodeOptions) -> None:
    sqz.encode(src, stem.with_suffix(".sqz"), options)
    adapter = sqz.load(stem.with_suffix(".sqz"))
    expected = {name: adapter[name] for name in adapter}
    expected.update({f"delta::{p.module}": adapter.delta(p.module) for p in adapter.pairs})
    save_file(expected, str(stem.with_suffix(".expected.safetensors")))


if __name__ == "__main__":
    main()
