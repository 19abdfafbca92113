"""Size and speed on the LLaMA-3-8B-shaped rank-16 adapter (28.3M params), measured side by side in one run.

    python -m bench.speed [--bits 2 3 5] [--scale 1.0] [--repeat 3] [--out bench/results/speed.json]

Reports, per bit width and entropy stage: file size, bits/param, encode wall time; and `sqz.load` plus
touching every tensor against `safetensors.torch.load_file` of the fp16 original (+ touching), as ratios.
Touching = summing every tensor, which forces every byte to be read or decoded.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sqz
from bench.synthetic import write_llama_adapter


def touch(tensors) -> float:
    return sum(float(tensors[name].float().sum()) for name in tensors)


def best_of(repeat: int, fn) -> float:
    """Minimum wall time of `repeat` runs: the least disturbed by the shared, noisy machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(bits: list[int], scale: float, repeat: int, entropies: list[str], workdir: Path) -> dict:
    src = write_llama_adapter(workdir / "adapter", scale=scale)
    weights = src / "adapter_model.safetensors"
    params = sum(t.numel() for t in load_file(str(weights)).values())
    rows = []
    for b in bits:
        for stage in entropies:
            out = workdir / f"b{b}-{stage}.sqz"
            options = sqz.EncodeOptions(bits=b, entropy=stage)
            encode_s = best_of(1, lambda: sqz.encode(src, out, options, force=True, progress=False))
            # interleave the two loads so that both see the same machine state
            safetensors_s = best_of(repeat, lambda: touch(load_file(str(weights))))
            sqz_s = best_of(repeat, lambda: touch(sqz.load(out)))
            size = out.stat().st_size
            rows.append({"bits": b, "entropy": stage, "file_bytes": size, "bits_per_param": 8 * size / params,
                         "ratio_to_fp16": weights.stat().st_size / size, "encode_s": encode_s,
                         "load_touch_s": sqz_s, "safetensors_load_touch_s": safetensors_s,
                         "load_ratio": sqz_s / safetensors_s})
    return {"adapter": {"params": params, "fp16_bytes": weights.stat().st_size, "scale": scale},
            "machine": {"cpus": torch.get_num_threads(), "python": platform.python_version(),
                        "torch": torch.__version__, "sqz": sqz.__version__},
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"adapter: {result['adapter']['params']:,} params, fp16 {result['adapter']['fp16_bytes']:,} bytes",
             "| bits | entropy | file MB | bits/param | x smaller than fp16 | encode s | load+touch s | "
             "safetensors load+touch s | load ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['bits']} | {r['entropy']} | {r['file_bytes'] / 1e6:.2f} | {r['bits_per_param']:.3f} | "
                     f"{r['ratio_to_fp16']:.2f} | {r['encode_s']:.2f} | {r['load_touch_s']:.3f} | "
                     f"{r['safetensors_load_touch_s']:.3f} | {r['load_ratio']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--entropy", nargs="+", default=["auto", "zstd"])
    parser.add_argument("--scale", type=float, default=1.0, help="adapter size relative to LLaMA-3-8B x 32 layers")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.bits, args.scale, args.repeat, args.entropy, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
