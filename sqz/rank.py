"""Decoded ranks: the components of a pair that decode to exactly zero are left out where the factors go into a
model: a decoded PEFT folder and sqz.peft.from_pretrained/load_adapter, with the PEFT config that says so, and
sqz.attach, which needs none. The model then runs each module at the rank the file really has.

A rate target stores each pair in its SVD gauge (gauge.py), one rank-1 component in a row of A and the same column
of B, and rounds the components that are not worth a bit to zero: on the bench's LLaMA LoRA r=16 at --bpp 2, 140
of its 448. Their terms of B@A are exact zeros, so leaving them out keeps ΔW as it was, and each module keeps its
scaling through rank_pattern/alpha_pattern: lora_alpha/r (/√r with rsLoRA) at the new rank equals the stored
scaling exactly, or that module keeps its rank. A module whose every component is zero keeps one (PEFT needs
r ≥ 1). Only PEFT LoRA configs of PEFT-named pairs are rewritten: a sine adapter's or kohya's scaling is not
PEFT's to keep.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .adapter import PEFT_PREFIX, pattern_value
from .constants import QUANTIZABLE_DTYPES
from .dtypes import itemsize

PEFT_LORA = "LORA"
ALPHA_NEIGHBOURS = 4
"""Floats either side of scaling·r tried for an alpha whose PEFT scaling is the stored one exactly."""

Tensors = dict[str, tuple[str, list[int], np.ndarray]]
"""name -> (safetensors dtype, shape, little-endian bytes): a decoded adapter as the safetensors writer takes it."""


def zero_components(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[r] bool: component i, row i of A [r, in…] or column i of B [out, r…], is exactly zero in either factor.
    Takes values (-0.0 is zero) or bit patterns with the sign bit cleared."""
    rank = a.shape[0]
    return ~a.reshape(rank, -1).any(axis=1) | ~np.moveaxis(b, 1, 0).reshape(rank, -1).any(axis=1)


def kept_components(zeros: np.ndarray) -> np.ndarray:
    """The indices of the components that are not zero, or of the first one where all are (PEFT needs r ≥ 1)."""
    return np.flatnonzero(~zeros) if not zeros.all() else np.zeros(1, dtype=np.int64)


def kept(config: dict[str, Any] | None, pairs: list[dict[str, Any]],
         zero: Callable[[dict[str, Any]], np.ndarray | None]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The components each pair keeps (module -> indices, for the pairs that lose some) and the PEFT config that
    gives every module its rank and scaling, or None where nothing is left out: no component is zero (`zero(pair)`,
    None for a pair it cannot tell), the config is not a PEFT LoRA config or a pair is not PEFT-named (kohya's
    `.alpha` tensors give alpha for the stored rank), or PEFT's pattern rule would not read the ranks back (a module
    name that ends in another's)."""
    if not (config and config.get("peft_type") == PEFT_LORA and {"r", "lora_alpha"} <= config.keys()):
        return None
    if any(not pair["module"].startswith(PEFT_PREFIX) for pair in pairs):  # kohya's alpha tensors hold alpha for r
        return None
    rslora = bool(config.get("use_rslora"))
    keep, ranks = {}, {}
    for pair in pairs:
        zeros = zero(pair)
        if zeros is None:
            return None
        indices, rank = kept_components(zeros), zeros.size
        if indices.size < rank and _alpha_for(pair["scaling"], indices.size, rslora) is not None:
            keep[pair["module"]], rank = indices, indices.size
        ranks[pair["module"]] = (rank, pair["scaling"])
    if not keep:
        return None
    written = peft_config(config, ranks)
    return None if written is None else (keep, written)


def peft_config(config: dict[str, Any], ranks: dict[str, tuple[int, float]]) -> dict[str, Any] | None:
    """`config` (PEFT LoRA) with rank_pattern and alpha_pattern giving each module (module -> (rank, scaling)) that
    rank and exactly that scaling, a key per module that differs from r/lora_alpha; None if no alpha gives a
    module's scaling exactly or PEFT's rule would read another key for a module."""
    rslora = bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = {}, {}
    for module, (rank, scaling) in ranks.items():
        key, alpha = module.removeprefix(PEFT_PREFIX), _alpha_for(scaling, rank, rslora)
        if alpha is None:
            return None
        if rank != config["r"]:
            rank_pattern[key] = rank
        if alpha != config["lora_alpha"]:
            alpha_pattern[key] = alpha
    for module, (rank, scaling) in ranks.items():  # read back by PEFT's own rule
        key = module.removeprefix(PEFT_PREFIX)
        r = pattern_value(rank_pattern, key, config["r"])
        alpha = pattern_value(alpha_pattern, key, config["lora_alpha"])
        if r != rank or _peft_scaling(alpha, r, rslora) != scaling:
            return None
    return {**config, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def trimmed(tensors: Tensors, pairs: list[dict[str, Any]], config: dict[str, Any] | None) -> tuple[Tensors, Any]:
    """A decoded adapter's (tensors, config) with its zero components left out (`kept`), or both as they were."""
    def zero(pair: dict[str, Any]) -> np.ndarray | None:
        a, b = magnitudes(*tensors[pair["a"]]), magnitudes(*tensors[pair["b"]])
        return None if a is None or b is None else zero_components(a, b)  # (the reader checked the shapes pair)

    result = kept(config, pairs, zero)
    if result is None:
        return tensors, config
    keep, written = result
    out = dict(tensors)
    for pair in pairs:
        if pair["module"] in keep:
            indices = keep[pair["module"]]
            for name, axis in ((pair["a"], 0), (pair["b"], 1)):
                dtype, shape, data = tensors[name]
                bits = np.take(_patterns(data, dtype, shape), indices, axis=axis)
                out[name] = (dtype, list(bits.shape), np.ascontiguousarray(bits).view(np.uint8).reshape(-1))
    return out, written


def _patterns(data: np.ndarray, dtype: str, shape: list[int]) -> np.ndarray:
    return np.frombuffer(data, dtype=f"<u{itemsize(dtype)}").reshape(shape)


def magnitudes(dtype: str, shape: list[int], data: np.ndarray) -> np.ndarray | None:
    """A float tensor's bit patterns with the sign bit cleared (zero exactly where the value is ±0); None for other
    dtypes (a cast to one), whose components are never left out."""
    if dtype not in QUANTIZABLE_DTYPES:
        return None
    bits = _patterns(data, dtype, shape)
    return bits & np.array((1 << (8 * bits.itemsize - 1)) - 1, dtype=bits.dtype)


def _alpha_for(scaling: float, rank: int, rslora: bool) -> float | None:
    """An alpha that PEFT turns into exactly `scaling` at `rank`: scaling·r (·√r with rsLoRA) rounded to an integer
    where that does it (as configs hold), else that product or one of the floats nearest it."""
    guess = scaling * (math.sqrt(rank) if rslora else rank)
    if not math.isfinite(guess):
        return None
    candidates, up, down = [float(round(guess)), guess], guess, guess
    for _ in range(ALPHA_NEIGHBOURS):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return next((a for a in candidates if _peft_scaling(a, rank, rslora) == scaling), None)


def _peft_scaling(alpha: float, rank: float, rslora: bool) -> float:
    """PEFT's LoraLayer.update_layer: lora_alpha / r, or lora_alpha / math.sqrt(r) with use_rslora."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank

