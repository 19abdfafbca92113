"""Build the bundled examples from the bench's trained adapters (real training, not random factors).

examples/minilm-lora     LoRA r=8 on all-MiniLM-L6-v2's attention and MLP linears, Debian-sections task
examples/minilm-sinelora SineLoRA r=8 (peft_type SINLORA, freq = ω), same task

Both are stored in fp16, as adapters usually ship. `python -m bench task` trains and caches them first;
then run `python examples/make_example.py` from the repository root.
"""
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.task import TaskConfig, adapter_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    for kind, name in (("lora", "minilm-lora"), ("sinelora", "minilm-sinelora")):
        src, params = adapter_dir(TaskConfig(), kind, 8)
        if not src.exists():
            sys.exit(f"{src} is missing: run `python -m bench task` first")
        dst = HERE / name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        tensors = {k: v.half().contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((src / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (dst / "train.json").write_text(json.dumps(params, indent=2) + "\n")
        print(f"{dst}: {sum(t.numel() for t in tensors.values()):,} params")


if __name__ == "__main__":
    main()
