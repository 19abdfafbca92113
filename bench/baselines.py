"""What a user would pick instead of sqz, each written as a real file so that its rate counts every byte.

Every codec takes the adapter's tensors (name -> float32 array) and returns (file bytes, reconstruction).
LoRA factors (names with lora_A/lora_B/lora_down/lora_up) are compressed; anything else is stored as-is.
The quantized codecs store bit-packed codes with sqz's packer (the same packing a user would write) and
their side information (ranges, block scales, codebooks) in a safetensors file, shapes in its metadata.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable

import numpy as np
import zstandard
from safetensors.numpy import save

from sqz.bitpack import pack
from sqz.quantize import PAPER_SAMPLE, dequantize, quantize, tensor_seed

Tensors = dict[str, np.ndarray]
Codec = Callable[[Tensors], tuple[bytes, Tensors]]
FACTOR_TAGS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora_embedding_A", "lora_embedding_B")
BLOCK = 64
# NF4's 16 levels (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses)
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171066284,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def is_factor(name: str) -> bool:
    return any(f".{tag}" in name for tag in FACTOR_TAGS)


def _file(stored: Tensors, shapes: dict[str, list[int]]) -> bytes:
    return save(stored, metadata={"shapes": json.dumps(shapes)})


def _per_factor(tensors: Tensors, encode_one: Callable[[str, np.ndarray], tuple[Tensors, np.ndarray]]):
    """Apply `encode_one` to each factor; returns (safetensors bytes, reconstruction)."""
    stored, shapes, out = {}, {}, {}
    for name, value in tensors.items():
        if is_factor(name):
            parts, recon = encode_one(name, value.astype(np.float32).ravel())
            stored.update({f"{name}.{k}": v for k, v in parts.items()})
            shapes[name] = list(value.shape)
            out[name] = recon.reshape(value.shape)
        else:
            stored[name] = value
            out[name] = value
    return _file(stored, shapes), out


def uniform_minmax(bits: int) -> Codec:
    """Per tensor: 2^b levels evenly spaced from min to max (the paper's Table 5 baseline)."""
    levels = (1 << bits) - 1

    def one(_: str, x: np.ndarray):
        lo, hi = float(x.min()), float(x.max())
        step = (hi - lo) / levels if hi > lo else 1.0
        codes = np.clip(np.rint((x - lo) / step), 0, levels).astype(np.uint8)
        recon = (lo + codes * step).astype(np.float32)
        return {"codes": np.frombuffer(pack(codes, bits), np.uint8), "range": np.array([lo, hi], np.float32)}, recon

    return lambda tensors: _per_factor(tensors, one)


def _blocks(x: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-x.size // BLOCK) * BLOCK, np.float32)
    padded[: x.size] = x
    return padded.reshape(-1, BLOCK)


def block_absmax_int(bits: int) -> Codec:
    """Symmetric integers per block of 64 with an fp16 absmax scale (levels -(2^(b-1)-1) .. 2^(b-1)-1)."""
    top = (1 << (bits - 1)) - 1

    def one(_: str, x: np.ndarray):
        blocks = _blocks(x)
        scale = np.abs(blocks).max(1, keepdims=True).astype(np.float16)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)
        q = np.clip(np.rint(blocks / safe * top), -top, top)
        recon = (q * safe / top).ravel()[: x.size]
        return {"codes": np.frombuffer(pack((q + top).astype(np.uint8).ravel(), bits), np.uint8),
                "absmax": scale.ravel()}, recon

    return lambda tensors: _per_factor(tensors, one)


def nf4(tensors: Tensors) -> tuple[bytes, Tensors]:
    """NF4 as bitsandbytes stores it: 4-bit codes into the NF4 table, one fp16 absmax per block of 64."""

    def one(_: str, x: np.ndarray):
        blocks = _blocks(x)
        scale = np.abs(blocks).max(1, keepdims=True).astype(np.float16)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)
        normed = blocks / safe
        mid = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
        codes = np.searchsorted(mid, normed).astype(np.uint8)
        recon = (NF4_LEVELS[codes] * safe).ravel()[: x.size]
        return {"codes": np.frombuffer(pack(codes.ravel(), 4), np.uint8), "absmax": scale.ravel()}, recon

    return _per_factor(tensors, one)


def paper_pipeline(bits: int, sample: int = PAPER_SAMPLE, seed: int = 0) -> Codec:
    """The paper as published: k-means on 10,000 samples, fp32 codebook, bit-packed indices, then zip."""

    def one(name: str, x: np.ndarray):
        q = quantize(x, bits, sample, tensor_seed(seed, name))
        codebook = np.zeros(1 << bits, np.float32)
        codebook[: q.codebook.size] = q.codebook
        return ({"codebook": codebook, "indices": np.frombuffer(pack(q.indices, bits), np.uint8)},
                dequantize(q.codebook, q.indices))

    def codec(tensors: Tensors) -> tuple[bytes, Tensors]:
        raw, out = _per_factor(tensors, one)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            archive.writestr("adapter.safetensors", raw)
        return buffer.getvalue(), out

    return codec


def fp16_safetensors(tensors: Tensors) -> tuple[bytes, Tensors]:
    """The adapter as it ships today: fp16 safetensors."""
    half = {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    return save(half), {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in half.items()}


def zstd_fp16(level: int = 19) -> Codec:
    def codec(tensors: Tensors) -> tuple[bytes, Tensors]:
        raw, out = fp16_safetensors(tensors)
        return zstandard.ZstdCompressor(level=level).compress(raw), out

    return codec


def zipnn_fp16(tensors: Tensors) -> tuple[bytes, Tensors]:
    """ZipNN (byte grouping + Huffman/zstd, lossless) over the fp16 safetensors file."""
    from zipnn import ZipNN

    raw, out = fp16_safetensors(tensors)
    return bytes(ZipNN(input_format="byte", bytearray_dtype="float16").compress(raw)), out
