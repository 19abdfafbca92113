"""Writing tensors' bytes as a safetensors file, without torch. The decoder gives each tensor as its little-endian
bytes, which safetensors' framework-free serializer (`serialize_file`, 0.8) takes by address: `sqz decode` then
never imports torch, whose import (~2.6 s) was most of the command's run. The serializer is the one
`safetensors.torch.save_file` calls, so the file is the one it writes, except that `__metadata__`'s keys are in
sorted order: safetensors 0.8 writes them in a hash map's order, different at each save (safetensors issue 584),
and a decoded file should hash the same every time. `--dtype` and `--delta`, which make their tensors with torch,
write through here as well."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize

from .errors import OutputError

SPEC_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
"""sqz's element types (the names of a safetensors header) as TensorSpec spells them."""


def save_bytes(tensors: dict[str, tuple[str, list[int], np.ndarray]], path: Path,
               metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name -> (dtype, shape, little-endian bytes)) to `path`. `alive` holds every array the
    serializer reads by address until it returns."""
    alive = {name: np.ascontiguousarray(data) for name, (_, _, data) in tensors.items()}
    specs = {name: TensorSpec(dtype=SPEC_DTYPES[dtype], shape=shape, data_ptr=alive[name].ctypes.data,
                              data_len=alive[name].nbytes)
             for name, (dtype, shape, _) in tensors.items()}
    data = memoryview(serialize(specs, metadata=metadata))
    (size,) = struct.unpack_from("<Q", data)
    header = data[8:8 + size]
    if metadata and len(metadata) > 1:  # the same JSON with __metadata__ sorted, padded to 8 bytes as safetensors pads
        fields = json.loads(bytes(header))
        fields["__metadata__"] = dict(sorted(fields["__metadata__"].items()))
        text = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        header = memoryview(text + b" " * (-len(text) % 8))
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            f.write(data[8 + size:])
    except OSError as exc:  # a full disk
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
