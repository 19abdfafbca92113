"""The Python API: encode, decode, info and load. The CLI is a thin layer over these."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import __version__, container, targets
from .adapter import CONFIG_NAME, PEFT_PREFIX, TORCH_DTYPES, Adapter, Pair, SineOptions, read_adapter
from .atomic import atomic_file, atomic_path, check_writable
from .bitpack import packed_size
from .codec import EncodeOptions, decode_tensors, encode_tensor, float_side_extent, read_side
from .constants import CODEBOOK_GRID, ENCODING_KMEANS, PAIR_SINE
from .delta import delta_weight
from .dtypes import itemsize
from .errors import InputError, SqzError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

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


READ_AHEAD_BYTES = 16 << 20
"""A lookup that misses decodes the tensors after it in the file as well, up to this many decoded bytes, in
one batch on torch's threads: reading a whole adapter in file order (what loading it into a model does) runs in
parallel, while a single lookup decodes at most this much more than it asked for."""


def _torch_empty(size: int) -> np.ndarray:
    """A batch's output memory, from torch's allocator: numpy advises huge pages for arrays of 4 MiB and
    more, and on a machine short of free huge pages (measured: a VM) the first touch of each then costs
    more than decoding into it: a fresh process's load took 14 ms or 60 ms at random, 18-21 ms without."""
    try:
        return torch.empty(size, dtype=torch.uint8).numpy()
    except RuntimeError as exc:  # torch's CPU allocator reports running out of memory this way
        raise MemoryError(str(exc)) from None


