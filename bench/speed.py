"""Speed and memory on the LLaMA-3-8B-shaped rank-16 adapter (28.3M params), measured side by side in one run.

Every time is a ratio to something measured in the same run on the same file: `sqz.load` + touching every
tensor against `safetensors.torch.load_file` of the fp16 original (+ touching), and against decompressing
zstd / ZipNN copies of that file (+ loading + touching). Touching = summing every tensor, which forces
every byte to be read or decoded. The 3-bit file is also timed from a cold page cache (each file evicted
before each read) and as the first load of a fresh process. Peak memory is measured in a fresh process per
reader (peak RSS above the process's RSS after imports). Scaling: encode and load at 0.25x, 1x and 4x.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import load, load_file

import sqz
from bench.synthetic import write_llama_adapter
from sqz import container


def touch(tensors) -> float:
    return sum(float(tensors[name].float().sum()) for name in tensors)


def best_of(repeat: int, *fns) -> list[float]:
    """Minimum wall time of each function over `repeat` rounds, the functions taking turns in every round.

    Taking turns puts the readers being compared under the same machine state; the minimum is the
    run least disturbed by the shared, noisy machine.
    """
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(t) for t in times]


def zipnn_codec():
    from zipnn import ZipNN

    return ZipNN(input_format="byte", bytearray_dtype="float16")


READERS = {  # name -> python statement that reads PATH and touches every tensor (peak-memory probes)
    "safetensors": "from safetensors.torch import load_file as f; t = f(PATH)",
    "sqz": "import sqz; t = sqz.load(PATH)",
    "zstd": "import zstandard; from safetensors.torch import load; "
            "t = load(zstandard.ZstdDecompressor().decompress(open(PATH, 'rb').read()))",
    "zipnn": "from bench.speed import zipnn_codec; from safetensors.torch import load; "
             "t = load(bytes(zipnn_codec().decompress(open(PATH, 'rb').read())))",
}
# Peak RSS growth: reset the kernel's high-water mark (VmHWM) after the imports, whose transient peak would
# otherwise hide the reader's, then read it back after reading and touching.
PROBE = """
import sys
from bench.speed import touch, vm_kib
import torch, numpy, safetensors, zstandard, sqz, sqz.loader, zipnn
PATH = sys.argv[1]
open("/proc/self/clear_refs", "w").write("5")
before = vm_kib("VmRSS")
{reader}
touch(t)
print((vm_kib("VmHWM") - before) * 1024)
"""


def vm_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(reader: str, path: Path) -> int:
    """Peak RSS growth (bytes) of a fresh process that reads `path` and touches every tensor."""
    code = PROBE.format(reader=READERS[reader])
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    return int(result.stdout.strip().splitlines()[-1])


def encode_peak_memory(src: Path, out: Path, options: str) -> int:
    """Peak RSS growth (bytes) of a fresh process's sqz.encode(src, out, EncodeOptions(<options>))."""
    code = ("import sqz, sys; from bench.speed import vm_kib; "
            "open('/proc/self/clear_refs', 'w').write('5'); b = vm_kib('VmRSS'); "
            f"sqz.encode(sys.argv[1], sys.argv[2], sqz.EncodeOptions({options}), force=True, progress=False); "
            "print((vm_kib('VmHWM') - b) * 1024)")
    result = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    return int(result.stdout.split()[-1])


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (written back first), so its next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# One read + touch, timed in a fresh process once its imports are done: what a program that loads an
# adapter once pays, fresh memory included (a warm process reuses the pages freed by its previous loads).
FIRST_LOAD = """
import sys, time
from bench.speed import touch
import torch, numpy, safetensors, zstandard, sqz, sqz.loader
PATH = sys.argv[1]
start = time.perf_counter()
{reader}
touch(t)
print(time.perf_counter() - start)
"""


def first_load_s(reader: str, path: Path) -> float:
    code = FIRST_LOAD.format(reader=READERS[reader])
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent.parent)
    return float(result.stdout.strip().splitlines()[-1])


def load_conditions(weights: Path, packed: Path, repeat: int) -> list[dict]:
    """sqz.load against safetensors' load_file (both + touch) of the same adapter, in three conditions."""
    read_st, read_sqz = lambda: touch(load_file(str(weights))), lambda: touch(sqz.load(packed))
    cold: list[list[float]] = [[], []]
    for _ in range(repeat):  # taking turns, as best_of does; the eviction is not timed
        for path, read, spent in ((weights, read_st, cold[0]), (packed, read_sqz, cold[1])):
            evict(path)
            start = time.perf_counter()
            read()
            spent.append(time.perf_counter() - start)
    first = [[first_load_s("safetensors", weights), first_load_s("sqz", packed)] for _ in range(repeat)]
    timings = {
        "warm page cache, warm process": best_of(repeat, read_st, read_sqz),
        "cold page cache (file evicted before each read)": [min(t) for t in cold],
        "first load in a fresh process, warm page cache": [min(t) for t in zip(*first)],
    }
    return [{"condition": name, "safetensors_load_touch_s": st, "load_touch_s": ours, "load_ratio": ours / st}
            for name, (st, ours) in timings.items()]


