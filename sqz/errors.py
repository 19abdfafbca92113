"""One exception family: everything sqz raises on bad input is an SqzError with a one-line message."""
from __future__ import annotations


class SqzError(Exception):
    """Base of every error sqz reports to a user."""


class InputError(SqzError):
    """The adapter given to the encoder cannot be read or encoded (bad file, NaN, bad flags)."""


class FormatError(SqzError):
    """A .sqz file breaks the format: wrong magic, malformed header, inconsistent records."""


class UnsupportedVersionError(FormatError):
    """A .sqz file of a major version this reader does not know."""


class TruncatedError(FormatError):
    """A .sqz file is shorter than its header says: cut short in transit."""


class ChecksumError(FormatError):
    """A section or the header does not match its CRC-32: the bytes were corrupted."""


class LimitError(FormatError):
    """A header claims sizes beyond the reader's limits; refused before any allocation."""


class NonFiniteError(SqzError):
    """A computed ΔW holds inf or NaN (lossless factors that hold them, or an update beyond float32): never returned."""


class OutputError(SqzError):
    """The output cannot be written: its directory is missing or read-only, the disk is full."""


class OutputExistsError(OutputError):
    """The output path exists and --force was not given."""
