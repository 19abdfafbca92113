"""A real PEFT model: its outputs survive encode/decode, and the decoded folder loads with PeftModel.from_pretrained."""
import torch
from conftest import peft_lora_dir, tiny_bert

import sqz


def outputs(model) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_8bit_round_trip_keeps_outputs_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    src = peft_lora_dir(tmp_path / "orig")
    base_out = outputs(tiny_bert())
    original = outputs(PeftModel.from_pretrained(tiny_bert(), str(src)).eval())
    assert (original - base_out).abs().max() > 1e-2  # the adapter really changes the model

    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(bits=8))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "restored") + "/")
    restored = outputs(PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "restored")).eval())

    drift = (restored - original).norm() / (original - base_out).norm()
    assert drift < 0.02, float(drift)
    sqz.encode(src, tmp_path / "b.sqz", sqz.EncodeOptions(bits=1))
    sqz.decode(tmp_path / "b.sqz", str(tmp_path / "one_bit") + "/")
    one_bit = outputs(PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "one_bit")).eval())
    assert (one_bit - original).norm() / (original - base_out).norm() > drift  # fewer bits, more drift


def test_config_is_synthesized_when_the_source_had_none(tmp_path):
    from peft import PeftModel

    src = peft_lora_dir(tmp_path / "orig", rank_pattern={"value": 2}, alpha_pattern={"value": 6})
    (src / "adapter_config.json").unlink()  # a bare safetensors file: only --alpha says the scaling
    sqz.encode(src / "adapter_model.safetensors", tmp_path / "a.sqz", sqz.EncodeOptions(bits=8),
               sine=sqz.SineOptions(alpha=8))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "out") + "/")
    model = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "out")).eval()
    adapter = sqz.load(tmp_path / "a.sqz")
    for pair in adapter.pairs:
        module = model.base_model.model.get_submodule(pair.module.removeprefix("base_model.model."))
        rank = adapter[pair.a].shape[0]
        assert module.r["default"] == rank
        assert module.scaling["default"] == 8 / rank == pair.scaling
