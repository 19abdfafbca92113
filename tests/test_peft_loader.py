"""sqz.peft: a .sqz file into PEFT without a temporary folder, bit for bit what PEFT does on the decoded folder."""
import json

import pytest
import torch
from conftest import llama_lora_dir, tiny_llama

import sqz
import sqz.peft

IDS = torch.arange(24).reshape(2, 12) % 64


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def encoded(tmp_path, name: str, bits: int = 3, seed: int = 1, **lora_kwargs):
    """An adapter encoded to .sqz, and the folder `sqz decode -o DIR/` writes from it."""
    src = llama_lora_dir(tmp_path / f"{name}-src", seed=seed, **lora_kwargs)
    sqz.encode(src, tmp_path / f"{name}.sqz", sqz.EncodeOptions(bits=bits))
    sqz.decode(tmp_path / f"{name}.sqz", str(tmp_path / name) + "/")
    return tmp_path / f"{name}.sqz", tmp_path / name


def test_from_pretrained_equals_peft_on_the_decoded_folder_bit_for_bit(tmp_path):
    from peft import PeftModel

    path, folder = encoded(tmp_path, "a", rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    expected = logits(PeftModel.from_pretrained(tiny_llama(), str(folder)))
    model = sqz.peft.from_pretrained(tiny_llama(), path)
    assert isinstance(model, PeftModel) and not model.training
    assert torch.equal(logits(model), expected)
    assert not torch.equal(expected, logits(tiny_llama()))  # the adapter does change the model
    assert model.base_model.model.model.layers[0].self_attn.v_proj.r["default"] == 2
    assert not any(p.requires_grad for p in model.parameters())


def test_a_second_adapter_and_a_hotswap_match_peft(tmp_path):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    first, first_dir = encoded(tmp_path, "a")
    second, second_dir = encoded(tmp_path, "b", seed=2)
    third, third_dir = encoded(tmp_path, "c", bits=1, seed=3)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(first_dir))
    model = sqz.peft.from_pretrained(tiny_llama(), first)

    peft_model.load_adapter(str(second_dir), adapter_name="b")
    sqz.peft.load_adapter(model, second, adapter_name="b")
    for adapter in ("b", "default"):
        peft_model.set_adapter(adapter)
        model.set_adapter(adapter)
        assert torch.equal(logits(model), logits(peft_model)), adapter

    before = logits(model)
    hotswap_adapter(peft_model, str(third_dir), adapter_name="default")
    sqz.peft.hotswap(model, third, adapter_name="default")
    assert torch.equal(logits(model), logits(peft_model))
    assert not torch.equal(logits(model), before)


def test_trainable_load(tmp_path):
    path, _ = encoded(tmp_path, "a")
    model = sqz.peft.from_pretrained(tiny_llama(), path, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_refusals_name_the_reason(tmp_path):
    path, folder = encoded(tmp_path, "a")
    model = sqz.peft.from_pretrained(tiny_llama(), path)
    with pytest.raises(sqz.InputError, match="already has an adapter named 'default'"):
        sqz.peft.load_adapter(model, path, adapter_name="default")
    with pytest.raises(sqz.InputError, match="no adapter named 'x'"):
        sqz.peft.hotswap(model, path, adapter_name="x")
    other, _ = encoded(tmp_path, "rs", use_rslora=True)
    with pytest.raises(sqz.InputError, match="cannot hotswap.*use_rslora"):
        sqz.peft.hotswap(model, other, adapter_name="default")  # a config that changes the output: PEFT says no

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SINLORA", "freq": 20.0}))
    sqz.encode(folder, tmp_path / "sine.sqz")
    with pytest.raises(sqz.InputError, match="sqz.merge or sqz.attach"):
        sqz.peft.from_pretrained(tiny_llama(), tmp_path / "sine.sqz")


def test_missing_adapter_weights_warn_as_peft_does(tmp_path):
    src = llama_lora_dir(tmp_path / "src", target_modules=["q_proj", "v_proj"])
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj", "o_proj"]}))
    sqz.encode(src, tmp_path / "a.sqz")
    with pytest.warns(UserWarning, match=r"missing adapter keys.*o_proj\.lora_A\.default"):
        sqz.peft.from_pretrained(tiny_llama(), tmp_path / "a.sqz")
