"""A catalog at scale: `sqz encode-many` over 50 LLaMA-shaped adapters of mixed sizes, local pool against Ray
started on this machine with the same cores, and the cost of a rerun over the finished catalog (resume).

Throughput is adapters and parameters per second of wall time, start-up included (spawning the pool's
processes, starting Ray), measured side by side in one run. Both engines must write identical bytes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import sqz
from bench.synthetic import PROJECTIONS, write_llama_adapter
from sqz import catalog

SCALES = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # 1, 2, 4 or 8 of LLaMA-3-8B's 32 layers
RANKS = (4, 8, 16)


def make_catalog(root: Path, count: int) -> int:
    """`count` PEFT folders of mixed sizes (ranks and layer counts cycle); the parameter total."""
    params = 0
    for i in range(count):
        scale, rank = SCALES[i % len(SCALES)], RANKS[i % len(RANKS)]
        write_llama_adapter(root / f"team{i % 5}" / f"adapter{i:03d}", scale=scale, rank=rank, seed=i)
        params += round(32 * scale) * rank * sum(fan_in + fan_out for fan_in, fan_out, _ in PROJECTIONS.values())
    return params


def run(workdir: Path, quick: bool = False, log=print) -> dict:
    count = 8 if quick else 50
    workers = min(2, os.cpu_count() or 1)
    params = make_catalog(workdir / "src", count)
    options = sqz.EncodeOptions(bpp=2.0)
    log(f"catalog: {count} adapters, {params / 1e6:.1f}M params, --bpp 2, {workers} workers")
    rows = []
    local = catalog.encode_many([workdir / "src"], workdir / "local", options, workers=workers, progress=False)
    rows.append({"engine": "local pool", **local.to_json()})
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = time.perf_counter() - start
        try:
            on_ray = catalog.encode_many([workdir / "src"], workdir / "ray", options, workers=workers, ray="local",
                                         progress=False)
        finally:
            ray.shutdown()
        rows.append({"engine": "Ray (local)", **on_ray.to_json(), "ray_start_s": started,
                     "adapters_per_s_with_start": on_ray.encoded / (on_ray.seconds + started)})
        mismatched = [p.name for p in (workdir / "local").rglob("*.sqz")
                      if p.read_bytes() != (workdir / "ray" / p.relative_to(workdir / "local")).read_bytes()]
        if mismatched:
            raise AssertionError(f"local pool and Ray wrote different bytes for {mismatched}")
    resume = catalog.encode_many([workdir / "src"], workdir / "local", options, workers=workers, progress=False)
    rows.append({"engine": "local pool, rerun over the finished catalog", **resume.to_json()})
    source_bytes = sum(p.stat().st_size for p in (workdir / "src").rglob("*.safetensors"))
    return {"adapters": count, "params": params, "source_bytes": source_bytes, "workers": workers,
            "options": "--bpp 2", "rows": rows, "identical_bytes": ray is not None}
