"""Many adapters in host memory, compressed, and the few in use decoded: what a multi-adapter server keeps.

An AdapterCache holds the .sqz bytes of every adapter it is given (up to max_host_bytes; an adapter added from a
path may be dropped from memory and is then read again when asked for) and the decoded tensors of the
max_decoded most recently used adapters, per device. `get` is thread-safe; concurrent requests for an adapter
that is not decoded wait for one decode instead of each running their own.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from . import container
from .errors import InputError, SqzError
from .loader import load


class CacheFullError(SqzError):
    """Adding an adapter would exceed max_host_bytes and nothing held can be dropped (bytes not backed by a file)."""


@dataclass
class CacheStats:
    hits: int = 0  # get() answered from decoded tensors
    misses: int = 0  # get() that decoded
    rereads: int = 0  # misses whose bytes had been dropped and were read from their file again
    decoded_evictions: int = 0
    host_evictions: int = 0


@dataclass
class _Held:
    path: Path | None
    data: bytes | None  # None once dropped from memory (only when path is set)


class AdapterCache:
    """`cache.add("name", "a.sqz")` then `cache.get("name", device="cuda")` -> {tensor name: tensor}."""

    def __init__(self, max_host_bytes: int = 4 << 30, max_decoded: int = 8, dtype: torch.dtype | None = None):
        if max_host_bytes <= 0 or max_decoded <= 0:
            raise InputError("max_host_bytes and max_decoded must be positive")
        self.max_host_bytes, self.max_decoded, self.dtype = max_host_bytes, max_decoded, dtype
        self.stats = CacheStats()
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._decoded: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def host_bytes(self) -> int:
        """Bytes of .sqz files held in memory now."""
        with self._lock:
            return sum(len(h.data) for h in self._held.values() if h.data is not None)

    @property
    def decoded(self) -> list[tuple[str, str]]:
        """(name, device) of the adapters held decoded now, least recently used first."""
        with self._lock:
            return list(self._decoded)

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def __len__(self) -> int:
        return len(self._held)

    def add(self, name: str, source: str | Path | bytes) -> None:
        """Hold an adapter's file (a path, or its bytes). The header is checked now: a bad file fails here."""
        path = None if isinstance(source, bytes) else Path(source)
        data = source if path is None else _read(path)
        container.Container(data, _label(name)).close()  # magic, version, header CRC and limits
        with self._lock:
            old = self._held.get(name)
            self._make_room(len(data) - (len(old.data) if old and old.data is not None else 0), name)
            self._drop_decoded(name)
            self._held.pop(name, None)
            self._held[name] = _Held(path, data)

    def remove(self, name: str) -> None:
        with self._lock:
            self._drop_decoded(name)
            if self._held.pop(name, None) is None:
                raise KeyError(name)

    def get(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The adapter's tensors on `device`, decoding them unless they are among the max_decoded most recent."""
        key = (name, str(torch.device(device)))
        with self._lock:
            if name not in self._held:
                raise KeyError(f"no adapter named {name!r} in the cache")
            self._held.move_to_end(name)
            future = self._decoded.get(key)
            owner = future is None
            if owner:
                held = self._held[name]
                future = self._decoded[key] = Future()
                self.stats.misses += 1
                while len(self._decoded) > self.max_decoded:
                    self._decoded.popitem(last=False)
                    self.stats.decoded_evictions += 1
            else:
                self._decoded.move_to_end(key)
                self.stats.hits += 1
        if not owner:
            return dict(future.result())
        try:
            data = held.data  # read once: another request may drop it meanwhile
            data = data if data is not None else self._reread(name, held)
            with load(data, device=device, dtype=self.dtype, label=_label(name)) as adapter:
                tensors = {n: adapter[n] for n in adapter}
        except BaseException as exc:
            future.set_exception(exc)
            with self._lock:
                if self._decoded.get(key) is future:
                    del self._decoded[key]
            raise
        future.set_result(tensors)
        return dict(tensors)

    def _reread(self, name: str, held: _Held) -> bytes:
        """Bytes dropped from memory, read from their file again (outside the lock: other requests go on), then
        held again, making room."""
        data = _read(held.path)
        with self._lock:
            if held.data is not None:  # another request read it meanwhile
                return held.data
            self._make_room(len(data), name)
            held.data = data
            self.stats.rereads += 1
        return data

    def _make_room(self, size: int, keep: str) -> None:
        """Drop the least recently used file-backed bytes until `size` more fit. Called under the lock."""
        used = sum(len(h.data) for h in self._held.values() if h.data is not None)
        for other, held in self._held.items():
            if used + size <= self.max_host_bytes:
                break
            if other != keep and held.path is not None and held.data is not None:
                used -= len(held.data)
                held.data = None
                self.stats.host_evictions += 1
        if used + size > self.max_host_bytes:
            raise CacheFullError(f"{size} more bytes do not fit in max_host_bytes={self.max_host_bytes} "
                                 f"({used} held that no file backs)")

    def _drop_decoded(self, name: str) -> None:
        for key in [k for k in self._decoded if k[0] == name]:
            del self._decoded[key]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _label(name: str) -> str:
    """What errors call an adapter held as bytes: its name in the cache, which is what a server knows it by."""
    return f"adapter {name!r}"
