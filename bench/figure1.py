"""The paper's Figure 1: stable rank of AB, Q(A)Q(B), sin(ω·AB) and sin(ω·Q(A)Q(B)) against bits.

Q is the paper's quantizer (k-means on a seeded sample of 10,000 values, `sqz encode --sample 10000`). Two cases: a random low-rank
pair shaped and scaled like a trained adapter (as in the paper's illustration), and a trained SineLoRA pair
from the task bench when one is given.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.metrics import delta, stable_rank
from sqz.quantize import PAPER_SAMPLE, dequantize, quantize

BITS = (1, 2, 3, 4, 5, 6, 8)


def quantized(x: np.ndarray, bits: int, seed: int) -> np.ndarray:
    q = quantize(x.ravel(), bits, PAPER_SAMPLE, seed)
    return dequantize(q.codebook, q.indices).reshape(x.shape)


def curve(a: np.ndarray, b: np.ndarray, omega: float, bits=BITS) -> dict:
    """Stable ranks at every bit width; `a` is [r, in], `b` is [out, r] (PEFT's lora_A, lora_B)."""
    plain = lambda a_, b_: stable_rank(delta(a_, b_, None))
    sine = lambda a_, b_: stable_rank(delta(a_, b_, omega))
    rows = [{"bits": bits_, "QAQB": plain(qa, qb), "sin_QAQB": sine(qa, qb)}
            for bits_ in bits for qa, qb in [(quantized(a, bits_, 1), quantized(b, bits_, 2))]]
    return {"omega": omega, "rank": int(a.shape[0]), "shape": [int(b.shape[0]), int(a.shape[1])],
            "AB": plain(a, b), "sin_AB": sine(a, b), "rows": rows}


def synthetic_pair(rank: int = 4, size: int = 768, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian A and B scaled so that AB has unit-variance entries (the figure's units: ω·AB ~ ω)."""
    rng = np.random.default_rng(seed)
    std = rank ** -0.25
    return (rng.normal(0, std, (rank, size)).astype(np.float32),
            rng.normal(0, std, (size, rank)).astype(np.float32))


def run(trained: dict[str, tuple[np.ndarray, np.ndarray, float, str]], omega: float = 10.0) -> dict:
    """The synthetic case, and one per trained (A, B, ω, module name) given, under its name."""
    torch.manual_seed(0)
    out = {"synthetic": curve(*synthetic_pair(), omega)}
    for case, (a, b, trained_omega, module) in trained.items():
        out[case] = dict(curve(a, b, trained_omega), module=module)
    return out
