"""Distortion of the effective update ΔW (what the model sees), the components a reconstruction keeps, and the stable
rank of the paper's Figure 1."""
from __future__ import annotations

import math

import numpy as np
import torch

from sqz.rank import zero_components
from sqz.ratecontrol import lowrank_inner

Tensors = dict[str, np.ndarray]


def factor_pairs(tensors: Tensors) -> list[tuple[str, str, str]]:
    """(module, A name, B name) for every PEFT pair."""
    return [(name.removesuffix(".lora_A.weight"), name, name.replace(".lora_A.", ".lora_B."))
            for name in sorted(tensors) if name.endswith(".lora_A.weight")]


def components_kept(tensors: Tensors) -> tuple[int, int]:
    """(components that are not zero, components) over the adapter's pairs: what a model runs it at once the zero
    ones are left out (sqz/rank.py)."""
    zeros = [zero_components(tensors[a], tensors[b]) for _, a, b in factor_pairs(tensors)]
    return sum(int((~z).sum()) for z in zeros), sum(z.size for z in zeros)


def delta(a: np.ndarray, b: np.ndarray, omega: float | None) -> torch.Tensor:
    """B@A, or sin(ω·B@A)/√in (the scaling α/r is common to reference and reconstruction, so left out)."""
    product = torch.from_numpy(np.asarray(b, np.float32)) @ torch.from_numpy(np.asarray(a, np.float32))
    return product if omega is None else torch.sin(omega * product) / math.sqrt(a.shape[1])


def delta_distortion(reference: Tensors, reconstruction: Tensors, omega: float | None,
                     max_rows: int | None = None, seed: int = 0) -> dict[str, float]:
    """Relative Frobenius error and SQNR (dB) of ΔW summed over all pairs.

    Plain ΔW is exact over every entry, through r x r Gram matrices (plain_energies), whatever `max_rows`.
    For the sine, with `max_rows`, each ΔW is estimated from a seeded subset of its rows (rows of B@A are exact,
    so the sums are unbiased estimates); used on the 28.3M-parameter adapter, whose full ΔWs have 4.5G entries.
    """
    if omega is None:
        signal, noise = plain_energies(reference, reconstruction)
        return {"rel_fro": math.sqrt(noise / signal) if signal else 0.0,
                "sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else math.inf}
    signal = noise = 0.0
    rng = np.random.default_rng(seed)
    for _, a, b in factor_pairs(reference):
        rows = slice(None)
        out = reference[b].shape[0]
        if max_rows is not None and out > max_rows:
            rows = np.sort(rng.choice(out, max_rows, replace=False))
        weight = out / (max_rows if isinstance(rows, np.ndarray) else out)
        ref = delta(reference[a], reference[b][rows], omega)
        rec = delta(reconstruction[a], reconstruction[b][rows], omega)
        signal += weight * float(ref.double().square().sum())
        noise += weight * float((ref - rec).double().square().sum())
    return {"rel_fro": math.sqrt(noise / signal) if signal else 0.0,
            "sqnr_db": 10 * math.log10(signal / noise) if noise else math.inf}


def plain_energies(reference: Tensors, reconstruction: Tensors) -> tuple[float, float]:
    """(||ΔW||², ||ΔW - ΔW'||²) summed over all pairs, exactly, without forming ΔW = B@A [out, in]:
    ||BA - B'A'||² = <BA, BA> - 2 <BA, B'A'> + <B'A', B'A'>, each from r x r products in float64."""
    signal = noise = 0.0
    for _, a, b in factor_pairs(reference):
        A, B, A2, B2 = (np.asarray(t[n], np.float64) for t in (reference, reconstruction) for n in (a, b))
        energy = lowrank_inner(B, A, B, A)
        signal += energy
        noise += max(0.0, energy - 2 * lowrank_inner(B, A, B2, A2) + lowrank_inner(B2, A2, B2, A2))
    return signal, noise


def delta_rms(tensors: Tensors) -> float:
    """The rms of B@A over every entry of every pair, exactly, from r x r products (no [out, in] matrix)."""
    energy, entries = 0.0, 0
    for _, a, b in factor_pairs(tensors):
        A, B = np.asarray(tensors[a], np.float64), np.asarray(tensors[b], np.float64)
        energy += lowrank_inner(B, A, B, A)
        entries += B.shape[0] * A.shape[1]
    return math.sqrt(energy / entries)


def stable_rank(matrix: torch.Tensor) -> float:
    """||M||_F² / σ_max², a soft count of the directions that carry the energy."""
    matrix = matrix.double()
    top = float(torch.linalg.matrix_norm(matrix, ord=2))
    return float(matrix.square().sum()) / top**2 if top else 0.0
