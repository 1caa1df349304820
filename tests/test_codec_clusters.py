"""Row classes (kvpack.codecs.clusters): the compiled k-means picks exactly the classes of its definition.

The reference is the algorithm written densely in numpy (``assign_classes``' docstring): integer histograms, code
lengths from the same ``code_lengths``, every row's costs by an exact int64 matmul, all groups one round at a time.
Run on random rows, rows with ties (duplicates, equal tables) and tiny alphabets.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvpack.codecs.clusters import KMEANS_ROUNDS, RowCounts, _stable_order, assign_classes, code_lengths


def _histograms(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """int64 ``[groups, rows, alphabet]``."""
    n_groups, rows, tokens = symbols.shape
    h = np.zeros((n_groups * rows, alphabet), np.int64)
    np.add.at(h, (np.repeat(np.arange(n_groups * rows), tokens), symbols.reshape(-1)), 1)
    return h.reshape(n_groups, rows, alphabet)


def _reference(symbols: np.ndarray, alphabet: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense formulation: ``(classes, class sums)``."""
    n_groups, rows, _ = symbols.shape
    h = _histograms(symbols, alphabet)
    weighted = symbols.astype(np.int64).sum(axis=2)
    rank = np.argsort(np.argsort(weighted, axis=1, kind="stable"), axis=1, kind="stable")
    assign = rank * n_classes // max(rows, 1)

    def sums_of(assign: np.ndarray) -> np.ndarray:
        return np.einsum("grs,grc->gcs", h, np.eye(n_classes, dtype=np.int64)[assign])

    for _ in range(KMEANS_ROUNDS if n_classes > 1 else 0):
        length = np.empty((n_groups, n_classes, alphabet), np.int64)
        for g, sums in enumerate(sums_of(assign)):
            code_lengths(sums, alphabet, length[g])
        new = (h @ length.transpose(0, 2, 1)).argmin(axis=2)  # exact integers; ties to the lowest class
        if np.array_equal(new, assign):
            break
        assign = new
    return assign.astype(np.uint8), sums_of(assign)


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
@pytest.mark.parametrize(("alphabet", "tokens"),
                         [(256, 8192), (256, 256), (256, 8), (16, 100), (4, 37), (2, 5), (1, 3)])
@pytest.mark.parametrize("n_classes", [1, 2, 4, 16])
def test_classes_equal_the_dense_definition(kind: str, alphabet: int, tokens: int, n_classes: int) -> None:
    rng = np.random.default_rng([alphabet, tokens, n_classes, len(kind)])
    symbols = _rows(rng, 5, 48, tokens, alphabet, kind)
    classes, sums = assign_classes(RowCounts.of(symbols, alphabet), n_classes)
    want_classes, want_sums = _reference(symbols, alphabet, n_classes)
    np.testing.assert_array_equal(classes, want_classes)
    np.testing.assert_array_equal(sums, want_sums)


def test_code_lengths_are_the_smoothed_distributions() -> None:
    sums = np.array([[0, 5, 1, 0], [3, 3, 3, 3]], np.int64)
    got = np.empty((2, 4), np.int64)
    code_lengths(sums, 4, got)
    p = (sums + 0.25) / (sums.sum(axis=1, keepdims=True) + 1.0)
    np.testing.assert_array_equal(got, np.rint(-np.log2(p) * 2.0**24).astype(np.int64))


@pytest.mark.parametrize(("alphabet", "tokens"), [(64, 50), (16, 50), (4, 7), (32, 3)])
def test_row_counts_are_the_histograms(alphabet: int, tokens: int) -> None:
    rng = np.random.default_rng(alphabet)
    symbols = _rows(rng, 3, 10, tokens, alphabet, "skewed")
    counts = RowCounts.of(symbols, alphabet)
    for g in range(3):
        for r in range(10):
            flat = g * 10 + r
            span = slice(counts.start[flat], counts.start[flat] + counts.size[flat])
            got = np.zeros(alphabet, np.int64)
            got[counts.symbol[span]] = counts.count[span]
            np.testing.assert_array_equal(got, np.bincount(symbols[g, r], minlength=alphabet))
            assert np.all(counts.count[span] > 0) and len(set(counts.symbol[span])) == counts.size[flat]
    np.testing.assert_array_equal(counts.weighted, symbols.reshape(30, tokens).sum(axis=1, dtype=np.int64))


def test_empty_shapes() -> None:
    for shape in ((0, 4, 5), (2, 0, 5), (2, 4, 0)):
        symbols = np.zeros(shape, np.uint8)
        classes, sums = assign_classes(RowCounts.of(symbols, 8), 4)
        want_classes, want_sums = _reference(symbols, 8, 4)
        np.testing.assert_array_equal(classes, want_classes)
        np.testing.assert_array_equal(sums, want_sums)


@pytest.mark.parametrize("top", [1, 3, 256, 70_000, 1 << 40])
@pytest.mark.parametrize("n", [0, 1, 5, 192, 1000])
def test_stable_order_is_numpys_stable_argsort(n: int, top: int) -> None:
    values = np.random.default_rng([n, top]).integers(0, top, n)
    np.testing.assert_array_equal(_stable_order(values), np.argsort(values, kind="stable"))
