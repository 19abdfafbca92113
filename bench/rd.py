"""Rate-distortion curves of the bench's rows: Pareto fronts, Bjøntegaard deltas and values at a given rate.

A row is one codec setting on one adapter (`codec`, `bits_per_param` and its metrics). A quality is a function
of a row that rises as the reconstruction gets better: ΔW SQNR in dB, −10·log10(KL), −perplexity, accuracy.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

Quality = Callable[[dict], float]
MATCHED = "sqz --size (matched)"
"""The codec label of `sqz --size` files made at the size of another codec's file (bench/codecs.matched_points)."""


def sqnr(kind: str) -> Quality:
    return lambda row: row[f"sqnr_db_{kind}"]


def kl_db(row: dict) -> float:
    """−10·log10(KL): dB, like SQNR (KL is zero for a lossless file, +∞ here, so never on a curve)."""
    return -10 * math.log10(row["kl"]) if row["kl"] > 0 else math.inf


def neg_perplexity(row: dict) -> float:
    return -row["perplexity"]


def curve(rows: list[dict], codec: str, quality: Quality) -> list[tuple[float, float]]:
    """(bits/param, quality) of one codec's Pareto front, by rate: a point that a smaller file of the same codec
    matches or beats is left out (codecs with several knobs, such as LoRAQuant's split and widths, are credited
    with their best setting at each rate), and so are lossless points (infinite quality)."""
    front: list[tuple[float, float]] = []
    for rate, value in sorted((r["bits_per_param"], quality(r)) for r in rows if r["codec"] == codec):
        if math.isfinite(value) and (not front or value > front[-1][1]):
            front.append((rate, value))
    return front


def bd_metrics(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> dict[str, float | str]:
    """BD-rate (% size change at equal quality) and BD-quality (its units at equal size) of two (rate, quality)
    curves; apply them to Pareto fronts (`curve`), on which quality rises with rate. Interpolation is PCHIP
    (`bjontegaard`'s monotone piecewise cubic), not Akima: on fronts of many points that saturate near full
    precision, Akima's spline overshoots between points (LLaMA LoRA r=16, perplexity, `--bpp` against
    LoRAQuant-style: Akima +894%, PCHIP -34%, piecewise linear -35%, with the `--bpp` front on or above the other);
    over all the LLM step's BD-rates PCHIP stays within 0.7% of piecewise linear (median)."""
    import bjontegaard as bd

    bound = _rate_bound(anchor, test)
    ra, da = zip(*anchor)
    rt, dt = zip(*test)
    out: dict[str, float | str] = {}
    for key, fn in (("bd_rate_pct", bd.bd_rate), ("bd_quality", bd.bd_psnr)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = float(fn(list(ra), list(da), list(rt), list(dt), method="pchip", min_overlap=0.0,
                                 require_matching_points=False))
            out[key] = value if math.isfinite(value) else "undefined"
        except Exception as exc:  # noqa: BLE001 - the library rejects curves that do not overlap
            out[key] = f"undefined ({exc})"
    if bound is not None:
        out["bd_rate_pct"] = bound
    return out


def _rate_bound(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> str | None:
    """Where one front is better than the other at every point, the two share no quality and the BD-rate (an
    average over the shared range) does not exist; the size change at the nearer ends of the two ranges bounds
    it instead. Better: the test reaches the anchor's best quality with at most its own smallest file. Worse:
    its largest file falls short of the anchor's worst quality, which the anchor reaches with its smallest."""
    if test[0][1] >= anchor[-1][1]:
        return f"≤ {100 * (test[0][0] / anchor[-1][0] - 1):+.1f}%"
    if test[-1][1] <= anchor[0][1]:
        return f"≥ {100 * (test[-1][0] / anchor[0][0] - 1):+.1f}%"
    return None


def bd_rate(rows: list[dict], anchor: str, test: str, quality: Quality) -> float | str:
    """BD-rate (%) of `test` against `anchor` (PCHIP): negative = fewer bytes at equal quality."""
    a, t = curve(rows, anchor, quality), curve(rows, test, quality)
    return bd_metrics(a, t)["bd_rate_pct"] if len(a) >= 2 and len(t) >= 2 else "n/a"


def fmt_bd(value: float | str) -> str:
    """A BD-rate as a signed percentage, or the first words of why there is none."""
    return f"{value:+.1f}%" if isinstance(value, float) else str(value).split(" (")[0]


def value_at(rows: list[dict], codec: str, rate: float, key: str) -> float | None:
    """`key` of a codec at `rate` bits/param, linear in log(rate) between its two nearest settings on either
    side (its points sorted by rate); None outside the rates it reached."""
    points = sorted((r["bits_per_param"], r[key]) for r in rows if r["codec"] == codec and key in r)
    if not points or not points[0][0] <= rate <= points[-1][0]:
        return None
    rates, values = zip(*points)
    return float(np.interp(math.log(rate), np.log(rates), values))


def envelope(rows: list[dict], quality: Quality) -> list[dict]:
    """The rows on the upper envelope by size: each better than every row of no larger file, i.e. the best quality
    any of them offers at each rate (a row off it is matched or beaten by a file no larger)."""
    front: list[dict] = []
    for row in sorted(rows, key=lambda r: (r["file_bytes"], -quality(r))):
        if math.isfinite(quality(row)) and (not front or quality(row) > quality(front[-1])):
            front.append(row)
    return front


def head_to_head(rows: list[dict], quality: Quality, test: str = MATCHED, skip: tuple[str, ...] = ("sqz --bpp",)) -> dict:
    """Every other codec's point (not `skip`'s) against the `test` file made at its size (`test` rows carry the
    `target_bytes` they were made for): how many were compared, those where `test` is worse, and the closest one.
    A margin is in the quality's units (dB for SQNR and KL), negative where `test` is worse."""
    made = {r["target_bytes"]: r for r in rows if r["codec"] == test}
    compared = [(quality(made[r["file_bytes"]]) - quality(r), r) for r in rows
                if r["codec"] != test and r["codec"] not in skip and r["file_bytes"] in made]
    compared = [(margin, r) for margin, r in compared if math.isfinite(margin)]
    point = lambda margin, r: {"codec": r["codec"], "bits_per_param": r["bits_per_param"], "margin": margin}
    closest = min(compared, key=lambda c: c[0], default=None)
    return {"points": len(compared), "losses": [point(m, r) for m, r in compared if m < 0],
            "closest": None if closest is None else point(*closest)}


def _where(point: dict) -> str:
    return f"{point['codec']} at {point['bits_per_param']:.2f} bits/param ({point['margin']:+.2f} dB)"


def fmt_head_to_head(result: dict) -> tuple[str, str]:
    """(where the test codec is worse, its closest point) of a head_to_head result, for a table's cells."""
    if not result["points"]:
        return "no matched files", "—"
    return "; ".join(_where(p) for p in result["losses"]) or "none", _where(result["closest"])


def head_to_head_summary(results: list[tuple[str, list[dict], Quality]]) -> str | None:
    """One sentence over several (label, rows, quality): how many files were compared and where the test codec
    was worse; None if no results have matched files."""
    heads = [(label, head_to_head(rows, quality)) for label, rows, quality in results]
    compared = sum(head["points"] for _, head in heads)
    if not compared:
        return None
    losses = [f"{label}: {_where(p)}" for label, head in heads for p in head["losses"]]
    return f"{compared} files compared, `--size` worse on {len(losses)}" + (f" ({'; '.join(losses)})" if losses else "")
