"""`safe_open` and `load_file` for .sqz files, behaving like safetensors' own, so that a loader reading adapters
with safetensors switches by changing one import. Tensors decode lazily (loader.SqzAdapter); names, shapes, dtypes and
metadata are those of the original file, which is what safetensors returns for the decoded file."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InputError, SqzError
from .loader import SqzAdapter, load

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

FRAMEWORKS = ("pt", "torch")


class MissingTensorError(SqzError, KeyError):
    """get_tensor of a name the file does not hold (safetensors raises its SafetensorError here)."""


class SqzSlice:
    """What `get_slice` returns: shape and dtype without decoding; indexing decodes the tensor and slices it."""

    def __init__(self, adapter: SqzAdapter, name: str, record: dict):
        self._adapter, self._name, self._record = adapter, name, record

    def get_shape(self) -> list[int]:
        return list(self._record["shape"])

    def get_dtype(self) -> str:
        return self._record["dtype"]

    def __getitem__(self, index) -> torch.Tensor:
        return self._adapter[self._name][index]


class safe_open:  # the name of the safetensors class it stands in for
    """`with sqz.safe_open("a.sqz", framework="pt", device="cpu") as f: f.get_tensor(name)`."""

    def __init__(self, filename: str | Path, framework: str, device: str | int | torch.device = "cpu"):
        if framework not in FRAMEWORKS:
            raise InputError(f"framework {framework!r}: sqz decodes to torch tensors, use framework='pt'")
        self._adapter = load(filename, device=f"cuda:{device}" if isinstance(device, int) else device)
        self._records = {r["name"]: r for r in self._adapter.header["tensors"]}

    def keys(self) -> list[str]:
        """Every tensor name, sorted (as safetensors lists them)."""
        return sorted(self._adapter)

    def offset_keys(self) -> list[str]:
        """Every tensor name in the order of the file's sections."""
        return list(self._adapter)

    def metadata(self) -> dict[str, str] | None:
        """The original file's __metadata__ (None when it had none)."""
        return self._adapter.metadata

    def get_tensor(self, name: str) -> torch.Tensor:
        if name not in self._adapter:
            raise MissingTensorError(f"File does not contain tensor {name}")
        return self._adapter[name]

    def get_slice(self, name: str) -> SqzSlice:
        if name not in self._adapter:
            raise MissingTensorError(f"File does not contain tensor {name}")
        return SqzSlice(self._adapter, name, self._records[name])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._adapter.close()


def load_file(filename: str | Path, device: str | int | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .sqz file, as `safetensors.torch.load_file` returns those of a .safetensors file."""
    with safe_open(filename, framework="pt", device=device) as f:
        return {name: f.get_tensor(name) for name in f.offset_keys()}
