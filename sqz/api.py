"""The Python API: encode, decode and info (and `sqz.load`, in loader.py). The CLI is a thin layer over these.
None of it imports torch at import time; decode does when it runs with `delta` or `dtype`, through the loader."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from . import __version__, container, rank, targets
from .adapter import CONFIG_NAME, PEFT_PREFIX, Adapter, SineOptions, read_adapter
from .atomic import atomic_file, atomic_path, check_writable, output_folder
from .bitpack import packed_size
from .codec import EncodeOptions, decode_index_arrays, decode_tensors, encode_tensor, float_side_extent, read_side
from .components import component_bits
from .constants import CODEBOOK_GRID, ENCODING_KMEANS, PAIR_SINE
from .dtypes import itemsize
from .errors import InputError, SqzError
from .safetensors_writer import save_bytes

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "adapter_model.safetensors"


class SqzWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. no LoRA pairs found)."""


def _progress(iterable, total: int, desc: str, show: bool | None):
    """A bar on a terminal, nothing when piped (show=None decides by stderr being a TTY)."""
    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False,
                disable=not (sys.stderr.isatty() if show is None else show))


@dataclass(frozen=True)
class EncodeReport:
    path: Path
    file_bytes: int
    params: int
    tensors: int
    pairs: int
    quantized: int
    warnings: tuple[str, ...]
    sqnr_db: float | None = None  # with a rate-distortion target (or measure=True): the SQNR of ΔW in dB

    @property
    def bits_per_param(self) -> float:
        return 8 * self.file_bytes / self.params if self.params else 0.0


DEFAULT_OPTIONS, NO_SINE = EncodeOptions(), SineOptions()
BLAS_THREADS = 1
"""numpy's BLAS threads while sqz encodes: sqz runs a worker per core itself, and BLAS's own threads beside them
(the SVD gauge's QR, ΔW's Gram products) oversubscribe the cores, which costs little on an idle machine and a
great deal on a busy one: beside two busy processes on the 2 cores, --bpp 2 of the 28.3M-param adapter took 36,
5.3 and 6.1 s in three runs with BLAS's default threads, 5.5, 3.8 and 4.3 s with one (idle: 2.4-2.8 s either
way). The same file either way."""


