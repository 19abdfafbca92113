"""Where a pair's bits went, component by component (`sqz info --components`): the bits a value each rank-1
component (a row of A, the same column of B) got, and which components decode to zero (those a decoded PEFT folder
leaves out, rank.py).

A rate target spends its bits per component without saying so in the header: in the SVD gauge one codebook serves
every row of A', and a row's values fall into few or many of its cells as its σ_i is small or large; the entropy
stage then codes each row near its own entropy. The bits are attributed from the indices: under `none` each index
costs the width; under rans-grouped and rans-trellis, which model each component apart, its code length under its
own empirical distribution; under the others, under the tensor's. Each tensor's shares are then scaled to its real
payload, so a pair's components add up to what `sqz info` shows for its factors.
"""
from __future__ import annotations

import numpy as np

from .codec import matrix_shape
from .constants import ENTROPY_NONE, ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS, ROLE_A

PER_COMPONENT_MODELS = (ENTROPY_RANS_GROUPED, ENTROPY_RANS_TRELLIS)


def component_bits(indices: np.ndarray, record: dict, payload_bytes: int) -> np.ndarray:
    """Bits a value of each component of one factor (`record`, its `indices` in file order), the factor's
    `payload_bytes` of indices shared out by code length."""
    rows, cols = matrix_shape(record["shape"])
    grouped = indices.reshape(rows, cols)
    if record["role"] != ROLE_A:  # B [out, r]: a component is a column
        grouped = grouped.T
    rank, k = grouped.shape[0], record["codebook_size"]
    counts = np.bincount((np.arange(rank)[:, None] * k + grouped).ravel(), minlength=rank * k).reshape(rank, k)
    if record["entropy"] == ENTROPY_NONE:
        lengths = np.full(rank, float(record["bits"]) * grouped.shape[1])
    elif record["entropy"] in PER_COMPONENT_MODELS:
        lengths = (counts * _bits(counts / grouped.shape[1])).sum(axis=1)
    else:
        lengths = counts @ _bits(counts.sum(axis=0) / indices.size)
    total = float(lengths.sum())
    shares = lengths / total if total > 0 else np.zeros_like(lengths)
    return shares * 8 * payload_bytes / grouped.shape[1]


def _bits(p: np.ndarray) -> np.ndarray:
    """-log2 p, and 0 where p is 0 (a symbol that never occurs costs nothing)."""
    return 0.0 - np.log2(np.where(p > 0, p, 1))  # (0.0 - : a certain symbol costs 0.0 bits, not -0.0)
