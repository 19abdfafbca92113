"""Bit allocation at one global slope: which of its candidate encodings each tensor gets.

Each tensor t offers candidates c with an estimated rate R[t, c] (bits in the file) and distortion D[t, c]
(its contribution to the squared error of ΔW). The plan minimises sum D + λ·sum R, which for a given λ is
each tensor's own argmin: every tensor then spends bits up to the same marginal return, dD/dR = -λ, the
condition for the least total distortion at that total rate. A target is met by searching λ, then spending
what is left of the budget on the upgrades that buy the most distortion per bit (or, for a distortion limit,
taking back the bits that buy the least); never with a result worse than one width for every tensor.
"""
from __future__ import annotations

import numpy as np


def choose(rate: np.ndarray, distortion: np.ndarray, slope: float) -> np.ndarray:
    """Each row's candidate minimising D + slope·R (a missing candidate has rate inf), ties to the first."""
    return np.argmin(distortion + slope * rate, axis=1)


def _totals(rate: np.ndarray, distortion: np.ndarray, picks: np.ndarray) -> tuple[float, float]:
    rows = np.arange(rate.shape[0])
    return float(rate[rows, picks].sum()), float(distortion[rows, picks].sum())


def _search(rate: np.ndarray, distortion: np.ndarray, fits, fits_when_steep: bool) -> np.ndarray:
    """The plan at the slope closest to where `fits(total_rate, total_distortion)` stops holding, on the side
    where it holds, by bisection on log(slope): a steeper slope never raises the rate nor lowers the distortion,
    so a rate budget holds at steep slopes and a distortion limit at shallow ones. If it holds nowhere, the
    plan at the extreme where it comes closest."""
    good, bad = (60.0, -60.0) if fits_when_steep else (-60.0, 60.0)  # natural log: D and R span ~26 decades
    best = choose(rate, distortion, np.exp(good))
    if not fits(*_totals(rate, distortion, best)):
        return best
    for _ in range(80):
        mid = (good + bad) / 2
        picks = choose(rate, distortion, np.exp(mid))
        if fits(*_totals(rate, distortion, picks)):
            good, best = mid, picks
        else:
            bad = mid
    return best


def for_rate(rate: np.ndarray, distortion: np.ndarray, budget: float,
             uniform: list[np.ndarray] | None = None) -> np.ndarray:
    """The least-distortion plan found whose total rate is at most `budget` (the cheapest plan if none is), and
    never worse than any of the `uniform` plans (by default one column for every row, where every row has it)."""
    picks = _fill(rate, distortion, _search(rate, distortion, lambda r, _: r <= budget, fits_when_steep=True), budget)
    return _best(rate, distortion, [picks, *_uniform(rate, uniform)],
                 lambda r, d: (r > budget, d if r <= budget else r))


def for_distortion(rate: np.ndarray, distortion: np.ndarray, limit: float,
                   uniform: list[np.ndarray] | None = None) -> np.ndarray:
    """The smallest-rate plan found whose total distortion is at most `limit` (the best plan if none is), and
    never worse than any of the `uniform` plans (as for_rate's)."""
    picks = _trim(rate, distortion, _search(rate, distortion, lambda _, d: d <= limit, fits_when_steep=False), limit)
    return _best(rate, distortion, [picks, *_uniform(rate, uniform)],
                 lambda r, d: (d > limit, r if d <= limit else d))


def _uniform(rate: np.ndarray, given: list[np.ndarray] | None) -> list[np.ndarray]:
    """One width for every tensor, as -b gives: `given`, or each column that every row has."""
    if given is not None:
        return given
    return [np.full(rate.shape[0], c) for c in range(rate.shape[1]) if np.isfinite(rate[:, c]).all()]


def _best(rate: np.ndarray, distortion: np.ndarray, plans: list[np.ndarray], key) -> np.ndarray:
    """The plan with the least key(total rate, total distortion), which ranks the plans that meet the constraint
    by what they optimise and the others by how far they miss it: the search's, unless a uniform one does better
    (the choice is a multiple-choice knapsack, which slope and greedy steps solve only nearly; this makes sure
    a target never does worse than a fixed width under the same constraint)."""
    return min(plans, key=lambda picks: key(*_totals(rate, distortion, picks)))


def _fill(rate: np.ndarray, distortion: np.ndarray, picks: np.ndarray, budget: float) -> np.ndarray:
    """Spend what the slope left of the budget: repeatedly take the upgrade (a tensor's next candidate of more
    rate and less distortion) that removes the most distortion per bit, while it fits."""
    picks = picks.copy()
    spent = _totals(rate, distortion, picks)[0]
    rows = np.arange(rate.shape[0])
    while True:
        extra = rate - rate[rows, picks][:, None]
        gain = distortion[rows, picks][:, None] - distortion
        ok = (extra > 0) & (gain > 0) & (extra <= budget - spent) & np.isfinite(rate) & np.isfinite(distortion)
        if not ok.any():
            return picks
        ratio = np.where(ok, gain / np.where(ok, extra, 1), -np.inf)
        t, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra[t, c]
        picks[t] = c


def _trim(rate: np.ndarray, distortion: np.ndarray, picks: np.ndarray, limit: float) -> np.ndarray:
    """Give back what the slope overspent: repeatedly take the downgrade (a candidate of less rate) that saves
    the most rate per distortion it adds, while the total distortion stays within `limit`."""
    picks = picks.copy()
    rows = np.arange(rate.shape[0])
    spent = _totals(rate, distortion, picks)[1]
    if spent > limit:
        return picks
    while True:
        saved = rate[rows, picks][:, None] - rate
        added = distortion - distortion[rows, picks][:, None]
        ok = (saved > 0) & (added <= limit - spent) & np.isfinite(rate) & np.isfinite(distortion)
        if not ok.any():
            return picks
        ratio = np.where(ok, saved / np.maximum(np.where(ok, added, 1), 1e-300), -np.inf)
        t, c = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += added[t, c]
        picks[t] = c
