"""The LLM bench: a tiny LLaMA pretrained here, real PEFT LoRA adapters on it, and three task metrics.

Base: transformers' LlamaForCausalLM with tiny dimensions and LLaMA-3's grouped-query attention, a byte-level
BPE tokenizer trained here (`tokenizers`), pretrained on Python's docstrings (data/pydoc.txt.gz). Adapters:
PEFT LoRA on q, k, v, o, gate, up and down (`get_peft_model`, `save_pretrained`: real PEFT folders, LLaMA
naming) and SineLoRA (bench/lora.py, ω as in the MiniLM task), fine-tuned on another domain: Debian package
descriptions followed by their archive section, "<description>\\nsection: [games]" (data/debian-sections.tsv.gz,
the MiniLM task's split). One forward pass over held-out records gives:

- perplexity of the domain (every token of every record),
- KL divergence of the next-token distribution from the full-precision adapter's (mean over those tokens),
- section accuracy: argmax over the 14 section tokens where the section comes, a classification task the base
  model cannot do (it never saw a section token), so the adapter is worth everything above chance.

Everything is seeded and cached in bench/.cache/llm under a key of what shapes it, so reruns only evaluate.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from bench import lora
from bench.dataset import DATA, load

CORPUS = Path(__file__).parent / "data" / "pydoc.txt.gz"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KINDS = ("lora", "sinelora")
EOS = "<eos>"
MAX_DESCRIPTION_TOKENS = 48


@dataclass(frozen=True)
class LLMConfig:
    vocab: int = 4096
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2  # grouped-query attention, 4 query heads per key/value head as in LLaMA-3-8B
    context: int = 128
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    sine_ranks: tuple[int, ...] = (4, 16)
    omega: dict[int, float] = field(default_factory=lambda: {1: 400.0, 2: 300.0, 4: 200.0, 8: 200.0, 16: 200.0})
    alpha_per_rank: float = 2.0
    lr: dict[str, float] = field(default_factory=lambda: {"lora": 3e-3, "sinelora": 1e-3})
    epochs: int = 1
    batch_size: int = 32
    section_weight: float = 30.0
    train_count: int = 1 << 30
    eval_count: int = 256
    seed: int = 0

    @classmethod
    def quick(cls) -> LLMConfig:
        return cls(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, pretrain_steps=30, ranks=(2, 8),
                   sine_ranks=(8,), train_count=400, eval_count=96)

    def base_key(self) -> dict:
        keys = ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "context", "pretrain_steps",
                "pretrain_batch", "pretrain_lr", "seed")
        return {**{k: getattr(self, k) for k in keys}, "corpus": _sha(CORPUS), "data": _sha(DATA)}

    def kinds_ranks(self) -> list[tuple[str, int]]:
        return [("lora", r) for r in self.ranks] + [("sinelora", r) for r in self.sine_ranks]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tokenizer(cfg: LLMConfig, sections: list[str]):
    """Byte-level BPE on both corpora, plus <eos> and one token per section ("[games]", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    train, _, _ = load(cfg.seed)
    tok.train_from_iterator(_pretraining_lines() + train.texts, trainer)
    tok.add_special_tokens([f"[{s}]" for s in sections])
    return tok


def _pretraining_lines() -> list[str]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def model_config(cfg: LLMConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.context,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def base_dir(cache: Path, cfg: LLMConfig) -> Path:
    return cache / "llm" / f"base-{_digest(cfg.base_key())}"


def load_base(cache: Path, cfg: LLMConfig, sections: list[str], log=print):
    """(tokenizer, frozen model in eval mode, pretraining facts); pretrained once, then read from the cache."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    directory = base_dir(cache, cfg)
    if not (directory / "pretrain.json").exists():
        _pretrain(directory, cfg, sections, log)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    model.requires_grad_(False)
    return tok, model, json.loads((directory / "pretrain.json").read_text())


def _pretrain(directory: Path, cfg: LLMConfig, sections: list[str], log) -> None:
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok = tokenizer(cfg, sections)
    lines = _pretraining_lines()
    eos = tok.token_to_id(EOS)
    stream = np.array([i for enc in tok.encode_batch(lines) for i in [*enc.ids, eos]], dtype=np.int64)
    held = int(0.95 * len(stream))  # the last 5% measure pretraining perplexity
    chunks = torch.from_numpy(stream[: held // cfg.context * cfg.context].reshape(-1, cfg.context))
    model = LlamaForCausalLM(model_config(cfg, tok.get_vocab_size()))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.pretrain_lr, total_steps=cfg.pretrain_steps,
                                                   pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for step in range(cfg.pretrain_steps):
        batch = chunks[rng.integers(0, len(chunks), cfg.pretrain_batch)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 50 == 0:
            log(f"llm: pretraining step {step}/{cfg.pretrain_steps}, loss {loss.item():.3f}")
    model.eval()
    tail = torch.from_numpy(stream[held:][: (len(stream) - held) // cfg.context * cfg.context].reshape(-1, cfg.context))
    with torch.no_grad():
        held_loss = float(np.mean([model(input_ids=c, labels=c).loss.item() for c in tail.split(16)]))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    model.save_pretrained(directory)
    facts = {"params": sum(p.numel() for p in model.parameters()), "tokens": len(stream),
             "tokens_seen": cfg.pretrain_steps * cfg.pretrain_batch * cfg.context,
             "heldout_perplexity": math.exp(held_loss), "seconds": time.perf_counter() - start, **cfg.base_key()}
    (directory / "pretrain.json").write_text(json.dumps(facts, indent=1))
    log(f"llm: pretrained {facts['params']} params on {facts['tokens_seen']} tokens in {facts['seconds']:.0f} s, "
        f"held-out perplexity {facts['heldout_perplexity']:.1f}")


class Records:
    """Tokenised "<description>\\nsection: [s]<eos>" records, padded per batch, with the section's position."""

    def __init__(self, tok, texts: list[str], labels: np.ndarray, sections: list[str]):
        eos = tok.token_to_id(EOS)
        self.section_ids = torch.tensor([tok.token_to_id(f"[{s}]") for s in sections])
        prompts = tok.encode_batch([t[:400] for t in texts])
        suffix = tok.encode("\nsection:").ids
        self.ids = [[*p.ids[:MAX_DESCRIPTION_TOKENS], *suffix, int(self.section_ids[y]), eos]
                    for p, y in zip(prompts, labels)]
        self.labels = torch.from_numpy(np.asarray(labels))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, position of the section token) for these rows; padding is right, masked out."""
        ids, mask = lora.padded([self.ids[i] for i in rows])
        return ids, mask, torch.tensor([len(self.ids[i]) - 2 for i in rows])

    def batches(self, size: int, rng: np.random.Generator | None = None):
        order = rng.permutation(len(self)) if rng is not None else np.argsort([len(x) for x in self.ids], kind="stable")
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            yield (*self.batch(rows), self.labels[rows])


def _lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor,
             section_weight: float) -> torch.Tensor:
    """Next-token loss over every token of the records, the section token weighted `section_weight` times
    (one token in twenty otherwise: the adapter would learn the domain's words and little of the task)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    weights = mask[:, 1:].float()
    weights[torch.arange(len(ids)), where - 1] = section_weight
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (losses * weights).sum() / weights.sum()


def adapter_dir(cache: Path, cfg: LLMConfig, kind: str, rank: int) -> tuple[Path, dict]:
    params = {"base": cfg.base_key(), "kind": kind, "rank": rank, "alpha": cfg.alpha_per_rank * rank,
              "omega": cfg.omega[rank] if kind == "sinelora" else None, "lr": cfg.lr[kind], "epochs": cfg.epochs,
              "batch_size": cfg.batch_size, "section_weight": cfg.section_weight, "train_count": cfg.train_count,
              "seed": cfg.seed}
    return cache / "llm" / "adapters" / f"{kind}-r{rank}-{_digest(params)}", params


def train_adapter(model: nn.Module, records: Records, directory: Path, params: dict, progress=None) -> None:
    """Fine-tune one adapter on the domain and write it as a PEFT folder (SineLoRA: PEFT naming, its own config)."""
    from peft import LoraConfig, get_peft_model

    steps = params["epochs"] * math.ceil(len(records) / params["batch_size"])
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    rank, alpha, omega = params["rank"], params["alpha"], params["omega"]

    def fit(trainable: list[nn.Parameter], forward: nn.Module) -> None:
        opt = torch.optim.AdamW(trainable, lr=params["lr"], weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params["lr"], total_steps=steps, pct_start=0.1)
        forward.train()
        for _ in range(params["epochs"]):
            for ids, mask, where, _ in records.batches(params["batch_size"], rng):
                loss = _lm_loss(forward, ids, mask, where, params["section_weight"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                if progress is not None:
                    progress.update(1)
        forward.eval()

    directory.mkdir(parents=True, exist_ok=True)
    if omega is None:
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                      target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        try:
            fit([p for p in peft_model.parameters() if p.requires_grad], peft_model)
            peft_model.save_pretrained(directory)
        finally:
            peft_model.unload()
    else:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS)]
        with lora.wrapped(model, names, rank, alpha, omega) as modules:
            fit([p for m in modules.values() for p in (m.lora_A, m.lora_B)], model)
            save_file(lora.factors(modules), str(directory / "adapter_model.safetensors"))
        config = {"peft_type": "SINLORA", "freq": omega, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
                  "bias": "none", "target_modules": list(TARGETS), "task_type": "CAUSAL_LM"}
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    model.requires_grad_(False)
    (directory / "train.json").write_text(json.dumps(params, indent=1))


class Evaluator:
    """Perplexity, KL from a reference adapter, and section accuracy of the base model plus some ΔW."""

    def __init__(self, model: nn.Module, records: Records, batch_size: int = 64):
        self.model = model
        self.batches = list(records.batches(batch_size))
        self.section_ids = records.section_ids
        self.reference: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _logprobs(self, deltas: dict[str, torch.Tensor]):
        with lora.merged(self.model, deltas):
            for ids, mask, where, labels in self.batches:
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                valid = mask[:, 1:].bool()
                rows = torch.arange(len(ids))
                guess = self.section_ids[logits[rows, where - 1][:, self.section_ids].argmax(-1)]
                yield (logits.log_softmax(-1)[valid], ids[:, 1:][valid],
                       int((guess == self.section_ids[labels]).sum()))

    def set_reference(self, deltas: dict[str, torch.Tensor]) -> dict[str, float]:
        self.reference = None
        logprobs = []
        metrics = self._measure(deltas, keep=logprobs)
        self.reference = logprobs
        return metrics

    def __call__(self, deltas: dict[str, torch.Tensor]) -> dict[str, float]:
        return self._measure(deltas)

    def _measure(self, deltas: dict[str, torch.Tensor], keep: list | None = None) -> dict[str, float]:
        nll = kl = 0.0
        tokens = correct = records = 0
        for i, (logp, target, right) in enumerate(self._logprobs(deltas)):
            nll -= float(logp.gather(1, target[:, None]).sum())
            if self.reference is not None:
                ref = self.reference[i]
                kl += float((ref.exp() * (ref - logp)).sum())
            if keep is not None:
                keep.append(logp)
            tokens += len(target)
            correct += right
            records += len(self.batches[i][0])
        out = {"perplexity": math.exp(nll / tokens), "accuracy": correct / records}
        if self.reference is not None:
            # KL >= 0; in float32 two near-identical distributions (an fp16 copy of an fp32 adapter) can sum to
            # about -1e-8, the rounding of the log-softmax, so the mean is clamped at the floor it cannot cross
            out["kl"] = max(kl / tokens, 0.0)
        return out


def run_setup(cache: Path, cfg: LLMConfig, progress_factory=None, log=print) -> dict:
    """Pretrain (cached), fine-tune every adapter (cached); returns the base, records and adapter folders."""
    train_split, test_split, sections = load(cfg.seed)
    train_split = train_split.subset(cfg.train_count, cfg.seed)
    test_split = test_split.subset(cfg.eval_count, cfg.seed)
    tok, model, pretrain = load_base(cache, cfg, sections, log)
    train = Records(tok, train_split.texts, train_split.labels, sections)
    test = Records(tok, test_split.texts, test_split.labels, sections)
    adapters = {}
    for kind, rank in cfg.kinds_ranks():
        directory, params = adapter_dir(cache, cfg, kind, rank)
        if not (directory / "train.json").exists():
            steps = params["epochs"] * math.ceil(len(train) / params["batch_size"])
            bar = progress_factory(steps, f"llm {kind} r={rank}") if progress_factory else None
            start = time.perf_counter()
            train_adapter(model, train, directory, params, bar)
            if bar is not None:
                bar.close()
            log(f"llm: trained {kind} r={rank} in {time.perf_counter() - start:.0f} s")
        adapters[f"{kind}-r{rank}"] = (directory, params)
    return {"model": model, "test": test, "pretrain": pretrain, "adapters": adapters, "sections": sections,
            "config": {**asdict(cfg), "omega": {str(k): v for k, v in cfg.omega.items()}}}
