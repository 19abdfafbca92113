"""An adapter into any torch model, plain LoRA or sine: merged into the weights, or attached beside them.

`merge` adds each module's ΔW (delta.delta_weight: scaling·B@A, or scaling·sin(ω·B@A)/γ) into the matching
Linear / Conv / Embedding weight and keeps the original weights, so `unmerge` restores them bit for bit.
`attach` leaves the weights alone and adds ΔW·x to each module's output with a forward hook: through the
low-rank path B(Ax) for plain LoRA, and through the materialised ΔW for sine pairs (the sine does not factor).

Either way every adapter module must find its layer (match.py) and every tensor must be applied: an adapter
module that matches nothing, a DoRA magnitude or a `modules_to_save` tensor is an UnmatchedModulesError that
names them (strict=False makes it a warning), because a silently partial adapter is the worst outcome.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import rank
from .adapter import Pair
from .api import SqzWarning
from .constants import LAYER_CONV, LAYER_EMBEDDING, PAIR_SINE, ROLE_ALPHA
from .errors import InputError
from .loader import SqzAdapter, load, zero_components
from .match import Target, UnmatchedModulesError, resolve

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

Source = str | Path | bytes | SqzAdapter
SHOWN = 5  # unmatched names an error message lists before "and N more"


def _open(source: Source) -> SqzAdapter:
    return source if isinstance(source, SqzAdapter) else load(source)


def _plan(model: torch.nn.Module, adapter: SqzAdapter, strict: bool) -> dict[str, Target]:
    """Every pair's target layer; unmatched pairs and tensors nothing applies raise (or warn if not strict)."""
    targets, unmatched = resolve(model, {p.module: p.layer for p in adapter.pairs})
    paired = {name for p in adapter.pairs for name in (p.a, p.b)}
    unused = [r["name"] for r in adapter.header["tensors"] if r["name"] not in paired and r["role"] != ROLE_ALPHA]
    problems = [f"module {name}" for name in unmatched] + [f"tensor {name}" for name in unused]
    if problems:
        listed = ", ".join(problems[:SHOWN]) + (f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
        message = (f"{len(problems)} adapter parts match no layer of the model or cannot be applied outside PEFT: "
                   f"{listed}")
        if strict:
            raise UnmatchedModulesError(message + " (strict=False applies the rest)")
        warnings.warn(message + "; left out", SqzWarning, stacklevel=3)
    return targets


def _shaped(pair: Pair, delta: torch.Tensor, target: Target) -> torch.Tensor:
    """ΔW in the layout of the target's weight, or an error naming the module when it does not fit."""
    delta = delta.T if target.transposed else delta
    weight = target.module.weight
    if delta.shape != weight.shape:
        raise InputError(f"{pair.module}: ΔW is {list(delta.shape)} but {target.name}.weight is "
                         f"{list(weight.shape)}: the adapter was trained on another model")
    return delta


class Merged:
    """A merged adapter: `unmerge()` (or leaving a `with` block) puts every original weight back, bit for bit."""

    def __init__(self, originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]):
        self._originals, self._modules = originals, list(originals)

    @property
    def modules(self) -> list[str]:
        """The model paths whose weights the adapter was merged into."""
        return list(self._modules)

    def unmerge(self) -> None:
        if self._originals is None:
            raise InputError("this adapter was already unmerged")
        with torch.no_grad():
            for weight, original in self._originals.values():
                weight.copy_(original)
        self._originals = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._originals is not None:
            self.unmerge()


