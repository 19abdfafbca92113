"""A kohya-named adapter decoded by sqz loads through diffusers' own LoRA loader, and agrees with sqz.merge."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import sqz

diffusers = pytest.importorskip("diffusers")


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()


def test_kohya_unet_adapter_through_diffusers_load_lora_adapter(tmp_path):
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = (torch.randn(4, module.in_features, generator=g) * 0.2).half()
            state[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, 4, generator=g) * 0.2).half()
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "kohya.safetensors"))
    sqz.encode(tmp_path / "kohya.safetensors", tmp_path / "k.sqz", sqz.EncodeOptions(bits=4))

    converted, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(sqz.load_file(tmp_path / "k.sqz"))
    loaded = copy.deepcopy(unet)
    loaded.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="k")
    x, t, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        base, through_diffusers = unet(x, t, context).sample, loaded(x, t, context).sample
        with sqz.merge(unet, tmp_path / "k.sqz") as handle:
            merged = unet(x, t, context).sample
    assert len(handle.modules) == len(state) // 3
    effect = (through_diffusers - base).abs().max()
    assert effect > 0.05 and (merged - through_diffusers).abs().max() < 1e-4 * effect
