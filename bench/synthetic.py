"""A synthetic adapter with LLaMA-3-8B shapes: the paper's 28.3M-parameter rank-16 case (q, k, v, up, down x 32).

A starts near PEFT's Kaiming-uniform init (bound 1/sqrt(in)) plus a little drift; B, which starts at zero and
is all learned, is heavy-tailed (Student t, 3 degrees of freedom), as trained B factors are.
"""
from __future__ import annotations

import json
import math
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


def llama_config(rank: int = 16, alpha: float = 32.0, sine_omega: float | None = None) -> dict:
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none", "lora_dropout": 0.0,
              "target_modules": sorted(PROJECTIONS), "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
              "task_type": "CAUSAL_LM"}
    if sine_omega is not None:
        config.update(peft_type="SINLORA", freq=sine_omega)
    return config


def write_llama_adapter(directory: str | Path, **kwargs) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (a PEFT folder) and return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sine_omega = kwargs.pop("sine_omega", None)
    tensors = llama_adapter(**kwargs)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(llama_config(kwargs.get("rank", 16), sine_omega=sine_omega)))
    return directory
