"""Which module of a torch model each adapter module is: PEFT, kohya and diffusers names against model paths.

A PEFT adapter names `base_model.model.<path>`; kohya flattens the path with underscores under a prefix
(`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`);
diffusers prefixes the component (`unet.<path>`, `text_encoder.<path>`). The model given may be the whole
model or a part of it (an inner LlamaModel, a pipeline's unet), so a name that matches no path exactly may match
one by a dotted suffix, but only when exactly one module does: an ambiguous name is unmatched, never guessed.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from .adapter import PEFT_PREFIX
from .constants import LAYER_CONV, LAYER_EMBEDDING, LAYER_LINEAR
from .errors import InputError

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_")
DIFFUSERS_ROOTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
# which torch layers take which adapter layer kind; transformers' Conv1D (GPT-2) is a Linear stored as [in, out]
LAYER_TYPES: dict[str, tuple[type, ...]] = {
    LAYER_LINEAR: (torch.nn.Linear,),
    LAYER_CONV: (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d),
    LAYER_EMBEDDING: (torch.nn.Embedding,),
}


class UnmatchedModulesError(InputError):
    """Adapter modules (or tensors) that have nowhere to go in the model: applying the rest would be a silent
    partial adapter."""


@dataclass(frozen=True)
class Target:
    """A model module an adapter module applies to, and whether its weight is stored transposed ([in, out])."""

    name: str
    module: torch.nn.Module
    transposed: bool = False


def _candidates(name: str) -> list[str]:
    """The model paths an adapter module name may stand for, most literal first."""
    names = [name, name.removeprefix(PEFT_PREFIX)]
    names += [name.removeprefix(root) for root in DIFFUSERS_ROOTS if name.startswith(root)]
    return list(dict.fromkeys(names))


def _kohya_candidates(name: str) -> list[str]:
    """kohya names with their underscores: the path under the prefix, or under the component it names."""
    names = [name.removeprefix(prefix) for prefix in KOHYA_PREFIXES if name.startswith(prefix)]
    return names + [name.removeprefix("lora_")] if names else []


class ModuleIndex:
    """A model's modules by path, by underscore-flattened path (kohya) and by every dotted suffix."""

    def __init__(self, model: torch.nn.Module):
        self.modules = dict(model.named_modules())
        self.flat: dict[str, list[str]] = defaultdict(list)
        self.suffixes: dict[str, list[str]] = defaultdict(list)
        for path in self.modules:
            if path:
                self.flat[path.replace(".", "_")].append(path)
                parts = path.split(".")
                for i in range(1, len(parts)):
                    self.suffixes[".".join(parts[i:])].append(path)

    def find(self, name: str) -> str | None:
        """The model path of adapter module `name`, or None when none (or more than one) fits."""
        for candidate in _candidates(name):
            if candidate in self.modules:
                return candidate
        for candidate in _kohya_candidates(name):
            if len(self.flat.get(candidate, ())) == 1:
                return self.flat[candidate][0]
        for candidate in _candidates(name):
            if len(self.suffixes.get(candidate, ())) == 1:  # the model wraps what the adapter was trained on
                return self.suffixes[candidate][0]
            parts = candidate.split(".")
            for i in range(1, len(parts)):  # the model is a part of what the adapter was trained on
                if ".".join(parts[i:]) in self.modules:
                    return ".".join(parts[i:])
        return None


def resolve(model: torch.nn.Module, layers: dict[str, str]) -> tuple[dict[str, Target], list[str]]:
    """Targets for adapter modules {name: layer kind}, and the names that match nothing usable.

    A PEFT-wrapped layer (one with a `base_layer`) resolves to the layer it wraps. A module of the wrong kind
    (an adapter's conv factors on a Linear) is unmatched, so it is reported rather than mis-applied.
    """
    index, targets, unmatched = ModuleIndex(model), {}, []
    for name, layer in layers.items():
        path = index.find(name)
        module = index.modules[path] if path is not None else None
        while module is not None and isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            module = module.base_layer
        if module is not None and isinstance(module, LAYER_TYPES[layer]):
            targets[name] = Target(path, module)
        elif module is not None and layer == LAYER_LINEAR and type(module).__name__ == "Conv1D":
            targets[name] = Target(path, module, transposed=True)
        else:
            unmatched.append(name)
    claimed: dict[int, list[str]] = defaultdict(list)
    for name, target in targets.items():
        claimed[id(target.module)].append(name)
    for names in claimed.values():
        if len(names) > 1:  # two adapter modules on one layer: a suffix matched too loosely, not a real fit
            unmatched += names
            for name in names:
                del targets[name]
    return targets, unmatched
