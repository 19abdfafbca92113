"""Writing tensors' bytes as a safetensors file, without torch. The decoder gives each tensor as its little-endian
bytes, which safetensors' framework-free serializers (`serialize_file` and `serialize`, 0.8) take by address:
`sqz decode` then never imports torch, whose import (~2.6 s) was most of the command's run. They are the ones
`safetensors.torch.save_file` calls, so the file is the one it writes, except that `__metadata__`'s keys are in
sorted order: safetensors 0.8 writes them in a hash map's order, different at each save (safetensors issue 584),
and a decoded file should hash the same every time. `--dtype` and `--delta`, which make their tensors with torch,
write through here as well."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, TensorSpec, serialize, serialize_file

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
    if metadata is None or len(metadata) < 2:  # no order to fix: streamed to the file, no copy of it in memory
        try:
            serialize_file(specs, str(path), metadata=metadata)
        except SafetensorError as exc:  # what it raises for an I/O error (a full disk)
            raise OutputError(f"{path}: cannot write: {exc}") from None
        return
    data = memoryview(serialize(specs, metadata=metadata))
    (size,) = struct.unpack_from("<Q", data)
    fields = json.loads(bytes(data[8:8 + size]))  # the same JSON with __metadata__ sorted, padded as safetensors pads
    fields["__metadata__"] = dict(sorted(fields["__metadata__"].items()))
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    header = text + b" " * (-len(text) % 8)
    with open(path, "wb") as f:  # an OSError (a full disk) is the atomic output's to report
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(data[8 + size:])
