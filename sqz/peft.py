"""A .sqz file straight into PEFT, with no temporary folder: from_pretrained, load_adapter and hotswap.

Each mirrors the PEFT call of the same name on a decoded folder (`sqz decode a.sqz -o DIR/`), through PEFT's
public functions only: the config comes from the stored adapter_config.json (or the one `sqz decode` would
write), the state dict from the decoder, and `set_peft_model_state_dict` / `hotswap_adapter_from_state_dict`
put it in the model. The result computes bit for bit what PEFT computes on the decoded folder.

PEFT has no sine-activated LoRA, so sine files are refused here: `sqz.merge` and `sqz.attach` apply them.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftConfig, PeftModel, set_peft_model_state_dict
from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict

from . import rank
from .adapter import PEFT_PREFIX
from .api import synthesize_config
from .constants import PAIR_SINE
from .errors import InputError
from .loader import SqzAdapter, load, zero_components

# where PEFT puts the adapter name in a saved key: X.lora_A.weight -> X.lora_A.<name>.weight (hotswap needs it)
_ADAPTER_SLOT = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?=\.weight$|$)")


def _open(source: str | Path | bytes | SqzAdapter, device: str | torch.device) -> SqzAdapter:
    return source if isinstance(source, SqzAdapter) else load(source, device=device)


def peft_config(adapter: SqzAdapter, is_trainable: bool = False, keep_rank: bool = False) -> PeftConfig:
    """The PeftConfig PEFT would read from the folder `sqz decode` writes (`--keep-rank`: with `keep_rank`)."""
    return _as_peft(_stored_config(adapter) if keep_rank else _trimmed(adapter)[1], is_trainable)


def _stored_config(adapter: SqzAdapter) -> dict:
    if any(p.kind == PAIR_SINE for p in adapter.pairs):
        raise InputError("PEFT has no sine-activated LoRA: apply a sine adapter with sqz.merge or sqz.attach")
    foreign = [n for n in adapter if not n.startswith(PEFT_PREFIX)]
    if foreign:
        raise InputError(f"{len(foreign)} tensors are not PEFT-named (e.g. {foreign[0]!r}): PEFT cannot load this "
                         "adapter; apply it with sqz.merge or sqz.attach")
    return dict(adapter.config or synthesize_config(adapter.header))


def _as_peft(stored: dict, is_trainable: bool) -> PeftConfig:
    try:
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[stored["peft_type"]]
        config = config_cls.from_peft_type(**config_cls.check_kwargs(**stored))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the stored adapter_config.json is not a PEFT config this PEFT reads: {exc}") from None
    config.inference_mode = not is_trainable
    return config


def _state_dict(adapter: SqzAdapter) -> dict[str, torch.Tensor]:
    return {name: adapter[name] for name in adapter}


def _trimmed(adapter: SqzAdapter) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and config of the folder `sqz decode` writes: each pair's zero components left out (rank.py)."""
    stored, state = _stored_config(adapter), _state_dict(adapter)

    result = rank.kept(stored, adapter.header["pairs"], lambda pair: zero_components(state[pair["a"]], state[pair["b"]]))
    if result is None:
        return state, stored
    keep, written = result
    for pair in adapter.header["pairs"]:
        if pair["module"] in keep:
            indices = torch.from_numpy(keep[pair["module"]]).to(state[pair["a"]].device)
            state[pair["a"]] = state[pair["a"]].index_select(0, indices)
            state[pair["b"]] = state[pair["b"]].index_select(1, indices)
    return state, written


def _load_weights(peft_model: PeftModel, state: dict[str, torch.Tensor], adapter_name: str,
                  is_trainable: bool) -> None:
    """`state` into `adapter_name`, then trainable or eval mode, as PEFT's load_adapter leaves it."""
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{adapter_name}." in k]
    if missing:  # PEFT warns the same way; a user would not notice otherwise
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}.", stacklevel=3)
    if is_trainable:
        peft_model.set_requires_grad(adapter_name)
    else:
        peft_model.eval()


def from_pretrained(model: torch.nn.Module, source: str | Path | bytes | SqzAdapter, adapter_name: str = "default",
                    is_trainable: bool = False, device: str | torch.device = "cpu") -> PeftModel:
    """`PeftModel.from_pretrained(model, DIR)` for a .sqz file: wraps `model` (modified in place, as PEFT does)."""
    state, config = _trimmed(_open(source, device))
    peft_model = PeftModel(model, _as_peft(config, is_trainable), adapter_name)
    _load_weights(peft_model, state, adapter_name, is_trainable)
    return peft_model


def load_adapter(peft_model: PeftModel, source: str | Path | bytes | SqzAdapter, adapter_name: str,
                 is_trainable: bool = False, device: str | torch.device = "cpu") -> None:
    """`peft_model.load_adapter(DIR, adapter_name)` for a .sqz file: one more adapter, inactive until selected."""
    if adapter_name in peft_model.peft_config:
        raise InputError(f"the model already has an adapter named {adapter_name!r}: use sqz.peft.hotswap to replace it")
    state, config = _trimmed(_open(source, device))
    peft_model.add_adapter(adapter_name, _as_peft(config, is_trainable))
    _load_weights(peft_model, state, adapter_name, is_trainable)


def hotswap(peft_model: PeftModel, source: str | Path | bytes | SqzAdapter, adapter_name: str = "default",
            device: str | torch.device = "cpu") -> None:
    """`peft.utils.hotswap.hotswap_adapter` for a .sqz file: replace an adapter's weights in place, under PEFT's
    rules (same targets; configs that change the output other than through the weights must agree). The adapter
    keeps its stored ranks, which are what PEFT's hotswap was prepared for."""
    if adapter_name not in peft_model.peft_config:
        raise InputError(f"the model has no adapter named {adapter_name!r} to hotswap")
    adapter = _open(source, device)
    config = peft_config(adapter, keep_rank=True)
    try:
        check_hotswap_configs_compatible(peft_model.peft_config[adapter_name], config)
        state = {_ADAPTER_SLOT.sub(rf".\1.{adapter_name}", k): v for k, v in _state_dict(adapter).items()}
        hotswap_adapter_from_state_dict(peft_model, state, adapter_name=adapter_name, config=config)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"cannot hotswap into {adapter_name!r}: {str(exc).splitlines()[0]}") from None
