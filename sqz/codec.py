"""One tensor <-> one data section (spec: "Sections").

kmeans section: codebook (codebook_size little-endian float32) then the entropy payload of the indices.
raw section:    the tensor's little-endian bytes through the entropy stage (none or zstd).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import numpy as np

from . import entropy
from .adapter import SourceTensor
from .constants import (ENCODING_KMEANS, ENCODING_RAW, ENTROPY_NONE, ENTROPY_RANS, ENTROPY_STAGES, ENTROPY_ZSTD,
                        ENTROPY_ZSTD_ALIGNED, MAX_BITS, MIN_BITS, QUANTIZABLE_DTYPES, ROLE_A, ROLE_B, ROLE_OTHER)
from .dtypes import float32_to_bits, itemsize, to_float64
from .errors import FormatError, InputError
from .quantize import DEFAULT_SAMPLE, quantize, tensor_seed

ENTROPY_AUTO = "auto"


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that decides the bytes of a .sqz file (with the input): same options, same file."""

    bits: int = 3
    sample: int = DEFAULT_SAMPLE  # values the centroids are fitted on; 0 = all
    seed: int = 0
    entropy: str = ENTROPY_AUTO  # auto | none | zstd | zstd-aligned | rans
    lossless: tuple[str, ...] = ()  # name globs kept exact even if they are LoRA factors
    quantize: tuple[str, ...] = ()  # name globs of non-factor float tensors to quantize as well

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise InputError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        if self.sample < 0:
            raise InputError(f"--sample must be >= 0, got {self.sample}")
        if self.entropy not in (ENTROPY_AUTO, *ENTROPY_STAGES):
            raise InputError(f"entropy must be auto or one of {', '.join(ENTROPY_STAGES)}, got {self.entropy!r}")

    def to_json(self) -> dict:
        return {**asdict(self), "lossless": list(self.lossless), "quantize": list(self.quantize)}


def should_quantize(t: SourceTensor, role: str, options: EncodeOptions) -> bool:
    """LoRA factors are quantized; other tensors only when --quantize names them. Never empty or non-float ones."""
    if t.dtype not in QUANTIZABLE_DTYPES or t.numel == 0:
        return False
    if any(fnmatch.fnmatchcase(t.name, g) for g in options.lossless):
        return False
    if role in (ROLE_A, ROLE_B):
        return True
    return role == ROLE_OTHER and any(fnmatch.fnmatchcase(t.name, g) for g in options.quantize)


RANS_MIN_SAVING = 0.02
"""auto keeps rANS only where it saves at least this fraction over the best other stage: it decodes
about 15x slower than zstd-aligned, which is usually within 1-2% of its size."""


def _smallest(candidates: dict[str, bytes]) -> tuple[str, bytes]:
    """Smallest payload, rANS only by a clear margin; ties go to the stage that decodes fastest."""
    order = {ENTROPY_NONE: 0, ENTROPY_ZSTD_ALIGNED: 1, ENTROPY_ZSTD: 2, ENTROPY_RANS: 3}
    fast = [s for s in candidates if s != ENTROPY_RANS]
    stage = min(fast or candidates, key=lambda s: (len(candidates[s]), order[s]))
    rans = candidates.get(ENTROPY_RANS)
    if rans is not None and fast and len(rans) <= (1 - RANS_MIN_SAVING) * len(candidates[stage]):
        stage = ENTROPY_RANS
    return stage, candidates[stage]


def encode_tensor(t: SourceTensor, role: str, options: EncodeOptions) -> tuple[dict, bytes]:
    """The header record (without offset/length/crc32) and the section bytes of one tensor."""
    record = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "role": role}
    if not should_quantize(t, role, options):
        return _encode_raw(t, record, options)
    try:
        q = quantize(to_float64(t.raw, t.dtype), options.bits, options.sample, tensor_seed(options.seed, t.name))
    except InputError as exc:
        raise InputError(f"{t.name}: {exc}") from None
    k = int(q.codebook.size)
    stages = ENTROPY_STAGES if options.entropy == ENTROPY_AUTO else (options.entropy,)
    stage, payload = _smallest(entropy.encode_stages(q.indices, options.bits, k, stages))
    if k == 1:
        stage = ENTROPY_NONE  # spec: a one-entry codebook has an empty payload, recorded as 'none'
    record.update(encoding=ENCODING_KMEANS, entropy=stage, bits=options.bits, codebook_size=k,
                  sample_size=q.sample_size, seed=q.seed)
    section = q.codebook.astype("<f4").tobytes() + payload
    if options.entropy == ENTROPY_AUTO:
        # A small tensor at many bits can cost more as codebook + indices than as its exact bytes
        # (a 384-value factor at 8 bits: 1 KiB of codebook). auto never stores a factor larger than exact.
        exact_record, exact = _encode_raw(t, {k: record[k] for k in ("name", "shape", "dtype", "role")}, options)
        if len(exact) <= len(section):
            return exact_record, exact
    return record, section


def _encode_raw(t: SourceTensor, record: dict, options: EncodeOptions) -> tuple[dict, bytes]:
    stages = (ENTROPY_NONE, ENTROPY_ZSTD) if options.entropy == ENTROPY_AUTO else (
        ENTROPY_ZSTD if options.entropy == ENTROPY_ZSTD else ENTROPY_NONE,)
    stage, payload = _smallest({s: entropy.encode_bytes(t.raw, s) for s in stages})
    return {**record, "encoding": ENCODING_RAW, "entropy": stage}, payload


def codebook_of(record: dict, section: memoryview) -> np.ndarray:
    return np.frombuffer(section[: 4 * record["codebook_size"]], dtype="<f4")


def decode_tensor(record: dict, section: memoryview) -> np.ndarray:
    """The tensor's little-endian bytes as a flat numpy array (uint8 for raw, uint16/32/64 words for kmeans)."""
    count = int(np.prod(record["shape"], dtype=np.int64))
    if record["encoding"] == ENCODING_RAW:
        raw = entropy.decode_bytes(section, count * itemsize(record["dtype"]), record["entropy"])
        return np.frombuffer(raw, dtype=np.uint8).copy()
    k = record["codebook_size"]
    codebook = codebook_of(record, section)
    if not np.isfinite(codebook).all() or (k > 1 and not (np.diff(codebook) > 0).all()):
        raise FormatError(f"{record['name']!r}: codebook must be finite and strictly increasing")
    return entropy.decode_values(section[4 * k:], count, record["bits"], float32_to_bits(codebook, record["dtype"]),
                                 record["entropy"])
