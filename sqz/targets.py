"""Meeting a rate-distortion target (--bpp, --size, --sqnr): plan, build the real file, measure it, correct.

The plan (ratecontrol.py) works from estimates: index entropy for the rate, first-order ΔW error for the
distortion. The file is then built for real and measured: its exact size, and the SQNR of ΔW decoded from it.
Where the estimate missed, the budget is corrected by what it missed and the plan searched again; tensors
whose choice did not change are not encoded again. --bpp/--size end within 1% under the target when the
choices are fine enough to land there (else as close under as found); --sqnr ends at or above it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import container, gauge, ratecontrol
from .adapter import Adapter
from .codec import EncodeOptions, decode_tensors, should_quantize
from .constants import CODEBOOK_GRID, CODEBOOK_MIN_VERSION, ENTROPY_RANS_COMPACT, MAX_BITS, QUANTIZABLE_DTYPES
from .dtypes import to_narrowest
from .errors import InputError

SIZE_TOLERANCE = 0.01
SQNR_SLACK = 0.05
"""dB over an --sqnr target at which the search stops relaxing."""
ATTEMPTS = 12
Build = Callable[[dict], tuple[dict[str, Any], list[bytes]]]


def encode(adapter: Adapter, options: EncodeOptions, builder: Callable[[Adapter], Build], workers: int,
           progress: Callable) -> tuple[dict[str, Any], list[bytes], float]:
    """(header, sections, measured ΔW SQNR in dB) of the file that meets the options' target: the pairs whose
    factors are both quantized go into the SVD gauge (gauge.py), and `builder(gauged adapter)` builds files."""
    quantized = lambda name: should_quantize(adapter.tensors[name], adapter.roles[name], options)
    allocated = [p for p in adapter.pairs if quantized(p.a) and quantized(p.b)]
    gauged = gauge.in_svd_gauge(adapter, allocated)
    build = builder(gauged)
    params = sum(t.numel for t in adapter.tensors.values())
    target_bytes = options.size if options.size is not None else (options.bpp or 0.0) * params / 8
    most = options.widest_index
    widest = ratecontrol.max_width(sqnr_db=options.sqnr, most=most) if options.sqnr is not None else (
        ratecontrol.max_width(bpp=8 * target_bytes / max(params, 1), most=most))
    prepared = ratecontrol.prepare(gauged.tensors, allocated, quantized, workers, progress, widest,
                                   relative=options.sqnr is None, entry_bits=32 if options.version[0] == 1 else 16,
                                   scaled=options.version[0] >= 2, compact=ENTROPY_RANS_COMPACT in options.stages,
                                   grid=CODEBOOK_MIN_VERSION[CODEBOOK_GRID] <= options.version,
                                   wide=most > MAX_BITS)
    reference = _values(adapter, prepared.names)  # ΔW is measured against the trained factors, not the gauged

    def file_bytes(header: dict[str, Any], sections: list[bytes]) -> int:
        return sum(len(chunk) for chunk in container.serialize(header, sections, options.version))

    def make(picks: np.ndarray) -> tuple[dict[str, Any], list[bytes], int]:
        header, sections = build(prepared.choices(picks))
        return header, sections, file_bytes(header, sections)

    def measure(header: dict[str, Any], sections: list[bytes]) -> float:
        return ratecontrol.measured_sqnr(allocated, reference, _decoded(header, sections, prepared.names, workers))

    def exact() -> tuple[dict[str, Any], list[bytes]]:
        """Every allocated factor as trained, stored exactly: ΔW is the trained one (in the SVD gauge, a lossless
        factor is still rounded to its dtype: about 70 dB)."""
        return builder(adapter)(prepared.choices(np.full(len(prepared.names), ratecontrol.RAW)))

    if options.sqnr is not None:
        return _for_sqnr(prepared, options.sqnr, make, measure, exact)
    if target_bytes >= sum(len(adapter.tensors[name].raw) for name in prepared.names):  # maybe room for every bit
        header, sections = exact()
        if file_bytes(header, sections) <= target_bytes:
            return header, sections, measure(header, sections)
    header, sections = _for_size(prepared, target_bytes, make)
    return header, sections, measure(header, sections)


def _for_size(prepared: ratecontrol.Prepared, target: float, make: Callable) -> tuple[dict, list[bytes]]:
    """The largest file found of at most `target` bytes, searched until within SIZE_TOLERANCE under it: budgets
    corrected by how far the estimate missed until the target is bracketed, then bisected on real sizes."""
    aim = target * (1 - SIZE_TOLERANCE / 4)
    budget = 8 * aim - 8 * (target - aim)  # estimates leave out the header: start a little low
    under = over = best = None  # (budget, size) on each side of the target; best = (header, sections, size)
    smallest = None
    for _ in range(ATTEMPTS):
        picks = ratecontrol.plan_for_rate(prepared, budget)
        header, sections, size = make(picks)
        smallest = size if smallest is None else min(smallest, size)
        if size <= target:
            under = max(under or (budget, size), (budget, size))
            if best is None or size > best[2]:
                best = (header, sections, size)
            if size >= (1 - SIZE_TOLERANCE) * target:
                break
        else:
            over = min(over or (budget, size), (budget, size))
        if under is not None and over is not None:
            if over[0] - under[0] < 8:
                break
            budget = (under[0] + over[0]) / 2
        else:  # file bits = allocated bits + what the header and the other tensors cost: shift by the miss
            budget += 8 * (aim - size)
    if best is None:
        raise InputError(f"no file of at most {target:,.0f} bytes: the smallest plan found is {smallest:,} bytes")
    return best[0], best[1]


def _for_sqnr(prepared: ratecontrol.Prepared, target: float, make: Callable, measure: Callable,
              exact: Callable) -> tuple[dict, list[bytes], float]:
    """Search the aim until the decoded ΔW's SQNR is at least `target` dB; keep the smallest file that is, or if
    none is, the `exact` one, which meets any target."""
    best, aim = None, target
    for _ in range(ATTEMPTS):
        header, sections, size = make(ratecontrol.plan_for_sqnr(prepared, aim))
        sqnr = measure(header, sections)
        if sqnr >= target and (best is None or size < best[2]):
            best = (header, sections, size, sqnr)
        if target <= sqnr <= target + SQNR_SLACK:
            break
        aim += (target - sqnr) + (0.01 if sqnr < target else 0.0)  # over the target: relax, and try again
    if best is None:
        header, sections = exact()
        return header, sections, measure(header, sections)
    header, sections, _, sqnr = best
    return header, sections, sqnr


def delta_sqnr(adapter: Adapter, header: dict, sections: list[bytes], workers: int) -> float:
    """SQNR (dB) of ΔW over every pair whose factors are floats, decoded from the built file against the input:
    what `-b` files report when asked (targets measure their own); inf when nothing was lost."""
    floats = lambda name: adapter.tensors[name].dtype in QUANTIZABLE_DTYPES
    pairs = [p for p in adapter.pairs if floats(p.a) and floats(p.b)]
    names = [n for p in pairs for n in (p.a, p.b)]
    return ratecontrol.measured_sqnr(pairs, _values(adapter, names), _decoded(header, sections, names, workers))


def _values(adapter: Adapter, names: list[str]) -> dict[str, np.ndarray]:
    """The input's values of `names` in their own shapes, in the narrowest float that holds them (measured_sqnr widens
    one pair at a time: float64 copies of every factor, kept through the search, were 8 bytes a parameter)."""
    return {n: to_narrowest(adapter.tensors[n].raw, adapter.tensors[n].dtype).reshape(adapter.tensors[n].shape)
            for n in names}


def _decoded(header: dict, sections: list[bytes], names: list[str], workers: int) -> dict[str, np.ndarray]:
    """The values a reader will get for `names`, decoded from the built sections (narrowest float, as _values)."""
    index = {record["name"]: i for i, record in enumerate(header["tensors"])}
    items = [(header["tensors"][index[n]], memoryview(sections[index[n]])) for n in names]
    decoded = decode_tensors(items, threads=workers)
    out = {}
    for name, (record, _), data in zip(names, items, decoded):
        if isinstance(data, Exception):
            raise data
        out[name] = to_narrowest(data, record["dtype"]).reshape(record["shape"])
    return out
