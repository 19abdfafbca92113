"""sqz: a compact, versioned file format and codec for LoRA adapters (k-means quantization + entropy coding)."""
from __future__ import annotations

__version__ = "2.5.1"

from .adapter import SineOptions
from .api import EncodeReport, SqzWarning, decode, encode, info
from .codec import EncodeOptions
from .errors import (
    ChecksumError,
    FormatError,
    InputError,
    LimitError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    SqzError,
    TruncatedError,
    UnsupportedVersionError,
)

__all__ = ["AdapterCache", "Attached", "CacheFullError", "ChecksumError", "EncodeOptions", "EncodeReport",
           "FormatError", "InputError", "LimitError", "Merged", "MissingTensorError", "NonFiniteError",
           "OutputError", "OutputExistsError", "SineOptions", "SqzAdapter", "SqzError", "SqzWarning", "TruncatedError",
           "UnmatchedModulesError", "UnsupportedVersionError", "__version__", "attach", "decode", "encode", "info",
           "load", "load_file", "merge", "peft", "safe_open"]

_ON_FIRST_USE = {
    "SqzAdapter": "loader", "load": "loader", "AdapterCache": "cache", "CacheFullError": "cache",
    "UnmatchedModulesError": "match", "Attached": "merging", "Merged": "merging", "attach": "merging", "merge": "merging",
    "MissingTensorError": "safetensors_compat", "load_file": "safetensors_compat", "safe_open": "safetensors_compat",
}
"""Names whose modules import torch (~2 s, most of a CLI run's start-up), imported when first used: encode,
decode and info need none of it. `sqz.peft` imports PEFT and transformers, seconds more, likewise."""


def __getattr__(name: str):
    import importlib

    if name == "peft":
        return importlib.import_module(".peft", __name__)
    if name in _ON_FIRST_USE:
        value = getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