@contextlib.contextmanager
def _blas_held() -> Iterator[None]:
    """BLAS at BLAS_THREADS while an encode runs in the main thread. The limit is process-wide and only the main
    thread sets it: numpy's OpenBLAS ignores the call from any other (measured: the count read back unchanged), and
    an encode in another thread, which cannot set it, must not restore it under one in the main thread either."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with threadpool_limits(BLAS_THREADS, user_api="blas"):
        yield


def encode(src: str | Path, dst: str | Path, options: EncodeOptions = DEFAULT_OPTIONS,
           sine: SineOptions = NO_SINE, force: bool = False, progress: bool | None = None,
           workers: int | None = None, measure: bool = False) -> EncodeReport:
    """Encode an adapter file or PEFT directory into a .sqz file (atomically; never a partial output).
    A target always measures the ΔW SQNR of the file it builds; `measure=True` does so for -b as well."""
    dst = Path(dst)
    check_writable(dst, force)
    adapter = read_adapter(src, sine)
    for message in adapter.warnings:
        warnings.warn(message, SqzWarning, stacklevel=2)
    workers = workers or os.cpu_count() or 1
    sqnr = None
    with _blas_held():
        if options.target is None:
            header, sections = _encode_adapter(adapter, options, progress, workers)
            if measure:
                sqnr = targets.delta_sqnr(adapter, header, sections, workers)
        else:
            header, sections, sqnr = targets.encode(adapter, options,
                                                    lambda gauged: TensorEncoder(gauged, options, progress, workers),
                                                    workers, lambda it, n, what: _progress(it, n, what, progress))
    with atomic_file(dst, force) as f:
        size = container.write(f, header, sections, options.version)
    records = header["tensors"]
    return EncodeReport(dst, size, sum(math.prod(r["shape"]) for r in records), len(records), len(adapter.pairs),
                        sum(r["encoding"] == ENCODING_KMEANS for r in records), tuple(adapter.warnings), sqnr)


class TensorEncoder:
    """Encodes an adapter's tensors on a thread pool, each (name, choice) once however often a target search
    asks for it. kmeans1d, the k-means kernel, zstd and numpy release the GIL, so threads use every core."""

    def __init__(self, adapter: Adapter, options: EncodeOptions, progress: bool | None, workers: int):
        self.adapter, self.options, self.progress, self.workers = adapter, options, progress, workers
        self._done: dict[tuple, tuple[dict, bytes]] = {}

    def __call__(self, choices: dict | None = None) -> tuple[dict[str, Any], list[bytes]]:
        """The header and sections of the file with `choices` (name -> ratecontrol.Choice; others as -b says)."""
        choices = choices or {}

        def key(name: str) -> tuple:  # the codebook and cells too: fits of one width differ in both
            choice = choices.get(name)
            if choice is None:
                return (name,)
            return (name, choice.bits, *(None if a is None else a.tobytes()
                                         for a in (choice.codebook, choice.thresholds, choice.scales)))

        todo = [name for name in self.adapter.tensors if key(name) not in self._done]

        def one(name: str) -> tuple[dict, bytes]:
            return encode_tensor(self.adapter.tensors[name], self.adapter.roles[name], self.options, choices.get(name))

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for name, result in zip(todo, _progress(pool.map(one, todo), len(todo), "encode", self.progress)):
                self._done[key(name)] = result
        encoded = [self._done[key(name)] for name in self.adapter.tensors]
        return _header(self.adapter, self.options, [dict(record) for record, _ in encoded]), [s for _, s in encoded]


def _encode_adapter(adapter: Adapter, options: EncodeOptions, progress: bool | None,
                    workers: int) -> tuple[dict[str, Any], list[bytes]]:
    return TensorEncoder(adapter, options, progress, workers)()


def _header(adapter: Adapter, options: EncodeOptions, records: list[dict]) -> dict[str, Any]:
    return {
        "generator": f"sqz {__version__}",
        "options": options.to_json(),
        "config": adapter.config,
        "metadata": adapter.metadata,
        "pairs": [p.to_json() for p in adapter.pairs],
        "tensors": records,
    }


def decode(src: str | Path, dst: str | Path, force: bool = False, delta: bool = False,
           dtype: torch.dtype | None = None, progress: bool | None = None, keep_rank: bool = False) -> list[Path]:
    """Write a .sqz back as safetensors; `dst` ending in '/' (or an existing directory) gets a PEFT folder, whose
    pairs leave out the components that decode to zero unless `keep_rank` (rank.py: the same ΔW at a lower rank).
    Without `delta` or `dtype` (torch's work) it runs without torch: the decoder's bytes go to the file as they are."""
    as_folder = str(dst).endswith(("/", os.sep)) or Path(dst).is_dir()
    if as_folder and delta:
        raise InputError("--delta writes one safetensors file, not a PEFT folder: give a file name")
    dst = Path(dst)
    targets = [dst / WEIGHTS_NAME, dst / CONFIG_NAME] if as_folder else [dst]
    for target in targets:
        if target.exists() and not force:
            check_writable(target, force)  # raises OutputExistsError
    f = container.Container(src)
    try:  # the config first: a file it cannot be made for leaves nothing behind
        config = (f.header.get("config") or synthesize_config(f.header)) if as_folder else None
        with output_folder(dst) if as_folder else contextlib.nullcontext(), contextlib.ExitStack() as outputs:
            weights = outputs.enter_context(atomic_path(targets[0], force))  # (checks targets[0] is writable)
            # both written before either replaces its destination
            folder = None if config is None else (outputs.enter_context(atomic_path(targets[1], force)), config,
                                                  keep_rank)
            if delta or dtype is not None:
                _write_through_torch(f, weights, folder, delta, dtype, progress)
            else:
                _write_decoded(f, weights, folder, progress)
    finally:
        f.close()
    return targets


DECODE_BATCH_BYTES = 16 << 20
"""Decoded bytes `sqz decode` asks the decoder for at a time (one batch runs on every core)."""


Folder = tuple[Path, dict[str, Any], bool]
"""Where a PEFT folder's adapter_config.json goes, the config, and whether the pairs keep their stored rank."""


def _write_decoded(f: container.Container, target: Path, folder: Folder | None, progress: bool | None) -> None:
    """Every tensor of `f` as it was encoded, written to `target` (and the folder's config)."""
    tensors = {record["name"]: (record["dtype"], record["shape"], data)
               for record, data in _progress(_decoded(f), len(f.records), "decode", progress)}
    _save(f, tensors, target, folder)


def _save(f: container.Container, tensors: rank.Tensors, target: Path, folder: Folder | None) -> None:
    """`tensors` to `target`; in a folder, its config beside them, the pairs' zero components left out of both unless
    the folder keeps the rank."""
    if folder is not None:
        path, config, keep_rank = folder
        if not keep_rank:
            tensors, config = rank.trimmed(tensors, f.header["pairs"], config)
        path.write_bytes(json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    save_bytes(tensors, target, f.header.get("metadata"))


def _decoded(f: container.Container) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Each record of `f` with its tensor's little-endian bytes, in file order, decoded in batches of about
    DECODE_BATCH_BYTES; the first tensor that fails raises its error."""
    workers, batch, size = os.cpu_count() or 1, [], 0
    for index, record in enumerate(f.records):
        batch.append(index)
        size += math.prod(record["shape"]) * itemsize(record["dtype"])
        if size >= DECODE_BATCH_BYTES or index == len(f.records) - 1:
            results = decode_tensors([(f.records[i], f.section(i)) for i in batch], threads=workers)
            for i, result in zip(batch, results):
                if isinstance(result, SqzError):
                    raise result
                yield f.records[i], result
            batch, size = [], 0


def _write_through_torch(f: container.Container, target: Path, folder: Folder | None, delta: bool,
                         dtype: torch.dtype | None, progress: bool | None) -> None:
    """The tensors of the open file `f` cast to `dtype`, or each module's ΔW (`delta`), written to `target` (the
    file read once: the one whose config was taken, even if its path is replaced meanwhile)."""
    import torch

    from .loader import load
    from .torch_dtypes import DTYPE_NAMES

    with load(f, dtype=dtype) as adapter:
        if delta:
            modules = _progress(adapter.pairs, len(adapter.pairs), "delta", progress)
            tensors = {p.module: adapter.delta(p.module) for p in modules}
        else:
            tensors = {name: adapter[name] for name in _progress(adapter, len(adapter), "decode", progress)}
        as_bytes = {name: (DTYPE_NAMES[t.dtype], list(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy())
                    for name, t in tensors.items()}
        _save(f, as_bytes, target, folder)


def synthesize_config(header: dict[str, Any]) -> dict[str, Any]:
    """A PEFT LoRA config for an adapter stored without one (from its .sqz header): the common rank and alpha,
    patterns for the rest."""
    pairs = header["pairs"]
    if not pairs:
        raise SqzError("the file has no adapter_config.json and no LoRA pairs to build one from")
    records = {r["name"]: r for r in header["tensors"]}
    ranks = {p["module"]: records[p["a"]]["shape"][0] for p in pairs}
    alphas = {p["module"]: p["scaling"] * ranks[p["module"]] for p in pairs}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    short = {m: m.removeprefix(PEFT_PREFIX) for m in ranks}
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "rank_pattern": {short[m]: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {short[m]: v for m, v in alphas.items() if v != alpha},
    }
    sine = [p for p in pairs if p["kind"] == PAIR_SINE]
    if sine:
        config.update(peft_type="SINLORA", freq=sine[0]["omega"])
    return config


def info(path: str | Path, components: bool = False) -> dict[str, Any]:
    """Where every bit went: per-tensor sizes and the totals (what `sqz info --json` prints), and with `components`
    each pair's bits component by component (components.py; decodes the factors)."""
    f = container.Container(path)
    try:
        rows = []
        for index, record in enumerate(f.records):
            numel = math.prod(record["shape"])
            row = {key: record[key] for key in ("name", "shape", "dtype", "role", "encoding", "entropy")}
            if record["encoding"] == ENCODING_KMEANS:  # a GRID codebook's size is in its bytes, not its record
                if record["codebook_dtype"] == CODEBOOK_GRID:
                    side_info = read_side(record, f.section(index))
                    codebook, side = side_info.codebook_bytes, side_info.size
                else:
                    codebook, side = float_side_extent(record)
                before = packed_size(numel, record["bits"])
                width = record["bits"] if record["codebook_size"] > 1 else 0  # one entry: a zero-bit group
            else:
                codebook, side, before, width = 0, 0, numel * itemsize(record["dtype"]), None
            row.update(params=numel, bits=width, codebook_size=record.get("codebook_size"),
                       codebook_dtype=record.get("codebook_dtype"), codebook_bytes=codebook,
                       scale_bytes=side - codebook, index_bytes_before=before,
                       index_bytes_after=record["length"] - side, section_bytes=record["length"],
                       bits_per_param=8 * record["length"] / numel if numel else 0.0)
            rows.append(row)
        params = sum(r["params"] for r in rows)
        totals = {
            "file_bytes": f.size, "header_bytes": f.data_start, "params": params,
            "section_bytes": sum(r["section_bytes"] for r in rows),
            "bits_per_param": 8 * f.size / params if params else 0.0,
            "fp16_bytes": 2 * params, "ratio_to_fp16": 2 * params / f.size if f.size else 0.0,
            "tensors": len(rows), "quantized": sum(r["encoding"] == ENCODING_KMEANS for r in rows),
            "pairs": len(f.header["pairs"]),
            "widths": {str(b): sum(r["bits"] == b for r in rows) for b in sorted({r["bits"] for r in rows} - {None})},
        }
        data = {"path": str(path), "version": ".".join(map(str, f.version)), "generator": f.header.get("generator"),
                "options": f.header.get("options"), "tensors": rows, "totals": totals}
        if components:
            data["pairs"] = _pair_components(f, {r["name"]: r for r in rows})
        return data
    finally:
        f.close()


def _pair_components(f: container.Container, rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair's rank, the components that do not decode to zero, the bits a value of each component in A and in
    B (a lossless factor's bits a value alike in every component) and the bytes each component takes in both."""
    index = {r["name"]: i for i, r in enumerate(f.records)}
    names = [n for p in f.header["pairs"] for n in (p["a"], p["b"])]
    items = [(f.records[index[n]], f.section(index[n])) for n in names]
    threads = os.cpu_count() or 1
    values = dict(zip(names, decode_tensors(items, threads)))
    quantized = [(n, item) for n, item in zip(names, items) if item[0]["encoding"] == ENCODING_KMEANS]
    indices = dict(zip([n for n, _ in quantized], decode_index_arrays([item for _, item in quantized], threads)))
    for result in (*values.values(), *indices.values()):
        if isinstance(result, SqzError):
            raise result
    out = []
    for pair in f.header["pairs"]:
        factors = [f.records[index[pair[key]]] for key in ("a", "b")]
        zero = rank.zero_components(*(rank.magnitudes(r["dtype"], r["shape"], values[r["name"]]) for r in factors))
        a_bits, b_bits = (component_bits(indices[r["name"]], r, rows[r["name"]]["index_bytes_after"])
                          if r["name"] in indices else np.full(zero.size, rows[r["name"]]["bits_per_param"])
                          for r in factors)
        a_values, b_values = math.prod(factors[0]["shape"][1:]), factors[1]["shape"][0]  # a row of A, a column of B
        out.append({"module": pair["module"], "rank": int(zero.size), "kept": int((~zero).sum()),
                    "zero": zero.tolist(), "a_bits": a_bits.tolist(), "b_bits": b_bits.tolist(),
                    "bytes": ((a_bits * a_values + b_bits * b_values) / 8).tolist()})
    return out


