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


def compeft(density: float) -> Codec:
    """ComPEFT-style (Yadav et al. 2023): per factor, keep the `density` fraction of largest magnitudes as
    ternary signs times one scale (the mean kept magnitude, the least-squares scale for that support); the
    rest is zero. The ternary codes are packed at 2 bits and zstd-compressed (they are mostly zeros), the
    scale stored in fp32; the whole file then goes through zstd once (as the paper zips its own)."""

    def one(_: str, x: np.ndarray):
        keep = max(1, round(density * x.size))
        threshold = np.partition(np.abs(x), x.size - keep)[x.size - keep]
        mask = np.abs(x) >= threshold
        scale = np.float32(np.abs(x[mask]).mean()) if mask.any() else np.float32(0)
        codes = np.where(mask, np.where(x > 0, 1, 2), 0).astype(np.uint8)
        recon = np.where(mask, np.sign(x) * scale, 0).astype(np.float32)
        return {"codes": np.frombuffer(pack(codes, 2), np.uint8), "scale": np.array([scale])}, recon

    def codec(tensors: Tensors) -> tuple[bytes, Tensors]:
        data, out = _per_factor(tensors, one)
        return zstandard.ZstdCompressor(level=19).compress(data), out

    return codec


CLIP_GRID = np.geomspace(0.01, 1.0, 24)
"""Clipping ranges tried, as fractions of a vector's largest magnitude: down to 1%, which heavy tails need (with
0.3 as the floor, 2-bit components of Student-t factors came out worse than 1-bit ones)."""


def loraquant(top_fraction: float, high_bits: int = 2, low_bits: int = 1) -> Codec:
    """LoRAQuant-style (arXiv 2510.26690): each pair re-parameterised by its SVD, B@A = (U√S)(√S·Vᵀ); the
    components of the largest singular values (`top_fraction` of the rank) quantized at `high_bits`, the rest
    at `low_bits`, each component vector (a column of B', a row of A') with its own fp16 scale: symmetric
    uniform levels clipped where the squared error is least (at 1 bit, sign times the mean magnitude, the
    least-squares scale). Codes bit-packed; the whole file then goes through zstd once. Our reading of the
    method, without its code."""

    def vector(v: np.ndarray, bits: int) -> tuple[np.ndarray, np.float16, np.ndarray]:
        if bits == 1:
            scale = np.float16(np.abs(v).mean())
            return (v > 0).astype(np.uint8), scale, np.where(v > 0, 1.0, -1.0) * np.float32(scale)
        top, best = (1 << bits) - 1, None
        for clip in CLIP_GRID:  # round-to-nearest with the clipping range of least squared error
            scale = np.float16(clip * np.abs(v).max())
            step = 2 * np.float32(scale) / top if scale > 0 else 1.0
            codes = np.clip(np.round((v + np.float32(scale)) / step), 0, top).astype(np.uint8)
            recon = (codes * step - np.float32(scale)).astype(np.float32)
            if best is None or np.square(recon - v).sum() < best[0]:
                best = (np.square(recon - v).sum(), codes, scale, recon)
        return best[1], best[2], best[3]

    def codec(tensors: Tensors) -> tuple[bytes, Tensors]:
        stored, shapes, out = {}, {}, dict(tensors)
        for a_name in (n for n in tensors if ".lora_A." in n):
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            a, b = tensors[a_name].astype(np.float64), tensors[b_name].astype(np.float64)
            rank = a.shape[0]
            qa, ra = np.linalg.qr(a.reshape(rank, -1).T)  # the SVD of B@A from r x r factors, never [out, in]
            qb, rb = np.linalg.qr(b.reshape(-1, rank))
            u, sigma, vt = np.linalg.svd(rb @ ra.T)
            root = np.sqrt(sigma)
            factors = {b_name: ((qb @ u) * root).T, a_name: (root[:, None] * vt) @ qa.T}  # component rows
            high = round(top_fraction * rank)
            for name, rows in factors.items():
                recon = np.empty_like(rows, dtype=np.float32)
                streams, scales = {}, []
                for i, row in enumerate(rows):
                    bits = high_bits if i < high else low_bits
                    codes, scale, recon[i] = vector(row, bits)
                    streams.setdefault(bits, []).append(codes)
                    scales.append(scale)
                for bits, parts in streams.items():
                    stored[f"{name}.codes{bits}"] = np.frombuffer(pack(np.concatenate(parts), bits), np.uint8)
                stored[f"{name}.scales"] = np.array(scales, dtype=np.float16)
                shapes[name] = list(tensors[name].shape)
                out[name] = (recon.T if name == b_name else recon).reshape(tensors[name].shape)
        stored.update({k: v for k, v in tensors.items() if not is_factor(k)})
        return zstandard.ZstdCompressor(level=19).compress(_file(stored, shapes)), out

    return codec
