"""Write the golden .sqz files of this format version, with the tensors they must decode to.

Run once per format version (python tests/golden/make_golden.py); never regenerate an existing folder:
those files are what old writers produced, and every later reader must still decode them exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
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
    # 2.0: codebooks in F16/BF16 (and F32 where F16 would not do), packed sections, the chunk CRC table (the
    # "large" source spans two 64 KiB chunks), and the rate-controlled encoder's gauged, mixed-width files
    (2, 0): {"b3-auto": {"bits": 3, "sample": 0}, "b4-rans": {"bits": 4, "sample": 0, "entropy": "rans"},
             "size3000-auto": {"size": 3000, "sample": 0},
             "large-b8-none": {"bits": 8, "sample": 0, "entropy": "none", "source": "large"},
             "large-size80000-auto": {"size": 80_000, "sample": 0, "source": "large"},
             "large-sqnr20-auto": {"sqnr": 20.0, "sample": 0, "source": "large"}},
    # 2.1: rans-compact (count tables bit-packed, the stream's last word trimmed), forced and as auto picks it
    (2, 1): {"b3-auto": {"bits": 3, "sample": 0}, "b4-rans-compact": {"bits": 4, "sample": 0, "entropy": "rans-compact"},
             "b1-rans-compact": {"bits": 1, "sample": 0, "entropy": "rans-compact"},
             "size3000-auto": {"size": 3000, "sample": 0}, "large-size80000-auto": {"size": 80_000, "sample": 0, "source": "large"}},
    # 2.2: GRID codebooks (entries on a power-of-two grid, gaps Rice-coded; scales as exponents): codebooks of 8 to
    # 256 entries, each entropy stage, tiny float32 values (negative exponents), and planned files with scaled factors
    (2, 2): {"b3-auto": {"bits": 3, "sample": 0}, "b8-none": {"bits": 8, "sample": 0, "entropy": "none"},
             "b5-rans-compact": {"bits": 5, "sample": 0, "entropy": "rans-compact"},
             "size3000-auto": {"size": 3000, "sample": 0},
             "large-size80000-auto": {"size": 80_000, "sample": 0, "source": "large"},
             "large-sqnr40-auto": {"sqnr": 40.0, "sample": 0, "source": "large"}},
    # 2.3: codebooks of more than 256 entries (bits 9-12), rANS-coded in both its forms (GRID codebooks among them)
    (2, 3): {"b3-auto": {"bits": 3, "sample": 0},
             "large-sqnr70-auto": {"sqnr": 70.0, "sample": 0, "source": "large"},
             "large-size100000-rans": {"size": 100_000, "sample": 0, "entropy": "rans", "source": "large"}},
    # 2.4: rans-grouped (a discrete Gaussian a row or column), forced at -b and as a target's auto picks it, wide
    # codebooks (bits 9-12) among them
    (2, 4): {"b3-auto": {"bits": 3, "sample": 0}, "b3-rans-grouped": {"bits": 3, "sample": 0, "entropy": "rans-grouped"},
             "large-size80000-auto": {"size": 80_000, "sample": 0, "source": "large"},
             "large-sqnr70-rans-grouped": {"sqnr": 70.0, "sample": 0, "entropy": "rans-grouped", "source": "large"}},
    # 2.5: rans-trellis (trellis-coded quantization) as a target's auto picks it and as asked for, on factors it suits
    # (rows and columns grouped, scaled B factors, F16/BF16/GRID codebooks, wide ones of bits 9-12 among them)
    (2, 5): {"b3-auto": {"bits": 3, "sample": 0}, "large-size80000-auto": {"size": 80_000, "sample": 0, "source": "large"},
             "trellis-bpp2-auto": {"bpp": 2.0, "sample": 0, "source": "trellis"},
             "trellis-sqnr30-rans-trellis": {"sqnr": 30.0, "sample": 0, "entropy": "rans-trellis", "source": "trellis"}},
}
SAMPLE = 64
"""The sample 1.x's golden files were fitted on (2.0 cases say their own)."""


