"""Decoded ranks: components that decode to zero leave a PEFT folder (and sqz.peft), which keeps the same model."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import llama_lora_dir, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

import sqz
import sqz.peft
from sqz.rank import kept, zero_components

IDS = torch.arange(40).reshape(2, 20) % 64
DECAY = torch.tensor([1.0, 0.3, 1e-3, 1e-4])  # the components' strengths: a target zeroes the last two


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def decaying_lora(path, **lora_kwargs):
    """A real PEFT LoRA (r=4) whose components fall off as DECAY: weak ones a rate target rounds to zero."""
    src = llama_lora_dir(path, r=4, **lora_kwargs)
    weights = src / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({n: v * DECAY[:v.shape[0], None] if ".lora_A." in n else v for n, v in tensors.items()}, str(weights))
    return src


def test_a_zero_row_of_a_or_column_of_b_is_a_zero_component():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((5, 4, 1, 1))  # a conv pair's B: [out, r, 1, 1]
    a[1] = 0.0
    b[:, 2] = -0.0
    assert zero_components(a, b).tolist() == [False, True, True, False]
    a[3, 5] = 1e-300  # one value is enough to keep a component
    b[:, 3] = 0.0
    b[4, 3] = 5e-324
    assert zero_components(a, b).tolist() == [False, True, True, False]


@pytest.mark.parametrize("lora_kwargs", [{"lora_alpha": 8}, {"lora_alpha": 6, "use_rslora": True},
                                         {"lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}])
def test_a_target_folder_drops_zero_components_and_loads_to_the_same_model(tmp_path, lora_kwargs):
    src = decaying_lora(tmp_path / "src", **lora_kwargs)
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(sqnr=20.0))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "out") + "/")
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "keep") + "/", keep_rank=True)
    trimmed, whole = load_file(str(tmp_path / "out" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "keep" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    stored = json.loads((src / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "keep" / "adapter_config.json").read_text()) == stored
    ranks = {n: t.shape[0] for n, t in trimmed.items() if ".lora_A." in n}
    assert {t.shape[0] for n, t in whole.items() if ".lora_A." in n} <= {2, 4}  # (v_proj's pattern: 2)
    assert sum(ranks.values()) < sum(whole[n].shape[0] for n in ranks)  # components did go
    assert config["rank_pattern"] and {k: v for k, v in config.items() if "pattern" not in k} == {
        k: v for k, v in stored.items() if "pattern" not in k}
    with sqz.load(tmp_path / "a.sqz") as adapter:
        for name, a in trimmed.items():
            if ".lora_A." in name:
                b_name = name.replace(".lora_A.", ".lora_B.")
                np.testing.assert_array_equal(trimmed[b_name] @ a, whole[b_name] @ whole[name])  # zeros left out
                kept_rows = (whole[name] != 0).any(dim=1) & (whole[b_name] != 0).any(dim=0)
                assert a.shape[0] == max(int(kept_rows.sum()), 1)
    model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    for module in model.modules():  # PEFT read each module's rank and scaling as stored
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            name = next(n for n, m in model.named_modules() if m is module).removeprefix("base_model.")
            a_name = f"base_model.{name}.lora_A.weight"
            assert module.r["default"] == ranks[a_name]
            pair = next(p for p in adapter.pairs if p.a == a_name)
            assert module.scaling["default"] == pair.scaling
    expected = logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "keep")))
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)  # the matmul's rounding only
    assert torch.equal(logits(sqz.peft.from_pretrained(tiny_llama(), tmp_path / "a.sqz")), logits(model))
    base = tiny_llama()
    with sqz.attach(base, tmp_path / "a.sqz"):  # B(Ax) at the kept rank: PEFT's own sums on the trimmed folder
        assert torch.equal(logits(base), logits(model))


def test_b_files_keep_their_rank(tmp_path):
    src = decaying_lora(tmp_path / "src")
    sqz.encode(src, tmp_path / "b.sqz", sqz.EncodeOptions(bits=8))
    sqz.decode(tmp_path / "b.sqz", str(tmp_path / "out") + "/")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == json.loads(
        (src / "adapter_config.json").read_text())  # no codebook entry is exactly zero: nothing to leave out
    assert {t.shape[0] for n, t in load_file(str(tmp_path / "out" / "adapter_model.safetensors")).items()
            if ".lora_A." in n} == {4}


def test_an_untrained_adapter_keeps_one_zero_component_a_module(tmp_path):
    src = llama_lora_dir(tmp_path / "src", r=4, init_lora_weights=True)  # PEFT's init: B = 0
    sqz.encode(src, tmp_path / "a.sqz", sqz.EncodeOptions(bits=3))
    sqz.decode(tmp_path / "a.sqz", str(tmp_path / "out") + "/")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {t.shape[0] for n, t in tensors.items() if ".lora_A." in n} == {1}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {1} and set(config["alpha_pattern"].values()) == {2}
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))), logits(tiny_llama()))


MODULES = ["base_model.model.model.layers.0.mlp.up_proj", "base_model.model.model.layers.1.self_attn.q_proj",
           "base_model.model.model.layers.11.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"]


def scale(rank: int, rslora: bool) -> float:
    return math.sqrt(rank) if rslora else rank


@settings(max_examples=300, deadline=None)
@given(r=st.integers(1, 64), alpha=st.one_of(st.integers(1, 128).map(float), st.floats(0.01, 100)),
       rslora=st.booleans(), ranks=st.lists(st.integers(1, 64), min_size=len(MODULES), max_size=len(MODULES)),
       zeros=st.lists(st.integers(0, 64), min_size=len(MODULES), max_size=len(MODULES)))
def test_the_written_config_gives_every_module_its_rank_and_scaling_by_peft_own_rule(r, alpha, rslora, ranks, zeros):
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "rank_pattern": {"up_proj": 3, "q_proj": 7}, "alpha_pattern": {"q_proj": 5.0}}
    pairs = [{"module": m, "scaling": alpha / scale(k, rslora)} for m, k in zip(MODULES, ranks)]
    masks = {m: np.arange(k) < z for m, k, z in zip(MODULES, ranks, zeros)}  # its first z components are zero
    result = kept(config, pairs, lambda pair: masks[pair["module"]])
    if result is None:  # then no module that lost components could have been told its scaling simply
        for pair, k in zip(pairs, ranks):
            mask = masks[pair["module"]]
            left = max(int((~mask).sum()), 1)
            simple = (pair["scaling"] * scale(left, rslora), float(round(pair["scaling"] * scale(left, rslora))))
            assert not (left < k and any(a / scale(left, rslora) == pair["scaling"] for a in simple))
        return
    keep, written = result
    assert {k: v for k, v in written.items() if "pattern" not in k} == {
        k: v for k, v in config.items() if "pattern" not in k}
    for pair, k, z in zip(pairs, ranks, zeros):
        key = pair["module"].removeprefix("base_model.model.")
        rank = written["rank_pattern"].get(get_pattern_key(written["rank_pattern"].keys(), key), r)
        alpha_read = written["alpha_pattern"].get(get_pattern_key(written["alpha_pattern"].keys(), key), alpha)
        assert alpha_read / scale(rank, rslora) == pair["scaling"]  # exactly PEFT's number
        if pair["module"] in keep:
            assert keep[pair["module"]].tolist() == (list(range(z, k)) if z < k else [0]) and rank < k
        else:
            assert rank == k


def test_modules_peft_cannot_tell_apart_keep_their_rank():
    """PEFT matches a pattern at the end of a name: a module named like the end of another's cannot have its own."""
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0}
    pairs = [{"module": "base_model.model.model.layers.0.mlp", "scaling": 2.0},
             {"module": "base_model.model.vision.model.layers.0.mlp", "scaling": 2.0}]
    masks = {pairs[0]["module"]: np.array([False, False, True, True]), pairs[1]["module"]: np.zeros(4, bool)}
    assert kept(config, pairs, lambda pair: masks[pair["module"]]) is None
    masks[pairs[1]["module"]] = masks[pairs[0]["module"]]  # the same rank for both: PEFT reads it right
    assert kept(config, pairs, lambda pair: masks[pair["module"]])[1]["rank_pattern"] == {
        "model.layers.0.mlp": 2, "vision.model.layers.0.mlp": 2}


