"""sqz: a compact, versioned file format and codec for LoRA adapters (k-means quantization + entropy coding)."""
from __future__ import annotations

__version__ = "1.1.0"

from .adapter import SineOptions  # noqa: E402
from .api import EncodeReport, SqzAdapter, SqzWarning, decode, encode, info, load  # noqa: E402
from .codec import EncodeOptions  # noqa: E402
from .errors import (ChecksumError, FormatError, InputError, LimitError, NonFiniteError, OutputExistsError,  # noqa: E402
                     SqzError, TruncatedError, UnsupportedVersionError)

__all__ = ["ChecksumError", "EncodeOptions", "EncodeReport", "FormatError", "InputError", "LimitError",
           "NonFiniteError", "OutputExistsError", "SineOptions", "SqzAdapter", "SqzError", "SqzWarning", "TruncatedError",
           "UnsupportedVersionError", "__version__", "decode", "encode", "info", "load"]
