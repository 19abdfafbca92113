"""Serving many adapters: how many fit in host memory, and how long one takes to be ready on the device.

A multi-adapter server (S-LoRA, LoRAX, vLLM) keeps its catalog in host memory and materialises an adapter on
the device when a request needs it. Each format here is held the same way: the file's bytes in memory, the
`max_decoded` most recently used adapters decoded (an LRU), a Zipf request stream over 1 or 100 adapters of the
LLaMA-3-8B shapes. sqz is served by `sqz.AdapterCache` itself; safetensors fp16 and ZipNN by the same LRU
policy written here (`safetensors.torch.load` of the bytes, after ZipNN's decompression). "Ready" means every
tensor of the adapter is on the device (synchronised on CUDA). The 100 adapters share one file's bytes (the
latency does not depend on which adapter it is); host memory is counted as 100 distinct files would take.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load

import sqz
from bench.speed import zipnn_codec
from bench.synthetic import write_llama_adapter
from sqz.cache import CacheStats

GIB = 1 << 30
ZIPF_S = 1.1  # request popularity: a few adapters hot, a long tail (measured catalogs are close to Zipf ~1)
MAX_DECODED = 8


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class LruServer:
    """The baseline formats: bytes held, an LRU of decoded state dicts, `decode(bytes, device)` on a miss."""

    def __init__(self, decode: Callable[[bytes, str], dict], max_decoded: int):
        self.decode, self.max_decoded = decode, max_decoded
        self.held: dict[str, bytes] = {}
        self.decoded: OrderedDict[str, dict] = OrderedDict()
        self.stats = CacheStats()

    def add(self, name: str, data: bytes) -> None:
        self.held[name] = data

    def get(self, name: str, device: str) -> dict:
        if name in self.decoded:
            self.decoded.move_to_end(name)
            self.stats.hits += 1
            return self.decoded[name]
        self.stats.misses += 1
        tensors = self.decoded[name] = self.decode(self.held[name], device)
        if len(self.decoded) > self.max_decoded:
            self.decoded.popitem(last=False)
        return tensors


def _safetensors(data: bytes, device: str) -> dict:
    return {k: v.to(device) for k, v in load(data).items()}


def _zipnn(data: bytes, device: str) -> dict:
    return _safetensors(bytes(zipnn_codec().decompress(data)), device)


def server(fmt: str, data: bytes, adapters: int) -> sqz.AdapterCache | LruServer:
    """A server for `fmt` holding `adapters` names for the file's bytes."""
    if fmt.startswith("sqz"):
        held = sqz.AdapterCache(max_host_bytes=adapters * len(data), max_decoded=MAX_DECODED)
    else:
        held = LruServer(_zipnn if fmt == "ZipNN" else _safetensors, MAX_DECODED)
    for i in range(adapters):
        held.add(f"a{i}", data)
    return held


def zipf_stream(adapters: int, requests: int, seed: int = 0) -> list[int]:
    """Request indices drawn with probability ∝ 1/(rank+1)^s over `adapters` adapters."""
    weights = 1 / np.arange(1, adapters + 1) ** ZIPF_S
    return np.random.default_rng(seed).choice(adapters, size=requests, p=weights / weights.sum()).tolist()


def timed_get(held: sqz.AdapterCache | LruServer, name: str, device: str) -> float:
    start = time.perf_counter()
    held.get(name, device)
    _sync(device)
    return time.perf_counter() - start


def serve_rows(files: dict[str, bytes], adapters: int, requests: int, device: str, cold: int) -> list[dict]:
    """One row per format: latency percentiles of a request stream, of its misses, and of `cold` first requests
    to a fresh server (the time to have an adapter ready that is not decoded yet), adapters per GiB."""
    stream = zipf_stream(adapters, requests)
    rows = []
    for fmt, data in files.items():
        timed_get(server(fmt, data, 1), "a0", device)  # first-use costs (thread pools, CUDA context) are no request's
        cold_ms = [1e3 * timed_get(server(fmt, data, 1), "a0", device) for _ in range(cold)]
        held = server(fmt, data, adapters)
        latency, missed = [], []
        for i in stream:
            misses = held.stats.misses
            latency.append(1e3 * timed_get(held, f"a{i}", device))
            missed.append(held.stats.misses > misses)
        latency_ms, misses = np.array(latency), np.array(missed)
        rows.append({
            "format": fmt, "adapters": adapters, "requests": requests, "device": device, "file_bytes": len(data),
            "adapters_per_gib": GIB / len(data), "host_bytes": adapters * len(data),
            "hit_rate": float(1 - misses.mean()),
            **{f"p{q}_ms": float(np.percentile(latency_ms, q)) for q in (50, 90, 99)},
            "mean_ms": float(latency_ms.mean()),
            "miss_p50_ms": float(np.percentile(latency_ms[misses], 50)),
            "miss_p99_ms": float(np.percentile(latency_ms[misses], 99)),
            "cold_p50_ms": float(np.percentile(cold_ms, 50)), "cold_max_ms": float(max(cold_ms)),
        })
    return rows


SQZ_FILES = {"sqz --bpp 2": sqz.EncodeOptions(bpp=2.0), "sqz --bpp 3": sqz.EncodeOptions(bpp=3.0),
             "sqz --bpp 2 --entropy zstd-aligned": sqz.EncodeOptions(bpp=2.0, entropy="zstd-aligned")}
"""The sqz files served: `auto` keeps rANS where it saves more than its decode time is worth at 1 µs a byte (a
slow link); zstd-aligned decodes about 10x faster per index, for servers whose bytes sit in memory already."""


def run(workdir: Path, quick: bool = False, device: str = "cpu", log=print) -> dict:
    scale = 1 / 32 if quick else 1.0
    src = write_llama_adapter(workdir / "adapter", scale=scale)
    fp16 = (src / "adapter_model.safetensors").read_bytes()
    files = {"safetensors fp16": fp16, "ZipNN": bytes(zipnn_codec().compress(fp16))}
    sqnr = {}
    for label, options in SQZ_FILES.items():
        report = sqz.encode(src, workdir / "served.sqz", options, force=True, progress=False)
        files[label], sqnr[label] = report.path.read_bytes(), report.sqnr_db
        log(f"serve: {label}: {report.file_bytes:,} bytes, ΔW SQNR {report.sqnr_db:.1f} dB")
    params = sum(t.numel() for t in load(fp16).values())
    requests = 40 if quick else 300
    rows = []
    for adapters in (1, 100):
        log(f"serve: {adapters} adapter(s), {requests} requests on {device}")
        rows += serve_rows(files, adapters, requests, device, cold=3 if quick else 9)
    return {"adapter": {"params": params, "fp16_bytes": len(fp16), "scale": scale}, "max_decoded": MAX_DECODED,
            "zipf_s": ZIPF_S, "device": device, "rows": rows, "sqnr_db": sqnr}
