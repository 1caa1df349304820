"""Row classes (kvpack.codecs.clusters): the sparse k-means picks exactly the classes of its dense formulation.

The stored bytes of every entropy-coded codec depend on the classes, so the sparse histograms and scores must not
change a single one: the reference here is the dense algorithm the codecs used before (a BLAS matmul scores every
row), run on random rows, rows with ties (duplicates, equal tables) and tiny alphabets.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvpack.codecs.clusters import KMEANS_ROUNDS, RowCounts, assign_classes


def _dense_classes(symbols: np.ndarray, alphabet: int, n_classes: int) -> np.ndarray:
    """The dense formulation: float64 histograms ``[groups, rows, alphabet]``, scores by matmul."""
    n_groups, rows, tokens = symbols.shape
    if n_classes == 1 or rows == 0:
        return np.zeros((n_groups, rows), np.uint8)
    h = np.zeros((n_groups * rows, alphabet))
    np.add.at(h, (np.repeat(np.arange(n_groups * rows), tokens), symbols.reshape(-1)), 1.0)
    h = h.reshape(n_groups, rows, alphabet)
    mean = (h @ np.arange(alphabet, dtype=np.float64)) / np.maximum(h.sum(axis=2), 1.0)
    rank = np.argsort(np.argsort(mean, axis=1, kind="stable"), axis=1, kind="stable")
    assign = (rank * n_classes // rows).astype(np.int64)
    for _ in range(KMEANS_ROUNDS):
        counts = np.einsum("grs,grc->gcs", h, np.eye(n_classes)[assign]) + 1.0 / alphabet
        logp = np.log2(counts / counts.sum(axis=2, keepdims=True))
        new = (h @ logp.transpose(0, 2, 1)).argmax(axis=2)
        if np.array_equal(new, assign):
            break
        assign = new
    return assign.astype(np.uint8)


def _rows(rng: np.random.Generator, groups: int, rows: int, tokens: int, alphabet: int, kind: str) -> np.ndarray:
    """uint8 ``[groups, rows, tokens]`` symbols ``< alphabet``: per-row skewed distributions, or with ties."""
    if kind == "duplicates":  # a few distinct rows, repeated: equal histograms, often equal class tables
        base = _rows(rng, groups, 3, tokens, alphabet, "skewed")
        return base[:, rng.integers(0, 3, rows)]
    if kind == "constant":  # every row one symbol
        return np.repeat(rng.integers(0, alphabet, (groups, rows, 1)), tokens, axis=2).astype(np.uint8)
    centre = rng.integers(0, alphabet, (groups, rows, 1))
    spread = rng.exponential(1.0 + alphabet / 16, (groups, rows, 1))
    x = np.rint(centre + rng.standard_normal((groups, rows, tokens)) * spread)
    return np.clip(x, 0, alphabet - 1).astype(np.uint8)


@pytest.mark.parametrize("kind", ["skewed", "duplicates", "constant"])
@pytest.mark.parametrize(("alphabet", "tokens"), [(256, 256), (256, 8), (16, 100), (4, 37), (2, 5), (1, 3)])
@pytest.mark.parametrize("n_classes", [1, 2, 4, 16])
def test_sparse_classes_equal_the_dense_ones(kind: str, alphabet: int, tokens: int, n_classes: int) -> None:
    rng = np.random.default_rng([alphabet, tokens, n_classes, len(kind)])
    symbols = _rows(rng, 5, 48, tokens, alphabet, kind)
    got = assign_classes(RowCounts.of(symbols, alphabet), n_classes)
    np.testing.assert_array_equal(got, _dense_classes(symbols, alphabet, n_classes))


def test_row_counts_are_the_histograms() -> None:
    rng = np.random.default_rng(7)
    symbols = _rows(rng, 3, 10, 50, 64, "skewed")
    counts = RowCounts.of(symbols, 64)
    dense = counts.dense()
    for g in range(3):
        for r in range(10):
            np.testing.assert_array_equal(dense[g, r], np.bincount(symbols[g, r], minlength=64))
    classes = rng.integers(0, 4, (3, 10))
    sums = counts.class_counts(classes, 4, np.int64)
    np.testing.assert_array_equal(sums, np.einsum("grs,grc->gcs", dense, np.eye(4)[classes]).astype(np.int64))
    np.testing.assert_array_equal(counts.weighted, symbols.reshape(30, 50).sum(axis=1, dtype=np.int64))


def test_empty_shapes() -> None:
    for shape in ((0, 4, 5), (2, 0, 5), (2, 4, 0)):
        symbols = np.zeros(shape, np.uint8)
        got = assign_classes(RowCounts.of(symbols, 8), 4)
        np.testing.assert_array_equal(got, _dense_classes(symbols, 8, 4))
