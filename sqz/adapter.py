"""Reading adapters and naming their parts: which tensors are LoRA factors, how they pair, their scaling.

Inputs: a .safetensors file, a PyTorch .bin state dict (the Sine-LoRA fork saves these; read only with
torch.load(weights_only=True), never a full unpickle), or a PEFT directory holding one of those and
adapter_config.json. Naming schemes: PEFT (X.lora_A.weight / X.lora_B.weight, X.lora_embedding_A/B,
optionally with an adapter name), kohya (X.lora_down.weight / X.lora_up.weight + X.alpha) and old
diffusers (X.lora.down.weight / X.lora.up.weight).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, deserialize, safe_open

from .constants import (
    DTYPE_ITEMSIZE,
    LAYER_CONV,
    LAYER_EMBEDDING,
    LAYER_LINEAR,
    MAX_PAIR_MAGNITUDE,
    MIN_GAMMA_MAGNITUDE,
    PAIR_LORA,
    PAIR_SINE,
    ROLE_A,
    ROLE_ALPHA,
    ROLE_B,
    ROLE_MAGNITUDE,
    ROLE_OTHER,
)
from .dtypes import to_float64
from .errors import InputError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module's path in the model in the names it saves."""
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<peft>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)(?:\.(?P<emb_adapter>[^.]+))?"
    r"|(?P<kohya>lora_down|lora_up)\.weight"
    r"|lora\.(?P<diffusers>down|up)\.weight)$"
)
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_MAGNITUDE = re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")
_IS_A = {"lora_A", "lora_embedding_A", "lora_down", "down"}


@dataclass(frozen=True)
class SourceTensor:
    """One input tensor in the form every later stage uses: dtype name, shape, little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    raw: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Pair:
    """A LoRA factor pair and the numbers that turn it into ΔW (stored, never recomputed on load)."""

    module: str
    a: str
    b: str
    kind: str  # lora | sine
    layer: str  # linear | embedding | conv
    scaling: float
    omega: float | None = None
    gamma: float | None = None

    def to_json(self) -> dict:
        return {"module": self.module, "a": self.a, "b": self.b, "kind": self.kind, "layer": self.layer,
                "scaling": self.scaling, "omega": self.omega, "gamma": self.gamma}


@dataclass
class Adapter:
    tensors: dict[str, SourceTensor]
    roles: dict[str, str]
    pairs: list[Pair]
    config: dict | None = None
    metadata: dict[str, str] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SineOptions:
    """--omega / --gamma from the command line; they override what the config says."""

    omega: float | None = None
    gamma: str | None = None  # a number, "sqrt_in", or "<number>*sqrt_in"
    alpha: float | None = None  # lora_alpha when no config says it


def parse_gamma(text: str) -> Callable[[int], float]:
    """γ as a function of in_features: '2.5', 'sqrt_in' or '2*sqrt_in' (the paper's diffusion runs used 2√n)."""
    spec = text.strip().replace(" ", "")
    match = re.fullmatch(r"(?:(?P<k>[0-9.eE+-]+)\*?)?sqrt_in", spec)
    try:
        if match:
            factor = float(match["k"]) if match["k"] else 1.0
            return lambda n: factor * math.sqrt(n)
        value = float(spec)
    except ValueError:
        raise InputError(f"--gamma must be a number, 'sqrt_in' or 'K*sqrt_in', got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--gamma must be positive and finite, got {text!r}")
    return lambda n: value


def _torch_to_source(name: str, t: torch.Tensor) -> SourceTensor:
    import torch  # a state dict is torch's: only this path of reading imports it

    from .torch_dtypes import DTYPE_NAMES

    if t.dtype not in DTYPE_NAMES:
        raise InputError(f"tensor {name!r} has dtype {t.dtype}, which sqz does not store")
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return SourceTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), raw)


