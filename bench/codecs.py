"""Rate (bits/param, every byte of the file) against distortion of ΔW for sqz and the alternatives."""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import sqz
from bench import baselines, rd
from bench.metrics import components_kept, delta_distortion
from sqz.quantize import PAPER_SAMPLE

Tensors = dict[str, np.ndarray]
TaskMetrics = Callable[[Tensors], dict[str, float]]
"""A reconstruction's metrics on a real task (perplexity, KL, accuracy), merged into its row."""
ENTROPY_STAGES = ("none", "zstd", "zstd-aligned", "rans-compact", "auto")


TARGET_BPP = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
"""The rate-distortion encoder's curve: bits/param targets from 0.25 to 8 (the low end so that its curve overlaps the sparse baselines' and every BD-rate is defined)."""


def read_adapter(directory: Path) -> Tensors:
    return {k: v.astype(np.float32) for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


def sqz_codec(src: Path, options: sqz.EncodeOptions, workdir: Path) -> Callable[[Tensors], tuple[bytes, Tensors]]:
    """sqz through its public API: a real .sqz file, read back with sqz.load."""

    def codec(_: Tensors) -> tuple[bytes, Tensors]:
        out = workdir / "sqz.sqz"
        sqz.encode(src, out, options, force=True, progress=False)
        with sqz.load(out) as adapter:
            recon = {name: adapter[name].float().numpy() for name in adapter}
        data = out.read_bytes()
        out.unlink()
        return data, recon

    return codec


def plan(src: Path, workdir: Path, sqz_bits: dict[str, list[int]], paper_bits: list[int],
         quant_bits: list[int], int_bits: list[int], target_bpp: list[float], compeft: list[float],
         loraquant: list[tuple[float, int, int]]) -> list[tuple[dict, Callable]]:
    """(labels, codec) for every point to measure. `sqz_bits` maps an entropy stage to its bit widths."""
    points = [({"codec": "sqz --bpp", "family": "sqz", "target_bpp": bpp},
               sqz_codec(src, sqz.EncodeOptions(bpp=bpp), workdir)) for bpp in target_bpp]
    points += [({"codec": f"sqz-{stage}", "family": "sqz", "bits": b, "entropy": stage},
               sqz_codec(src, sqz.EncodeOptions(bits=b, entropy=stage), workdir))
               for stage, widths in sqz_bits.items() for b in widths]
    points += [({"codec": "paper (k-means+zip)", "family": "paper", "bits": b}, baselines.paper_pipeline(b))
               for b in paper_bits]
    # the paper's quantizer with sqz's entropy stage: what the container alone gains at the same ΔW error
    points += [({"codec": "sqz-auto --sample 10000", "family": "sqz", "bits": b, "entropy": "auto"},
                sqz_codec(src, sqz.EncodeOptions(bits=b, sample=PAPER_SAMPLE), workdir)) for b in paper_bits]
    points += [({"codec": "uniform min-max", "family": "uniform", "bits": b}, baselines.uniform_minmax(b))
               for b in quant_bits]
    points += [({"codec": "absmax int (block 64)", "family": "absmax", "bits": b}, baselines.block_absmax_int(b))
               for b in int_bits]
    points += [({"codec": "ComPEFT-style", "family": "compeft", "density": d}, baselines.compeft(d)) for d in compeft]
    points += [({"codec": "LoRAQuant-style", "family": "loraquant", "top_fraction": top, "high_bits": hi,
                 "low_bits": lo}, baselines.loraquant(top, hi, lo)) for top, hi, lo in loraquant]
    points += [({"codec": "NF4 (block 64)", "family": "nf4", "bits": 4}, baselines.nf4),
               ({"codec": "fp16 safetensors", "family": "lossless"}, baselines.fp16_safetensors),
               ({"codec": "fp16 + zstd-19", "family": "lossless"}, baselines.zstd_fp16(19)),
               ({"codec": "fp16 + ZipNN", "family": "lossless"}, baselines.zipnn_fp16)]
    return points


def matched_points(src: Path, rows: list[dict], workdir: Path) -> list[tuple[dict, Callable]]:
    """`sqz --size` at the bytes of each file on the other codecs' upper envelope (by every metric the rows have),
    within the rates the `--bpp` curve spans.

    The rate-distortion encoder must be on or above every other codec at every rate; the curve is measured at
    its targets only and interpolated between them, which can put a codec's point above the chord where the
    encoder would not lose at that rate, or hide a point where it would. A file of the same size settles it.
    Files off the envelope need none: a file no larger does at least as well (a third of the files, and of the
    time this costs)."""
    curve = [r["bits_per_param"] for r in rows if r["codec"] == "sqz --bpp"]
    if not curve:
        return []
    others = [r for r in rows if r["codec"] != "sqz --bpp" and r["family"] != "lossless"
              and min(curve) <= r["bits_per_param"] <= max(curve)]
    sizes = sorted({r["file_bytes"] for quality in qualities(rows) for r in rd.envelope(others, quality)})
    return [({"codec": rd.MATCHED, "family": "sqz", "target_bytes": size},
             sqz_codec(src, sqz.EncodeOptions(size=size), workdir)) for size in sizes]


def qualities(rows: list[dict]) -> list[rd.Quality]:
    """Every metric the rows carry, each as a quality (higher is better): ΔW SQNR of each kind, and the task's."""
    keys = set().union(*rows) if rows else set()
    found = [rd.sqnr(key.removeprefix("sqnr_db_")) for key in sorted(keys) if key.startswith("sqnr_db_")]
    found += [quality for key, quality in (("kl", rd.kl_db), ("perplexity", rd.neg_perplexity),
                                           ("accuracy", lambda r: r["accuracy"])) if key in keys]
    return found


def _digest(tensors: Tensors) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name], np.float32).tobytes())
    return h.hexdigest()


