"""sqz: a compact, versioned file format and codec for LoRA adapters (k-means quantization + entropy coding)."""
from __future__ import annotations

__version__ = "2.2.2"

from .adapter import SineOptions
from .api import EncodeReport, SqzAdapter, SqzWarning, decode, encode, info, load
from .cache import AdapterCache, CacheFullError
from .codec import EncodeOptions
from .errors import (
    ChecksumError,
    FormatError,
    InputError,
    LimitError,
    NonFiniteError,
    OutputExistsError,
    SqzError,
    TruncatedError,
    UnsupportedVersionError,
)
from .match import UnmatchedModulesError
from .merge import Attached, Merged, attach, merge
from .safetensors_compat import MissingTensorError, load_file, safe_open

__all__ = ["AdapterCache", "Attached", "CacheFullError", "ChecksumError", "EncodeOptions", "EncodeReport",
           "FormatError", "InputError", "LimitError", "Merged", "MissingTensorError", "NonFiniteError",
           "OutputExistsError", "SineOptions", "SqzAdapter", "SqzError", "SqzWarning", "TruncatedError",
           "UnmatchedModulesError", "UnsupportedVersionError", "__version__", "attach", "decode", "encode", "info",
           "load", "load_file", "merge", "peft", "safe_open"]


def __getattr__(name: str):
    """`sqz.peft` imports PEFT (and transformers), seconds of start-up: only when it is used."""
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
