"""The bench's word-order task (`bench.dataset.word_swap`) on the real Debian descriptions."""
import numpy as np

from bench.dataset import Split, load, word_swap


def test_word_swap_keeps_the_words_and_labels_exactly_the_swapped_texts():
    train, _, _ = load(0)
    source = Split(train.texts[:2000], train.labels[:2000])
    by_words = {tuple(sorted(t.split())): t.split() for t in source.texts}
    task = word_swap(source, seed=3)
    assert 0.4 < task.labels.mean() < 0.6 and len(task.texts) > 0.5 * len(source.texts)
    for text, label in zip(task.texts, task.labels):
        words = text.split()
        original = by_words[tuple(sorted(words))]  # the same words as a source text
        moved = [i for i, (a, b) in enumerate(zip(words, original)) if a != b]
        assert len(words) >= 4 and len(moved) == (2 if label else 0)
        if label:
            i, j = moved
            assert (words[i], words[j]) == (original[j], original[i])


def test_word_swap_is_seeded():
    train, _, _ = load(0)
    source = Split(train.texts[:300], train.labels[:300])
    a, b, c = word_swap(source, 1), word_swap(source, 1), word_swap(source, 2)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels) and a.texts != c.texts
