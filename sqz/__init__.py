"""sqz: a compact, versioned file format and codec for LoRA adapters (k-means quantization + entropy coding)."""
from __future__ import annotations

__version__ = "1.1.0"

from .adapter import SineOptions
from .api import EncodeReport, SqzAdapter, SqzWarning, decode, encode, info, load
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

__all__ = ["ChecksumError", "EncodeOptions", "EncodeReport", "FormatError", "InputError", "LimitError",
           "NonFiniteError", "OutputExistsError", "SineOptions", "SqzAdapter", "SqzError", "SqzWarning",
           "TruncatedError", "UnsupportedVersionError", "__version__", "decode", "encode", "info", "load"]
