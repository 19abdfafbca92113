"""sqz.merge / sqz.attach: an adapter into any torch model, LoRA or sine, PEFT, kohya or diffusers named."""
import json
import math

import pytest
import torch
from conftest import llama_lora_dir, tiny_llama
from safetensors.torch import save_file

import sqz

IDS = torch.arange(24).reshape(2, 12) % 64


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def sine_llama(tmp_path, omega: float = 20.0):
    """A Sine-LoRA adapter on tiny_llama (PEFT names, a SINLORA config as the Sine-LoRA reference writes)."""
    folder = llama_lora_dir(tmp_path / "sine")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "SINLORA", "freq": omega}))
    sqz.encode(folder, tmp_path / "sine.sqz", sqz.EncodeOptions(bits=4))
    return tmp_path / "sine.sqz"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merge_matches_peft_and_unmerge_restores_every_byte(tmp_path, dtype):
    from peft import PeftModel

    sqz.encode(llama_lora_dir(tmp_path / "src"), tmp_path / "a.sqz", sqz.EncodeOptions(bits=4))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "dec") + "/")
    expected = logits(PeftModel.from_pretrained(tiny_llama(dtype), str(tmp_path / "dec")).merge_and_unload())

    model = tiny_llama(dtype)
    before, base = weights(model), logits(model)
    handle = sqz.merge(model, tmp_path / "a.sqz")
    assert len(handle.modules) == 14
    merged = logits(model)
    effect = (expected - base).float().abs().max()  # what the adapter changes
    assert (merged - expected).float().abs().max() <= (1e-4 if dtype == torch.float32 else 0.1) * effect
    handle.unmerge()
    after = weights(model)
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    with pytest.raises(sqz.InputError, match="already unmerged"):
        handle.unmerge()


def test_sine_merge_adds_exactly_scaling_sin_over_gamma(tmp_path):
    path = sine_llama(tmp_path)
    adapter = sqz.load(path)
    model = tiny_llama()
    before = weights(model)
    with sqz.merge(model, path, scale=0.5):
        after = weights(model)
        for pair in adapter.pairs:
            key = pair.module.removeprefix("base_model.model.") + ".weight"
            a, b = adapter[pair.a].float(), adapter[pair.b].float()
            assert pair.kind == "sine" and pair.omega == 20.0 and pair.gamma == math.sqrt(a.shape[1])
            direct = 0.5 * (pair.scaling * (torch.sin(pair.omega * (b @ a)) / pair.gamma))
            torch.testing.assert_close(after[key] - before[key], direct, rtol=1e-5, atol=1e-6)
            assert torch.equal(after[key], before[key] + adapter.delta(pair.module) * 0.5)
    restored = weights(model)  # leaving the block unmerged
    assert all(torch.equal(before[k], restored[k]) for k in before)


@pytest.mark.parametrize("sine", [False, True])
def test_attach_computes_what_merge_does_and_detach_leaves_the_model_as_it_was(tmp_path, sine):
    if sine:
        path = sine_llama(tmp_path)
    else:
        path = tmp_path / "a.sqz"
        sqz.encode(llama_lora_dir(tmp_path / "src"), path)
    model = tiny_llama()
    base = logits(model)
    with sqz.merge(model, path):
        merged = logits(model)
    handle = sqz.attach(model, path)
    attached = logits(model)
    torch.testing.assert_close(attached, merged, rtol=1e-4, atol=1e-4 * merged.abs().max().item())
    assert not torch.allclose(attached, base, atol=1e-3)
    handle.detach()
    assert torch.equal(logits(model), base)