def test_only_a_peft_lora_config_is_rewritten_and_a_scaling_it_cannot_hold_keeps_the_rank():
    pairs = [{"module": "base_model.model.q", "scaling": 0.1}, {"module": "base_model.model.k", "scaling": 0.1}]
    masks = {"base_model.model.q": np.array([True] * 13 + [False] * 3),  # r=3: no float alpha gives alpha/3 == 0.1
             "base_model.model.k": np.array([True] * 12 + [False] * 4)}
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 1.6}
    keep, written = kept(config, pairs, lambda pair: masks[pair["module"]])
    assert list(keep) == ["base_model.model.k"] and written["rank_pattern"] == {"k": 4}
    assert written["alpha_pattern"] == {"k": 0.4}
    config, pairs = {"peft_type": "LORA", "r": 22, "lora_alpha": 30}, [{"module": "base_model.model.q", "scaling": 30 / 22}]
    keep, written = kept(config, pairs, lambda pair: np.arange(22) < 11)  # 30/22·11 is 14.999999999999998
    assert written["alpha_pattern"] == {"q": 15.0} and written["rank_pattern"] == {"q": 11}
    kohya = [{"module": "lora_unet_conv1", "scaling": 30 / 22}]  # its .alpha tensor holds alpha for r = 22
    assert kept(config, kohya, lambda pair: np.arange(22) < 11) is None
    for other in ({**config, "peft_type": "SINLORA"}, None, {"peft_type": "LORA", "r": 16}):
        assert kept(other, pairs, lambda pair: masks[pair["module"]]) is None
