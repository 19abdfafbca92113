"""LoRA and SineLoRA as the bench trains and evaluates them, for any torch model (MiniLM, the tiny LLaMA),
and the padded batches both models are fed.

SineLoRA follows the reference implementation of Ji et al. (their `sinlora` tuner):
ΔW = sin(ω·B@A) / s · (α/r) with s = √in_features. Keys are PEFT's: `base_model.model.<module>.lora_A.weight`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

PREFIX = "base_model.model."  # PEFT's key prefix for a bare model


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a LoRA (omega None) or SineLoRA update, PEFT's initialisation."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, omega: float | None):
        super().__init__()
        self.base, self.omega, self.scaling = base, omega, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.omega is None:
            return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling
        # one matmul with the merged weight, not base(x) + x @ ΔWᵀ: sine training ran ~1.7x LoRA's time
        return nn.functional.linear(x, self.base.weight + self.delta().to(self.base.weight.dtype), self.base.bias)

    def delta(self) -> torch.Tensor:
        return delta_of(self.lora_A, self.lora_B, self.scaling, self.omega)


def delta_of(a: torch.Tensor, b: torch.Tensor, scaling: float, omega: float | None) -> torch.Tensor:
    """ΔW of one pair, as the reference implementations compute it (γ = √in for sine)."""
    product = b.float() @ a.float()
    if omega is not None:
        product = torch.sin(omega * product) / math.sqrt(a.shape[1])
    return scaling * product


def deltas_of(tensors: dict[str, np.ndarray], scaling: float, omega: float | None) -> dict[str, torch.Tensor]:
    """ΔW per module (PEFT-prefixed module names) from a file's factors."""
    return {name.removesuffix(".lora_A.weight"): delta_of(torch.from_numpy(a),
                                                          torch.from_numpy(tensors[name.replace(".lora_A.", ".lora_B.")]),
                                                          scaling, omega)
            for name, a in tensors.items() if name.endswith(".lora_A.weight")}


def padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token sequences, right-padded with 0 to the longest."""
    width = max(len(seq) for seq in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for j, seq in enumerate(sequences):
        ids[j, : len(seq)] = torch.tensor(seq)
        mask[j, : len(seq)] = 1
    return ids, mask


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@contextmanager
def wrapped(root: nn.Module, names: list[str], rank: int, alpha: float,
            omega: float | None) -> Iterator[dict[str, LoraLinear]]:
    """Train-time adapters on the named linears of `root`, trainable; the frozen linears are put back on exit."""
    modules = {name: LoraLinear(root.get_submodule(name), rank, alpha, omega) for name in names}
    for name, module in modules.items():
        _replace(root, name, module)
    try:
        yield modules
    finally:
        for name, module in modules.items():
            _replace(root, name, module.base)


def factors(modules: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """PEFT-named float32 factors of trained adapters."""
    return {f"{PREFIX}{name}.lora_{part}.weight": getattr(m, f"lora_{part}").detach().clone().contiguous()
            for name, m in modules.items() for part in "AB"}


@contextmanager
def merged(root: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Evaluate with W + ΔW in every adapted linear (keys: module names under `root`, PEFT prefix optional)."""
    saved = {}
    try:
        for name, delta in deltas.items():
            linear = root.get_submodule(name.removeprefix(PREFIX))
            saved[name] = linear.weight.data.clone()
            linear.weight.data += delta.to(linear.weight.dtype)
        yield root
    finally:
        for name, weight in saved.items():
            root.get_submodule(name.removeprefix(PREFIX)).weight.data = weight