class SqzAdapter(Mapping):
    """A read-only mapping name -> torch.Tensor over a .sqz file, decoding tensors on first access.

    Tensors come back under their original names, in their original dtype (or `dtype`), on `device`.
    A miss also decodes the tensors that follow it in the file (READ_AHEAD_BYTES) in the same batch;
    tensors decoded together share one buffer. Decoded tensors are cached; the mapping is safe to share
    between threads.
    """

    def __init__(self, path: str | Path | bytes, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self._file = container.Container(path)
        self._index = {r["name"]: i for i, r in enumerate(self._file.records)}
        self._sizes = [math.prod(r["shape"]) * itemsize(r["dtype"]) for r in self._file.records]
        self._device = torch.device(device)
        self._dtype = dtype
        self._threads = torch.get_num_threads()  # as many as torch computes with (OMP_NUM_THREADS, set_num_threads)
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @cached_property
    def pairs(self) -> list[Pair]:
        """The LoRA pairs and the numbers that make their ΔW (built on first use: most opens never need them)."""
        return [Pair(p["module"], p["a"], p["b"], p["kind"], p["layer"], p["scaling"], p.get("omega"), p.get("gamma"))
                for p in self._file.header["pairs"]]

    @cached_property
    def _pairs_by_module(self) -> dict[str, Pair]:
        return {p.module: p for p in self.pairs}

    @property
    def config(self) -> dict | None:
        """The adapter_config.json the adapter came with, if any."""
        return self._file.header.get("config")

    @property
    def metadata(self) -> dict[str, str] | None:
        """The safetensors __metadata__ of the original file, if any."""
        return self._file.header.get("metadata")

    @property
    def header(self) -> dict[str, Any]:
        return self._file.header

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        decoded = self._decode_batch(self._read_ahead(self._index[name]))
        with self._lock:
            for i, result in decoded.items():
                if isinstance(result, torch.Tensor):
                    self._cache.setdefault(self._file.records[i]["name"], result)
            result = decoded[self._index[name]]
            if isinstance(result, SqzError):
                raise result  # a tensor read ahead that fails is left out, and reports when it is asked for
            return self._cache[name]

    def _read_ahead(self, first: int) -> list[int]:
        """`first` and the uncached tensors right after it, up to READ_AHEAD_BYTES of output."""
        batch, size = [first], self._sizes[first]
        with self._lock:
            for i in range(first + 1, len(self._sizes)):
                if size >= READ_AHEAD_BYTES or self._file.records[i]["name"] in self._cache:
                    break
                batch.append(i)
                size += self._sizes[i]
        return batch

    def _decode_batch(self, batch: list[int]) -> dict[int, torch.Tensor | SqzError]:
        """Decode tensors together (they share one buffer); each result is a tensor or the error it raised."""
        sections, decoded = {}, {}
        for i in batch:
            try:
                sections[i] = self._file.section(i)
            except SqzError as exc:
                decoded[i] = exc
        results = decode_tensors([(self._file.records[i], section) for i, section in sections.items()],
                                 threads=self._threads, allocate=_torch_empty)
        for i, result in zip(sections, results):
            decoded[i] = result if isinstance(result, SqzError) else self._to_torch(result, self._file.records[i])
        return decoded

    def _to_torch(self, data: np.ndarray, record: dict[str, Any]) -> torch.Tensor:
        """A tensor's little-endian bytes as a tensor of the record's dtype and shape (or self._dtype), on the device."""
        dtype = TORCH_DTYPES[record["dtype"]]
        if data.size == 0:
            tensor = torch.empty(record["shape"], dtype=dtype)
        else:
            tensor = torch.from_numpy(data).view(dtype).reshape(record["shape"])
        if self._dtype is not None:
            tensor = tensor.to(self._dtype)
        return tensor.to(self._device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def delta(self, module: str) -> torch.Tensor:
        """Effective ΔW of one module: scaling·sin(ω·B@A)/γ for sine pairs, scaling·B@A otherwise."""
        try:
            pair = self._pairs_by_module[module]
        except KeyError:
            raise KeyError(f"no LoRA pair for module {module!r}") from None
        return delta_weight(pair, self[pair.a], self[pair.b])

    def deltas(self) -> dict[str, torch.Tensor]:
        """ΔW of every pair, keyed by module name."""
        return {p.module: self.delta(p.module) for p in self.pairs}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | Path | bytes, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SqzAdapter:
    """Open a .sqz file (a path, or the whole file as bytes) as a lazy, read-only mapping name -> torch.Tensor."""
    return SqzAdapter(path, device=device, dtype=dtype)


def decode(src: str | Path, dst: str | Path, force: bool = False, delta: bool = False,
           dtype: torch.dtype | None = None, progress: bool | None = None) -> list[Path]:
    """Write a .sqz back as safetensors; `dst` ending in '/' (or an existing directory) gets a PEFT folder."""
    as_folder = str(dst).endswith(("/", os.sep)) or Path(dst).is_dir()
    if as_folder and delta:
        raise InputError("--delta writes one safetensors file, not a PEFT folder: give a file name")
    dst = Path(dst)
    targets = [dst / WEIGHTS_NAME, dst / CONFIG_NAME] if as_folder else [dst]
    for target in targets:
        if target.exists() and not force:
            check_writable(target, force)  # raises OutputExistsError
    if as_folder:
        dst.mkdir(parents=True, exist_ok=True)
    check_writable(targets[0], force)
    with load(src, dtype=dtype) as adapter:
        if delta:
            modules = _progress(adapter.pairs, len(adapter.pairs), "delta", progress)
            tensors = {p.module: adapter.delta(p.module) for p in modules}
        else:
            tensors = {name: adapter[name] for name in _progress(adapter, len(adapter), "decode", progress)}
        with atomic_path(targets[0], force) as tmp:
            save_file(tensors, str(tmp), metadata=adapter.metadata)
        if as_folder:
            config = adapter.config or synthesize_config(adapter)
            with atomic_file(targets[1], force) as f:
                f.write(json.dumps(config, indent=2, sort_keys=True).encode("utf-8"))
    return targets


def synthesize_config(adapter: SqzAdapter) -> dict[str, Any]:
    """A PEFT LoRA config for an adapter stored without one: the common rank and alpha, patterns for the rest."""
    if not adapter.pairs:
        raise SqzError("the file has no adapter_config.json and no LoRA pairs to build one from")
    records = {r["name"]: r for r in adapter.header["tensors"]}
    ranks = {p.module: records[p.a]["shape"][0] for p in adapter.pairs}
    alphas = {p.module: p.scaling * ranks[p.module] for p in adapter.pairs}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    short = {m: m.removeprefix(PEFT_PREFIX) for m in ranks}
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "rank_pattern": {short[m]: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {short[m]: v for m, v in alphas.items() if v != alpha},
    }
    sine = [p for p in adapter.pairs if p.kind == PAIR_SINE]
    if sine:
        config.update(peft_type="SINLORA", freq=sine[0].omega)
    return config


def info(path: str | Path) -> dict[str, Any]:
    """Where every bit went: per-tensor sizes and the totals (what `sqz info --json` prints)."""
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
        return {"path": str(path), "version": ".".join(map(str, f.version)), "generator": f.header.get("generator"),
                "options": f.header.get("options"), "tensors": rows, "totals": totals}
    finally:
        f.close()