class Tiny(torch.nn.Module):
    """A conv, a linear and an embedding under diffusers-like paths, for kohya and diffusers names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down_blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 6)})])
        self.embed = torch.nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).mean((2, 3)) + self.embed(ids)
        return self.down_blocks[0]["proj"](h)


def tiny_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 6, 6, generator=g), torch.tensor([1, 7])


def factors(g, r, fan_in, fan_out, conv=False):
    down = torch.randn(r, *fan_in, generator=g) * 0.3
    return down, torch.randn(fan_out, r, *((1, 1) if conv else ()), generator=g) * 0.3


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_kohya_and_diffusers_names_reach_conv_linear_layers(tmp_path, naming):
    g = torch.Generator().manual_seed(4)
    conv_down, conv_up = factors(g, 2, (3, 3, 3), 8, conv=True)
    lin_down, lin_up = factors(g, 2, (8,), 6)
    if naming == "kohya":
        tensors = {"lora_unet_conv_in.lora_down.weight": conv_down, "lora_unet_conv_in.lora_up.weight": conv_up,
                   "lora_unet_conv_in.alpha": torch.tensor(1.0),
                   "lora_unet_down_blocks_0_proj.lora_down.weight": lin_down,
                   "lora_unet_down_blocks_0_proj.lora_up.weight": lin_up,
                   "lora_unet_down_blocks_0_proj.alpha": torch.tensor(4.0)}
        scales = (0.5, 2.0)
    else:
        tensors = {"unet.conv_in.lora.down.weight": conv_down, "unet.conv_in.lora.up.weight": conv_up,
                   "unet.down_blocks.0.proj.lora.down.weight": lin_down, "unet.down_blocks.0.proj.lora.up.weight": lin_up}
        scales = (1.0, 1.0)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    sqz.encode(tmp_path / "lora.safetensors", tmp_path / "a.sqz", sqz.EncodeOptions(bits=8))
    decoded = sqz.load(tmp_path / "a.sqz")
    names = sorted(n for n in decoded if "alpha" not in n)

    model, x = Tiny(), tiny_inputs()
    conv, lin = model.conv_in.weight.clone(), model.down_blocks[0]["proj"].weight.clone()
    with torch.no_grad():
        base = model(*x)
    with sqz.merge(model, tmp_path / "a.sqz") as handle:
        assert sorted(handle.modules) == ["conv_in", "down_blocks.0.proj"]
        d_conv = (decoded[names[1]].flatten(1) @ decoded[names[0]].flatten(1)).reshape(conv.shape) * scales[0]
        d_lin = decoded[names[3]] @ decoded[names[2]] * scales[1]
        torch.testing.assert_close(model.conv_in.weight - conv, d_conv)
        torch.testing.assert_close(model.down_blocks[0]["proj"].weight - lin, d_lin)
        with torch.no_grad():
            merged = model(*x)
    with sqz.attach(model, tmp_path / "a.sqz"), torch.no_grad():
        torch.testing.assert_close(model(*x), merged)
    with torch.no_grad():
        assert torch.equal(model(*x), base)


def test_embedding_and_transposed_conv1d_layers(tmp_path):
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(6)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 8), "c_attn": Conv1D(6, 8)})  # Conv1D(out, in)
    tensors = {"base_model.model.embed.lora_embedding_A": torch.randn(2, 10, generator=g),
               "base_model.model.embed.lora_embedding_B": torch.randn(8, 2, generator=g),
               "base_model.model.c_attn.lora_A.weight": torch.randn(2, 8, generator=g),
               "base_model.model.c_attn.lora_B.weight": torch.randn(6, 2, generator=g)}
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    sqz.encode(tmp_path / "lora.safetensors", tmp_path / "a.sqz", sqz.EncodeOptions(bits=8),
               sine=sqz.SineOptions(alpha=2))
    ids, h = torch.tensor([[0, 3, 9]]), torch.randn(1, 3, 8, generator=g)

    def run():
        with torch.no_grad():
            return model["embed"](ids), model["c_attn"](h)

    with sqz.merge(model, tmp_path / "a.sqz"):
        merged = run()
    with sqz.attach(model, tmp_path / "a.sqz"):
        attached = run()
    adapter = sqz.load(tmp_path / "a.sqz")
    emb_delta = adapter["base_model.model.embed.lora_embedding_B"] @ adapter["base_model.model.embed.lora_embedding_A"]
    torch.testing.assert_close(merged[0] - run()[0], emb_delta.T[ids])
    for m, a in zip(merged, attached):
        torch.testing.assert_close(m, a)


def test_unmatched_modules_are_an_error_that_names_them(tmp_path):
    path = tmp_path / "a.sqz"
    sqz.encode(llama_lora_dir(tmp_path / "src"), path)
    model = tiny_llama(num_hidden_layers=1)  # the adapter also has layer 1
    before = weights(model)
    with pytest.raises(sqz.UnmatchedModulesError, match=r"7 adapter parts .*module base_model\.model\.model\.layers\.1"):
        sqz.merge(model, path)
    with pytest.raises(sqz.UnmatchedModulesError, match="and 2 more"):
        sqz.attach(model, path)
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())  # nothing half-applied
    with pytest.warns(sqz.SqzWarning, match="left out"):
        handle = sqz.merge(model, path, strict=False)
    assert len(handle.modules) == 7 and all("layers.0." in m for m in handle.modules)

    from transformers import BertConfig, BertModel
    with pytest.raises(sqz.UnmatchedModulesError, match="14 adapter parts"):
        sqz.merge(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, vocab_size=64)), path)


def test_tensors_merge_cannot_apply_and_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "dora.sqz"
    sqz.encode(llama_lora_dir(tmp_path / "dora", use_dora=True), path)
    with pytest.raises(sqz.UnmatchedModulesError, match="lora_magnitude_vector"):
        sqz.merge(tiny_llama(), path)
    sqz.encode(llama_lora_dir(tmp_path / "wide"), tmp_path / "wide.sqz")
    model = tiny_llama(intermediate_size=48)  # same names, other shapes
    before = weights(model)
    with pytest.raises(sqz.InputError, match=r"ΔW is \[32, 64\] but model\.layers\.0\.mlp\.down_proj\.weight is \[32, 48\]"):
        sqz.merge(model, tmp_path / "wide.sqz")
    with pytest.raises(sqz.InputError, match="trained on another model"):
        sqz.attach(model, tmp_path / "wide.sqz")
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
