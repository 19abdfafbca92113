"""Real adapters built locally (no downloads): a PEFT LoRA on a tiny BERT, a kohya conv LoRA, mixed dtypes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64,
                 "max_position_embeddings": 32}


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**TINY_BERT)).eval()


TINY_LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides):
    """A LLaMA-architecture causal LM (GQA like LLaMA-3), randomly initialised, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).to(dtype).eval()


def llama_lora_dir(path: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A real PEFT LoRA folder on tiny_llama(): every attention and MLP projection, non-zero B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, "init_lora_weights": False}
    get_peft_model(tiny_llama(), LoraConfig(**{**kwargs, **lora_kwargs})).save_pretrained(str(path))
    return path


def peft_lora_dir(path: Path, dtype: torch.dtype = torch.float32, **lora_kwargs) -> Path:
    """A real PEFT adapter folder (adapter_model.safetensors + adapter_config.json) with non-zero B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"], "init_lora_weights": False}
    kwargs.update(lora_kwargs)
    model = get_peft_model(tiny_bert(), LoraConfig(**kwargs))
    model.to(dtype).save_pretrained(str(path))
    return path


@pytest.fixture
def peft_dir(tmp_path: Path) -> Path:
    return peft_lora_dir(tmp_path / "peft")


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype and role sqz must carry: fp32/fp16/bf16 factors, conv, embedding, DoRA, alpha, int, scalar."""
    g = torch.Generator().manual_seed(2)
    t = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")):
        t[f"base_model.model.{tag}.q.lora_A.weight"] = torch.randn(4, 48, generator=g).to(dtype) * 0.1
        t[f"base_model.model.{tag}.q.lora_B.weight"] = torch.randn(40, 4, generator=g).to(dtype) * 0.01
        t[f"base_model.model.{tag}.q.lora_magnitude_vector"] = torch.rand(40, generator=g).to(dtype) + 0.5
    t["base_model.model.embed.lora_embedding_A"] = torch.randn(4, 30, generator=g)
    t["base_model.model.embed.lora_embedding_B"] = torch.randn(16, 4, generator=g)
    t["lora_unet_conv1.lora_down.weight"] = torch.randn(4, 8, 3, 3, generator=g).half()
    t["lora_unet_conv1.lora_up.weight"] = torch.randn(12, 4, 1, 1, generator=g).half()
    t["lora_unet_conv1.alpha"] = torch.tensor(2.0)
    t["base_model.model.classifier.modules_to_save.default.weight"] = torch.randn(3, 16, generator=g)
    t["base_model.model.classifier.modules_to_save.default.bias"] = torch.randn(3, generator=g).double()
    t["base_model.model.position_ids"] = torch.arange(10, dtype=torch.int64)
    t["base_model.model.flag"] = torch.tensor([True, False, True])
    t["base_model.model.constant.lora_A.weight"] = torch.full((2, 16), 0.25)
    t["base_model.model.constant.lora_B.weight"] = torch.randn(8, 2, generator=g)
    t["base_model.model.empty"] = torch.zeros(0, 4)
    return t


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_tensors(), str(path), metadata={"format": "pt", "note": "mixed"})
    return path


def sine_dir(path: Path, freq: float = 200.0) -> Path:
    """A Sine-LoRA reference-style adapter: peft_type SINLORA with 'freq', saved as a .bin state dict."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, (fan_in, fan_out) in {"q_proj": (32, 32), "v_proj": (32, 16)}.items():
        prefix = f"base_model.model.layers.0.attn.{name}"
        state[f"{prefix}.lora_A.weight"] = (torch.rand(2, fan_in, generator=g) * 2 - 1) / math.sqrt(fan_in)
        state[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, 2, generator=g) * 0.05
    torch.save(state, path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "SINLORA", "r": 2, "lora_alpha": 4, "freq": freq, "s": 1.0, "target_modules": ["q_proj", "v_proj"]}))
    return path


DECODERS = ["native+zstd", "native", "numpy"]


@pytest.fixture(params=DECODERS)
def decoder(request, monkeypatch):
    """Decode with each path a machine may have: the C extension decompressing zstd frames itself, the C
    extension after python-zstandard (no libzstd found), or numpy (no C compiler at install)."""
    from sqz import bitpack, grid

    if request.param != "numpy" and bitpack.native_lookup is None:
        pytest.skip("sqz._lookup was not built (no C compiler at install)")
    if request.param == "native+zstd" and not bitpack.NATIVE_ZSTD:
        pytest.skip("sqz._lookup found no libzstd")
    if request.param != "native+zstd":
        monkeypatch.setattr(bitpack, "NATIVE_ZSTD", False)
    if request.param == "numpy":
        monkeypatch.setattr(bitpack, "native_lookup", None)
        monkeypatch.setattr(grid, "native_grid_codebook", None)
    return request.param


def check_rans_batch(jobs: list[tuple], expected: list, threads: int) -> None:
    """Run rANS lookup jobs in one batch with a plain rANS job added: exactly the jobs whose `expected` values are
    None are reported as failed, and every other writes its expected values."""
    import numpy as np

    from sqz import bitpack, entropy

    plain = np.arange(300, dtype=np.uint8) % 5
    jobs = [*jobs, (entropy.encode_indices(plain, 3, 5, "rans")[4 * 5:], plain.size, 8, np.arange(5, dtype=np.uint8),
                    np.empty(plain.size, np.uint8), bitpack.FRAME_RANS, np.bincount(plain).astype(np.uint64))]
    expected = [*expected, plain]
    problems = bitpack.lookup_many(jobs, threads)
    assert {j for j, _ in problems} == {j for j, e in enumerate(expected) if e is None}, problems
    for job, values in zip(jobs, expected):
        if values is not None:
            assert np.array_equal(job[4], values)
