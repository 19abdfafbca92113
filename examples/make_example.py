"""Build the bundled example: a PEFT LoRA (r=8, query/key/value/dense) with all-MiniLM-L6-v2 shapes, fp16.

The factors are PEFT's random init with non-zero B (init_lora_weights=False), so the example exercises
every stage without needing a download or a training run. Re-run to rebuild examples/minilm-lora/.
"""
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

MINILM_L6 = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)


def main() -> None:
    torch.manual_seed(0)
    base = BertModel(BertConfig(**MINILM_L6))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    model = get_peft_model(base, config).half()
    model.save_pretrained(str(Path(__file__).parent / "minilm-lora"))


if __name__ == "__main__":
    main()