def merge(model: torch.nn.Module, source: Source, scale: float = 1.0, strict: bool = True) -> Merged:
    """Add scale·ΔW of every adapter module into the model's weights (in float32, rounded once to the weight's
    dtype). Nothing is changed unless every pair fits (or strict=False)."""
    adapter = _open(source)
    targets = _plan(model, adapter, strict)
    updates = {}
    for pair in adapter.pairs:
        if pair.module in targets:  # all ΔW first: a shape error leaves the model untouched
            target = targets[pair.module]
            updates[target.name] = (target.module.weight, _shaped(pair, adapter.delta(pair.module), target))
    originals = {}
    with torch.no_grad():
        for name, (weight, delta) in updates.items():
            originals[name] = (weight, weight.detach().clone())
            merged = weight.to(torch.float32 if delta.dtype != torch.float64 else delta.dtype) + scale * delta.to(weight.device)
            weight.copy_(merged.to(weight.dtype))
    return Merged(originals)


class Attached:
    """An attached adapter: `detach()` (or leaving a `with` block) removes it; the weights were never touched."""

    def __init__(self, hooks: dict[str, torch.utils.hooks.RemovableHandle]):
        self._hooks, self._modules = hooks, list(hooks)

    @property
    def modules(self) -> list[str]:
        """The model paths whose outputs the adapter was attached to."""
        return list(self._modules)

    def detach(self) -> None:
        for hook in self._hooks.values():
            hook.remove()
        self._hooks = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _update(pair: Pair, adapter: SqzAdapter, target: Target, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> ΔW·x as the target layer applies its weight, in the weight's dtype and on its device: through the
    factors for plain LoRA on a Linear, Conv1D or Embedding (r·(in + out) multiply-adds a token instead of
    in·out, r counting only the components that do not decode to zero), through the materialised ΔW for sine pairs
    (the sine does not factor) and conv layers."""
    weight, module = target.module.weight, target.module
    like = {"dtype": weight.dtype, "device": weight.device}
    factor = pair.scaling * scale
    if pair.kind != PAIR_SINE and pair.layer != LAYER_CONV:
        a, b = adapter[pair.a], adapter[pair.b]
        out_in = (b.shape[0], a.shape[1]) if pair.layer != LAYER_EMBEDDING else (a.shape[1], b.shape[0])
        _shaped(pair, torch.empty(out_in, device="meta"), target)  # the shapes must fit
        zeros = zero_components(a, b)
        if zeros is not None and zeros.any():  # components that decode to zero cost time and add nothing (rank.py)
            kept = torch.from_numpy(rank.kept_components(zeros)).to(a.device)
            a, b = a.index_select(0, kept), b.index_select(1, kept)
        a, b = a.to(**like), b.to(**like)
        if pair.layer == LAYER_EMBEDDING:  # lora_embedding_A is [r, num_embeddings]: look rows up in A.T
            return lambda ids: F.linear(F.embedding(ids, a.T, module.padding_idx, module.max_norm, module.norm_type,
                                                    module.scale_grad_by_freq, module.sparse), b) * factor
        return lambda x: F.linear(F.linear(x, a), b) * factor
    delta = (scale * _shaped(pair, adapter.delta(pair.module), target)).to(**like)
    if pair.layer == LAYER_CONV:
        return lambda x: module._conv_forward(x, delta, None)  # the layer's own stride, padding mode, dilation
    if pair.layer == LAYER_EMBEDDING:
        return lambda ids: F.embedding(ids, delta, module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, module.sparse)
    return lambda x: F.linear(x, delta.T if target.transposed else delta)


def attach(model: torch.nn.Module, source: Source, scale: float = 1.0, strict: bool = True) -> Attached:
    """Run the model with the adapter without changing its weights: each matched layer's output gains ΔW·x."""
    adapter = _open(source)
    targets = _plan(model, adapter, strict)
    updates = {p.module: _update(p, adapter, targets[p.module], scale) for p in adapter.pairs if p.module in targets}
    hooks = {}
    for module, update in updates.items():  # hooks only once every update is built: an error attaches nothing
        def hook(layer: torch.nn.Module, args: tuple, output: torch.Tensor, update=update) -> torch.Tensor:
            return output + update(args[0])
        hooks[targets[module].name] = targets[module].module.register_forward_hook(hook)
    return Attached(hooks)
