"""The effective weight update ΔW of a LoRA pair, as PEFT and the Sine-LoRA reference compute it.

plain: ΔW = scaling · B @ A
sine:  ΔW = scaling · sin(ω · B @ A) / γ        (Ji et al. 2025; γ = √in_features in their code)
conv factors are flattened to matrices and the result reshaped to the kernel shape; embedding
updates are transposed, as PEFT stores lora_embedding_A as [r, num_embeddings].
"""
from __future__ import annotations

import torch

from .adapter import Pair
from .constants import LAYER_CONV, LAYER_EMBEDDING, PAIR_SINE
from .errors import NonFiniteError


def delta_weight(pair: Pair, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW in float32 (float64 if a factor is float64). NonFiniteError, naming the module, rather than a ΔW
    holding inf or NaN: added into a model's weights, one would silently poison every output."""
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    rank = a.shape[0]
    product = b.to(dtype).reshape(b.shape[0], rank) @ a.to(dtype).reshape(rank, -1)
    if pair.kind == PAIR_SINE:
        product = torch.sin(pair.omega * product) / pair.gamma
    update = pair.scaling * product
    if not torch.isfinite(update).all():
        raise NonFiniteError(f"ΔW of {pair.module!r} is not finite: " + (
            "a factor holds inf or NaN" if not (torch.isfinite(a).all() and torch.isfinite(b).all())
            else f"it overflows {str(dtype).removeprefix('torch.')}"))
    if pair.layer == LAYER_CONV:
        return update.reshape(b.shape[0], *a.shape[1:])
    if pair.layer == LAYER_EMBEDDING:
        return update.T.contiguous()
    return update
