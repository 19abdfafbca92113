"""Loading: a .sqz file as a lazy mapping name -> torch.Tensor (`sqz.load`), the torch edge of the reading side.
Encode and info never import it, so those CLI runs do not pay torch's start-up; decode and the ways into a model
(merging, peft, cache, safetensors_compat) do."""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import container, rank
from .adapter import Pair
from .codec import decode_tensors
from .delta import delta_weight
from .dtypes import itemsize
from .errors import SqzError
from .torch_dtypes import TORCH_DTYPES

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11


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

    def __init__(self, path: str | Path | bytes | container.Container, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, label: str = "<bytes>"):
        self._file = path if isinstance(path, container.Container) else container.Container(path, label)
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


def zero_components(a: torch.Tensor, b: torch.Tensor) -> np.ndarray | None:
    """rank.zero_components of a pair's factors as torch tensors; None unless both are floats (float64 holds
    every value of the others exactly, zeros as zeros)."""
    if not (a.is_floating_point() and b.is_floating_point()):
        return None
    return rank.zero_components(a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy())


def load(path: str | Path | bytes | container.Container, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, label: str = "<bytes>") -> SqzAdapter:
    """Open a .sqz file (a path, or the whole file as bytes, which errors call `label`, or a Container already open,
    which closing the adapter closes) as a lazy, read-only mapping name -> torch.Tensor."""
    return SqzAdapter(path, device=device, dtype=dtype, label=label)
