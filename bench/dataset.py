"""The bench's labelled text task: Debian package descriptions -> archive section (see data/PROVENANCE.md)."""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "debian-sections.tsv.gz"


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: np.ndarray  # int64 class ids

    def subset(self, count: int, seed: int) -> Split:
        """A seeded random subset (quick runs); the whole split when count >= its size."""
        if count >= len(self.texts):
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self.texts), count, replace=False))
        return Split([self.texts[i] for i in keep], self.labels[keep])


def load(seed: int = 0, test_fraction: float = 0.2) -> tuple[Split, Split, list[str]]:
    """Train and test splits, stratified per section with a fixed seed, and the class names."""
    with gzip.open(DATA, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    classes = sorted({r["section"] for r in rows})
    labels = np.array([classes.index(r["section"]) for r in rows])
    rng = np.random.default_rng(seed)
    test = np.zeros(len(rows), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, round(test_fraction * members.size), replace=False)] = True
    texts = [r["description"] for r in rows]
    pick = lambda mask: Split([texts[i] for i in np.flatnonzero(mask)], labels[mask])
    return pick(~test), pick(test), classes


def word_swap(split: Split, seed: int, min_words: int = 4) -> Split:
    """The word-order task on a split's texts: each text of at least `min_words` words either stays as it is
    (label 0) or has two of its words, chosen at random and different, trade places (label 1), about half and half.

    Both versions hold the same words, so a mean-pooled sentence embedding (the frozen base) barely tells them
    apart, while an adapter on the encoder learns to: a task where the adapter is worth >10 points
    (cf. SentEval's bigram shift, Conneau et al. 2018, with the swap anywhere in the text)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for text in split.texts:
        words = text.split()
        if len(words) < min_words:
            continue
        label = int(rng.integers(2))
        if label:
            i, j = rng.choice(len(words), 2, replace=False)
            if words[i] == words[j]:
                continue
            words[i], words[j] = words[j], words[i]
        texts.append(" ".join(words))
        labels.append(label)
    return Split(texts, np.array(labels, dtype=np.int64))