def large_tensors() -> dict[str, torch.Tensor]:
    """mixed_tensors and a data area over 64 KiB: a 4x2048 pair, a factor of values so small that float16 cannot
    hold its codebook (F32 in 2.0), a pair whose components fall off steeply (the rate-controlled encoder gives its
    B column scales), and 68 KB of lossless noise."""
    g = torch.Generator().manual_seed(5)
    t = mixed_tensors()
    t["base_model.model.large.lora_A.weight"] = torch.randn(4, 2048, generator=g) * 0.02
    t["base_model.model.large.lora_B.weight"] = torch.randn(8, 4, generator=g) * 0.01
    t["base_model.model.tiny.lora_A.weight"] = torch.randn(4, 64, generator=g) * 1e-6
    t["base_model.model.tiny.lora_B.weight"] = torch.randn(16, 4, generator=g)
    t["base_model.model.steep.lora_A.weight"] = torch.randn(4, 512, generator=g) * torch.tensor([[1.0], [0.1], [0.01],
                                                                                                 [0.001]])
    t["base_model.model.steep.lora_B.weight"] = torch.randn(64, 4, generator=g) * 0.05
    t["base_model.model.noise"] = torch.randn(17_000, generator=g)
    return t


def trellis_tensors() -> dict[str, torch.Tensor]:
    """Gaussian factors of a rank-8 adapter whose components fall off, in F16, BF16 and F32: what 2.5's trellis
    suits (on the mixed and large sources most factors are too small or too degenerate for it to pay)."""
    g = torch.Generator().manual_seed(7)
    decay = 0.7 ** torch.arange(8.0)
    t = {}
    for module, dtype in (("q", torch.float16), ("v", torch.bfloat16), ("o", torch.float32)):
        t[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(8, 256, generator=g) * decay[:, None]).to(dtype)
        t[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(192, 8, generator=g) * 0.05).to(dtype)
    return t


def main() -> None:
    folder = HERE / f"v{VERSION_MAJOR}.{VERSION_MINOR}"
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} exists: golden files are never regenerated")
    folder.mkdir(parents=True, exist_ok=True)
    sources = {"mixed": folder / "source.safetensors", "large": folder / "large.safetensors",
               "trellis": folder / "trellis.safetensors"}
    save_file(mixed_tensors(), str(sources["mixed"]), metadata={"format": "pt", "golden": "yes"})
    save_file(large_tensors(), str(sources["large"]), metadata={"format": "pt", "golden": "yes"})
    save_file(trellis_tensors(), str(sources["trellis"]), metadata={"format": "pt", "golden": "yes"})
    for name, options in CASES[VERSION_MAJOR, VERSION_MINOR].items():
        options = {"sample": SAMPLE, **options}
        _write(sources[options.pop("source", "mixed")], folder / name, sqz.EncodeOptions(**options))
    sine = sine_dir(folder / "sine-src")
    _write(sine, folder / "sine-b3", sqz.EncodeOptions(bits=3))
    if VERSION_MAJOR >= 2:  # the rate-controlled encoder's sine files: gauged pairs under sin(ω·B@A)
        _write(sine, folder / "sine-sqnr20", sqz.EncodeOptions(sqnr=20.0))
    for leftover in sine.iterdir():
        leftover.unlink()
    sine.rmdir()
    for src in sources.values():
        src.unlink()


def _write(src: Path, stem: Path, options: sqz.EncodeOptions) -> None:
    sqz.encode(src, stem.with_suffix(".sqz"), options)
    adapter = sqz.load(stem.with_suffix(".sqz"))
    expected = {name: adapter[name] for name in adapter}
    expected.update({f"delta::{p.module}": adapter.delta(p.module) for p in adapter.pairs})
    save_file(expected, str(stem.with_suffix(".expected.safetensors")))


if __name__ == "__main__":
    main()