def sizes_and_times(src: Path, workdir: Path, params: int, bits: list[int], entropies: list[str],
                    repeat: int, encode_repeat: int) -> list[dict]:
    weights = src / "adapter_model.safetensors"
    rows = []
    for b in bits:
        for stage in entropies:
            out = workdir / f"b{b}-{stage}.sqz"
            options = sqz.EncodeOptions(bits=b, entropy=stage)
            encode_s, = best_of(encode_repeat, lambda out=out, options=options: sqz.encode(src, out, options, force=True,
                                                                                        progress=False))
            safetensors_s, sqz_s = best_of(repeat, lambda: touch(load_file(str(weights))), lambda out=out: touch(sqz.load(out)))
            size = out.stat().st_size
            rows.append({"bits": b, "entropy": stage, "file_bytes": size, "bits_per_param": 8 * size / params,
                         "ratio_to_fp16": weights.stat().st_size / size, "encode_s": encode_s,
                         "load_touch_s": sqz_s, "safetensors_load_touch_s": safetensors_s,
                         "load_ratio": sqz_s / safetensors_s})
    return rows


def lossless_rows(weights: Path, workdir: Path, repeat: int) -> list[dict]:
    """fp16 file, zstd-19 and ZipNN copies of it: size, compress time, decompress+load+touch time."""
    raw = weights.read_bytes()
    zst, zpn = workdir / "fp16.safetensors.zst", workdir / "fp16.safetensors.znn"
    start = time.perf_counter()
    zst.write_bytes(zstandard.ZstdCompressor(level=19, threads=-1).compress(raw))
    zstd_encode = time.perf_counter() - start
    start = time.perf_counter()
    zpn.write_bytes(bytes(zipnn_codec().compress(raw)))
    zipnn_encode = time.perf_counter() - start
    readers = {
        "safetensors": (weights, 0.0, lambda: touch(load_file(str(weights)))),
        "zstd": (zst, zstd_encode, lambda: touch(load(zstandard.ZstdDecompressor().decompress(zst.read_bytes())))),
        "zipnn": (zpn, zipnn_encode, lambda: touch(load(bytes(zipnn_codec().decompress(zpn.read_bytes()))))),
    }
    times = best_of(repeat, *(fn for _, _, fn in readers.values()))
    return [{"format": name, "file_bytes": path.stat().st_size, "encode_s": enc, "load_touch_s": spent}
            for (name, (path, enc, _)), spent in zip(readers.items(), times)]


def scaling_rows(workdir: Path, scales: list[float], bits: int, repeat: int, encode_repeat: int) -> list[dict]:
    rows = []
    for scale in scales:
        src = write_llama_adapter(workdir / f"adapter-{scale}", scale=scale)
        weights = src / "adapter_model.safetensors"
        params = sum(t.numel() for t in load_file(str(weights)).values())
        out = workdir / f"scale-{scale}.sqz"
        encode_s, = best_of(encode_repeat, lambda src=src, out=out: sqz.encode(src, out, sqz.EncodeOptions(bits=bits),
                                                                              force=True, progress=False))
        safetensors_s, sqz_s = best_of(repeat, lambda weights=weights: touch(load_file(str(weights))),
                                       lambda out=out: touch(sqz.load(out)))
        rows.append({"scale": scale, "params": params, "bits": bits, "file_bytes": out.stat().st_size,
                     "encode_s": encode_s, "load_touch_s": sqz_s, "safetensors_load_touch_s": safetensors_s,
                     "load_ratio": sqz_s / safetensors_s})
    return rows


ENCODE_REPEAT = 3
"""Encodes are timed as the best of this many (one in --quick): a single run swung 30-70% on the shared machine, and
a process's first encode is its slowest."""


def encode_modes(src: Path, workdir: Path, params: int, repeat: int) -> list[dict]:
    """Encode time of the modes the issue sets targets for: -b 8 (the widest codebooks), and --bpp (search
    included) at 2 and at 8 bits/param, its slowest (a ladder of up to 11 bits a value, codebooks of up to 4,096
    entries), best of `repeat` runs each, on every core, from the same source."""
    rows, out = [], workdir / "mode.sqz"
    for label, options in (("-b 8", sqz.EncodeOptions(bits=8)), ("--bpp 2", sqz.EncodeOptions(bpp=2.0)),
                           ("--bpp 8", sqz.EncodeOptions(bpp=8.0))):
        encode_s, = best_of(repeat, lambda options=options: sqz.encode(src, out, options, force=True, progress=False))
        rows.append({"mode": label, "encode_s": encode_s, "file_bytes": out.stat().st_size,
                     "bits_per_param": 8 * out.stat().st_size / params})
    return rows