def _read_safetensors(path: Path) -> tuple[dict[str, SourceTensor], dict[str, str] | None]:
    """Every tensor's dtype, shape and bytes, by safetensors without a framework: encoding needs no torch (whose
    import is most of a CLI run's start-up), and no framework that lacks BF16 or F8 as numpy does."""
    try:
        with safe_open(str(path), framework="numpy") as f:  # the header alone: its metadata
            metadata = f.metadata()
        stored = dict(deserialize(path.read_bytes()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    tensors = {}
    for name in sorted(stored):  # the order safe_open lists them in, which the file's sections follow
        spec = stored.pop(name)  # each copy freed once it is bytes: at most the file twice in memory
        if spec["dtype"] not in DTYPE_ITEMSIZE:
            raise InputError(f"tensor {name!r} has dtype {spec['dtype']}, which sqz does not store")
        tensors[name] = SourceTensor(name, spec["dtype"], tuple(spec["shape"]), bytes(spec["data"]))
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, SourceTensor]:
    """A PyTorch state dict, loaded with weights_only=True so that a crafted pickle runs no code."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ... all mean "refused"
        raise InputError(f"{path}: refused by the restricted (weights_only) loader: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: not a flat state dict of named tensors")
    return {k: _torch_to_source(k, v) for k, v in state.items()}


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """The weights file and the adapter_config.json beside it, if any."""
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise InputError(f"{path}: directory holds neither {' nor '.join(WEIGHT_NAMES)}")
    elif path.is_file():
        weights = path
    else:
        raise InputError(f"{path}: no such file or directory")
    config = weights.parent / CONFIG_NAME
    return weights, config if config.is_file() else None


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: adapter config must be a JSON object")
    return config


def read_adapter(path: str | Path, sine: SineOptions = SineOptions()) -> Adapter:
    """Read an adapter and name its parts. Raises InputError with a one-line reason."""
    weights, config_path = _resolve(Path(path))
    with open(weights, "rb") as f:
        head = f.read(8)
    if weights.suffix in (".bin", ".pt", ".pth") or head[:2] == b"PK" or head[:1] == b"\x80":
        tensors, metadata = _read_pickle(weights), None
    else:
        tensors, metadata = _read_safetensors(weights)
    config = _read_config(config_path) if config_path else None
    adapter = Adapter(tensors=tensors, roles={}, pairs=[], config=config, metadata=metadata)
    _name_parts(adapter, sine)
    return adapter


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that matches the
    end of the module's name at a dot, as a regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def _name_parts(adapter: Adapter, sine: SineOptions) -> None:
    factors: dict[str, dict[str, str]] = {}
    for name in adapter.tensors:
        match = _FACTOR.match(name)
        if match:
            factor = match["peft"] or match["emb"] or match["kohya"] or match["diffusers"]
            module = match["module"]
            adapter_name = match["adapter"] or match["emb_adapter"]
            if adapter_name:
                module = f"{module}.{adapter_name}"
            side = "a" if factor in _IS_A else "b"
            factors.setdefault(module, {})[side] = name
            factors[module]["emb"] = "1" if match["emb"] else ""
            adapter.roles[name] = ROLE_A if side == "a" else ROLE_B
        elif _ALPHA.match(name) and adapter.tensors[name].numel == 1:
            adapter.roles[name] = ROLE_ALPHA
        elif _MAGNITUDE.search(name):
            adapter.roles[name] = ROLE_MAGNITUDE
        else:
            adapter.roles[name] = ROLE_OTHER

    config = adapter.config or {}
    is_sine_config = str(config.get("peft_type", "")).upper() == "SINLORA"
    if sine.gamma is not None and sine.omega is None and not is_sine_config:
        raise InputError("--gamma applies to sine adapters: give --omega too (or a SINLORA adapter_config.json)")
    omega = sine.omega if sine.omega is not None else (float(config["freq"]) if is_sine_config and "freq" in config else None)
    if is_sine_config and omega is None:
        raise InputError("SINLORA adapter_config.json has no 'freq' field: give --omega")
    gamma_of = parse_gamma(sine.gamma or "sqrt_in")

    for module, parts in sorted(factors.items()):
        if "a" not in parts or "b" not in parts:
            lone = parts.get("a") or parts.get("b")
            adapter.warnings.append(f"{lone}: LoRA factor without its partner; quantized but not paired")
            continue
        a, b = adapter.tensors[parts["a"]], adapter.tensors[parts["b"]]
        adapter.pairs.append(_make_pair(module, a, b, bool(parts["emb"]), adapter, config, omega, gamma_of, sine))
    if not adapter.pairs:
        adapter.warnings.append("no LoRA factor pairs found: every tensor is stored losslessly")


def _make_pair(module: str, a: SourceTensor, b: SourceTensor, embedding: bool, adapter: Adapter, config: dict,
               omega: float | None, gamma_of: Callable[[int], float], sine: SineOptions) -> Pair:
    if len(a.shape) not in (2, 4) or len(b.shape) not in (2, 4):
        raise InputError(f"{module}: LoRA factors must be 2-D or 4-D, got {list(a.shape)} and {list(b.shape)}")
    rank = a.shape[0]
    if math.prod(b.shape[2:]) != 1:
        raise InputError(f"{module}: {b.name} must be [out, r] or [out, r, 1, 1], got {list(b.shape)}")
    if b.shape[1] != rank:
        raise InputError(f"{module}: mismatched ranks, {a.name} has rank {rank} but {b.name} has {b.shape[1]}")
    if rank == 0:
        raise InputError(f"{module}: rank-0 LoRA factors")
    in_features = math.prod(a.shape[1:])
    layer = LAYER_EMBEDDING if embedding else (LAYER_CONV if len(a.shape) == 4 else LAYER_LINEAR)
    scaling = _scaling(module, rank, adapter, config, sine)
    if omega is None:
        pair = Pair(module, a.name, b.name, PAIR_LORA, layer, scaling)
    else:
        pair = Pair(module, a.name, b.name, PAIR_SINE, layer, scaling, float(omega), float(gamma_of(in_features)))
    _check_numbers(pair)
    return pair


def _check_numbers(pair: Pair) -> None:
    """The ranges the format allows a pair's numbers (spec §3.2): far outside any real adapter, and a reader
    refuses them, so the encoder says so now rather than write a file nothing can read."""
    limit = MAX_PAIR_MAGNITUDE
    if not (math.isfinite(pair.scaling) and abs(pair.scaling) <= limit):
        raise InputError(f"{pair.module}: scaling {pair.scaling:g} (lora_alpha/r) is outside ±{limit:g}")
    if pair.kind == PAIR_SINE and not (math.isfinite(pair.omega) and abs(pair.omega) <= limit):
        raise InputError(f"{pair.module}: sine frequency ω = {pair.omega:g} is outside ±{limit:g}")
    if pair.kind == PAIR_SINE and not (math.isfinite(pair.gamma) and MIN_GAMMA_MAGNITUDE <= abs(pair.gamma) <= limit):
        raise InputError(f"{pair.module}: γ = {pair.gamma:g} must have {MIN_GAMMA_MAGNITUDE:g} <= |γ| <= {limit:g}")


def _scaling(module: str, rank: int, adapter: Adapter, config: dict, sine: SineOptions) -> float:
    """lora_alpha / r (or / √r with use_rslora) from the config, kohya's alpha tensor, or --alpha."""
    kohya_alpha = adapter.tensors.get(f"{module}.alpha")
    if config and "lora_alpha" in config:
        peft_module = module.removeprefix(PEFT_PREFIX)
        alpha = pattern_value(config.get("alpha_pattern") or {}, peft_module, config["lora_alpha"])
        if sine.alpha is not None:
            alpha = sine.alpha
        return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    if kohya_alpha is not None and kohya_alpha.numel == 1:
        return float(_scalar(kohya_alpha)) / rank
    if sine.alpha is not None:
        return sine.alpha / rank
    if "scaling 1.0" not in " ".join(adapter.warnings):
        adapter.warnings.append("no adapter_config.json, alpha tensor or --alpha: pairs get scaling 1.0")
    return 1.0


def _scalar(t: SourceTensor) -> float:
    """A one-element tensor's value (a kohya alpha): floats by dtypes, integers and bools by numpy."""
    if t.dtype in _INTEGER_VIEWS:
        return float(np.frombuffer(t.raw, dtype=_INTEGER_VIEWS[t.dtype])[0])
    if t.dtype.startswith("F8"):  # numpy has no float8
        import torch

        from .torch_dtypes import TORCH_DTYPES

        return torch.frombuffer(bytearray(t.raw), dtype=TORCH_DTYPES[t.dtype]).item()
    return float(to_float64(t.raw, t.dtype)[0])


_INTEGER_VIEWS = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                  "U8": "u1", "BOOL": "?"}