def measure(src: Path, points: list[tuple[dict, Callable]], omegas: dict[str, float | None],
            max_rows: int | None = None, progress=None, task: TaskMetrics | None = None,
            measured: dict[str, dict[str, float]] | None = None) -> list[dict]:
    """Run every codec on the adapter in `src`; distortion of ΔW for each named ω (None = plain LoRA), and the
    task's metrics of the reconstruction when `task` is given (once per distinct reconstruction, kept in
    `measured` by digest: entropy stages and lossless files decode to the same tensors)."""
    reference = read_adapter(src)
    params = sum(v.size for v in reference.values())
    rows = []
    measured = {} if measured is None else measured
    for labels, codec in points:
        start = time.perf_counter()
        try:
            data, recon = codec(reference)
        except sqz.InputError:  # a target below what the adapter's header alone costs: no point there
            if progress is not None:
                progress.update(1)
            continue
        row = dict(labels, file_bytes=len(data), bits_per_param=8 * len(data) / params,
                   seconds=time.perf_counter() - start)
        row["components_kept"], row["components"] = components_kept(recon)
        for kind, omega in omegas.items():
            d = delta_distortion(reference, recon, omega, max_rows)
            row[f"rel_fro_{kind}"], row[f"sqnr_db_{kind}"] = d["rel_fro"], d["sqnr_db"]
        if task is not None:
            key = _digest(recon)
            if key not in measured:
                measured[key] = task(recon)
            row.update(measured[key])
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows


def run(src: Path, omegas: dict[str, float | None], quick: bool, max_rows: int | None = None,
        progress_factory=None, task: TaskMetrics | None = None, max_bits: int = 8) -> dict:
    """The whole comparison on one adapter folder, at rates up to `max_bits` bits/param (a task whose metric
    is already at full precision by 4 bits need not pay for evaluations above)."""
    widths = [2, 3] if quick else list(range(1, max_bits + 1))
    low = [b for b in widths if b <= 5]  # forced stages stop at 5 bits: 6-8-bit fits cost minutes on 28.3M
    with tempfile.TemporaryDirectory() as tmp:
        points = plan(src, Path(tmp), {stage: (widths if stage == "auto" else low) for stage in ENTROPY_STAGES},
                      paper_bits=[2, 3] if quick else low, quant_bits=widths,
                      int_bits=[b for b in widths if b >= 2],  # symmetric 1-bit ints have one level: 0
                      target_bpp=[2.0, 3.0] if quick else [t for t in TARGET_BPP if t <= max_bits],
                      compeft=[0.1, 0.3] if quick else [0.05, 0.1, 0.2, 0.3, 0.5],
                      loraquant=[(0.5, 2, 1), (1.0, 3, 2)] if quick else [(0.0, 2, 1), (0.25, 2, 1), (0.5, 2, 1),
                                                                          (1.0, 2, 1), (0.5, 3, 2), (1.0, 3, 2)])
        measured: dict[str, dict[str, float]] = {}

        def rows_of(todo: list[tuple[dict, Callable]]) -> list[dict]:
            bar = progress_factory(len(todo)) if progress_factory else None
            found = measure(src, todo, omegas, max_rows, bar, task, measured)
            if bar is not None:
                bar.close()
            return found

        rows = rows_of(points)
        rows += rows_of(matched_points(src, rows, Path(tmp)))
    params = sum(v.size for v in read_adapter(src).values())
    return {"params": params, "omegas": omegas, "max_rows": max_rows, "rows": rows}