def open_times(weights: Path, packed: Path, repeat: int) -> dict:
    """Opening a file without reading tensors: sqz.load's header parse (first open in the process: validated;
    again: validated already) against safetensors' safe_open, best of `repeat` x 20."""
    def first() -> None:
        container._VALIDATED.clear()
        sqz.load(packed).close()

    def st_open() -> None:
        with safe_open(str(weights), framework="pt"):
            pass

    first_s, again_s, st_s = best_of(20 * repeat, first, lambda: sqz.load(packed).close(), st_open)
    return {"sqz_first_open_s": first_s, "sqz_open_again_s": again_s, "safetensors_open_s": st_s}


def cli_times(src: Path, packed: Path, workdir: Path, repeat: int) -> dict:
    """The command line as a person times it: `sqz encode -b 3`, `sqz info` and `sqz decode` as fresh processes,
    start-up included, beside the interpreter's bare start-up and an import of torch (which all three skip), and
    `sqz decode --dtype fp16` (a cast: through torch)."""
    def process(*args: str):
        return lambda: subprocess.run([sys.executable, *args], check=True, capture_output=True,
                                      cwd=Path(__file__).parent.parent)

    encode_s, info_s, decode_s, cast_s, python_s, torch_s = best_of(
        repeat, process("-m", "sqz.cli", "encode", str(src), "-b", "3", "-o", str(workdir / "cli.sqz"), "-f"),
        process("-m", "sqz.cli", "info", str(packed)),
        process("-m", "sqz.cli", "decode", str(packed), "-o", str(workdir / "cli.safetensors"), "-f"),
        process("-m", "sqz.cli", "decode", str(packed), "-o", str(workdir / "cli.safetensors"), "-f", "--dtype", "fp16"),
        process("-c", "pass"), process("-c", "import torch"))
    return {"sqz_encode_3bit_s": encode_s, "sqz_info_s": info_s, "sqz_decode_s": decode_s,
            "sqz_decode_cast_s": cast_s, "python_s": python_s, "import_torch_s": torch_s}


def run(workdir: Path, quick: bool = False, log=print) -> dict:
    scale = 1 / 32 if quick else 1.0
    src = write_llama_adapter(workdir / "adapter", scale=scale)
    weights = src / "adapter_model.safetensors"
    params = sum(t.numel() for t in load_file(str(weights)).values())
    repeat = 1 if quick else 5
    encode_repeat = 1 if quick else ENCODE_REPEAT
    log(f"speed: {params:,} params")
    # loads best of 3 even when quick (milliseconds each): the quick bench compares them across stages, and one
    # preempted single shot (0.14 s against 3 ms) once turned it red
    rows = sizes_and_times(src, workdir, params, [3] if quick else [2, 3, 5],
                           ["auto", "zstd-aligned", "zstd", "rans-compact"], max(repeat, 3), encode_repeat)
    lossless = lossless_rows(weights, workdir, repeat)
    log("speed: load conditions")
    conditions = load_conditions(weights, workdir / "b3-auto.sqz", repeat)
    memory = {"safetensors": peak_memory("safetensors", weights), "sqz": peak_memory("sqz", workdir / "b3-auto.sqz"),
              "zstd": peak_memory("zstd", workdir / "fp16.safetensors.zst"),
              "zipnn": peak_memory("zipnn", workdir / "fp16.safetensors.znn")}
    encode_memory = {f"sqz_encode_{label}": encode_peak_memory(src, workdir / "m.sqz", options)
                     for label, options in (("3bit", "bits=3"), ("bpp2", "bpp=2.0"))}
    modes = encode_modes(src, workdir, params, encode_repeat)
    opening = open_times(weights, workdir / "b3-auto.sqz", repeat)
    cli = cli_times(src, workdir / "b3-auto.sqz", workdir, repeat)
    log("speed: scaling")
    scaling = scaling_rows(workdir, [1 / 128, 1 / 32] if quick else [0.25, 1.0, 4.0], 3, repeat, encode_repeat)
    return {"adapter": {"params": params, "fp16_bytes": weights.stat().st_size, "scale": scale}, "repeat": repeat,
            "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                        "torch": torch.__version__, "sqz": sqz.__version__, "platform": platform.platform()},
            "encode_repeat": encode_repeat, "rows": rows, "lossless": lossless, "conditions": conditions,
            "peak_memory_bytes": {**memory, **encode_memory}, "scaling": scaling,
            "encode_modes": modes, "open": opening, "cli": cli}
