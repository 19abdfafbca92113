"""A synthetic adapter with LLaMA-3-8B shapes: the paper's 28.3M-parameter rank-16 case (q, k, v, up, down x 32).

A starts near PEFT's Kaiming-uniform init (bound 1/sqrt(in)) plus a little drift; B, which starts at zero and
is all learned, is heavy-tailed (Student t, 3 degrees of freedom), as trained B factors are.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 1024
PROJECTIONS = {  # name: (in_features, out_features, module path)
    "q_proj": (HIDDEN, HIDDEN, "self_attn"), "k_proj": (HIDDEN, KV, "self_attn"), "v_proj": (HIDDEN, KV, "self_attn"),
    "up_proj": (HIDDEN, INTERMEDIATE, "mlp"), "down_proj": (INTERMEDIATE, HIDDEN, "mlp"),
}


def llama_adapter(rank: int = 16, layers: int = 32, scale: float = 1.0, seed: int = 0,
                  dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """PEFT-named factors. `scale` multiplies the layer count (0.25x, 1x, 4x adapters for scaling runs)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(max(1, round(layers * scale))):
        for name, (fan_in, fan_out, block) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            bound = 1 / math.sqrt(fan_in)
            a = rng.uniform(-bound, bound, (rank, fan_in)) + rng.normal(0, 0.1 * bound, (rank, fan_in))
            b = 2e-3 * rng.standard_t(3, (fan_out, rank))
            tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(a).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(b).to(dtype)
    return tensors


def llama_config(rank: int = 16, alpha: float = 32.0, sine_omega: float | None = None,
                 targets: Iterable[str] = PROJECTIONS) -> dict:
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
              "target_modules": sorted(targets), "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
              "task_type": "CAUSAL_LM"}
    if sine_omega is not None:
        config.update(peft_type="SINLORA", freq=sine_omega)
    return config


def save_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (a PEFT folder) and return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def write_llama_adapter(directory: str | Path, **kwargs) -> Path:
    """The i.i.d. adapter as a PEFT folder (`sine_omega` makes its config SineLoRA's)."""
    sine_omega = kwargs.pop("sine_omega", None)
    return save_adapter(directory, llama_adapter(**kwargs), llama_config(kwargs.get("rank", 16), sine_omega=sine_omega))


# ---------------------------------------------------------------- adapters with a trained adapter's statistics
ALL_PROJECTIONS = {**PROJECTIONS, "o_proj": (HIDDEN, HIDDEN, "self_attn"),
                   "gate_proj": (HIDDEN, INTERMEDIATE, "mlp")}


def trained_statistics(tensors: dict[str, np.ndarray]) -> dict[str, dict]:
    """What a trained PEFT adapter looks like, per projection (q_proj, ...), averaged over its layers:
    the singular spectrum of B@A relative to its largest value, the spread of B's row norms (log-std: a few
    rows carry most of the update, the tail), how far A moved from its Kaiming-uniform start (rms against the
    start's), and each factor's kurtosis (3 for a Gaussian)."""
    groups: dict[str, list[dict]] = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        a = a.astype(np.float64)
        sigma = np.linalg.svd(np.linalg.qr(b)[1] @ np.linalg.qr(a.T)[1].T, compute_uv=False)  # σ(B@A), r x r
        rows = np.linalg.norm(b, axis=1)
        groups.setdefault(name.split(".")[-3], []).append({
            "spectrum": sigma / sigma[0], "b_row_logstd": float(np.std(np.log(rows[rows > 0]))),
            "a_rms_ratio": float(np.sqrt(np.mean(a**2)) * math.sqrt(3 * a.shape[1])),
            "kurtosis_a": _kurtosis(a), "kurtosis_b": _kurtosis(b)})
    return {proj: {key: (np.mean([m[key] for m in mods], axis=0).tolist() if key == "spectrum"
                         else float(np.mean([m[key] for m in mods]))) for key in mods[0]}
            for proj, mods in sorted(groups.items())}


def _kurtosis(x: np.ndarray) -> float:
    x = x.ravel() - x.mean()
    return float(np.mean(x**4) / np.mean(x**2) ** 2)


def llama_adapter_like(stats: dict[str, dict], rank: int = 16, layers: int = 4, seed: int = 0,
                       dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """LLaMA-3-8B-shaped factors (every projection in `stats`) with a trained adapter's statistics.

    A = Kaiming-uniform start + Gaussian drift (its measured rms ratio); B@A = G·diag(σ)·R·Q with Q the
    orthonormal rows spanning A's row space, R a random rotation (ΔW's right singular vectors are not A's rows),
    σ the measured spectrum and G random signs times one log-normal magnitude per row, with B's measured
    row-norm spread, so B = G·diag(σ)·R·(A·Aᵀ)^(-1/2)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for proj, stat in stats.items():
            fan_in, fan_out, block = ALL_PROJECTIONS[proj]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            bound = 1 / math.sqrt(fan_in)
            drift = bound / math.sqrt(3) * math.sqrt(max(stat["a_rms_ratio"] ** 2 - 1, 0.0))
            a = rng.uniform(-bound, bound, (rank, fan_in)) + rng.normal(0, drift, (rank, fan_in))
            spectrum = np.interp(np.linspace(0, 1, rank), np.linspace(0, 1, len(stat["spectrum"])), stat["spectrum"])
            g = rng.choice([-1.0, 1.0], (fan_out, rank)) * np.exp(rng.normal(0, stat["b_row_logstd"], (fan_out, 1)))
            rotation = np.linalg.qr(rng.normal(size=(rank, rank)))[0]
            w, v = np.linalg.eigh(a @ a.T)
            b = 1e-2 / math.sqrt(fan_out) * (g * spectrum) @ rotation @ (v / np.sqrt(w) @ v.T)
            tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(a).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(b).to(dtype)
    return tensors
