"""Row classes for :func:`kvpack.codecs.common.encode_rows`: sparse row histograms and the k-means over them.

Rows of symbols ``[n_groups, rows, tokens]`` are clustered per group into ``n_classes`` classes by their symbol
histograms (the algorithm in :func:`assign_classes`). A row uses few of the alphabet's symbols (SmolLM2's lossless
exponent rows: ~28 of 256 in a 256-token chunk; kivi's key-group parameters: at most 8), so every histogram is
kept sparse, as its nonzero ``(symbol, count)`` pairs: a dense ``[rows, alphabet]`` float64 histogram was 24 MB per
256-token chunk and, with its conversion and the per-round class sums over it, half of the encode time.

The clustering writes the same classes as its dense formulation (hence the same stored bytes):

* counts are integers, so every sum of them (row means, class histograms) is exact in float64 in any order;
* the per-class smoothed log-probabilities are computed by the same numpy expression on the same array;
* the score of a row under a class, ``sum_s count[s] * logp[class, s]``, is the one sum whose rounding depends on its
  order. The dense formulation was a BLAS matmul, so a row's best class is taken from the sparse sum only when it wins
  by more than twice the worst-case rounding of *any* order of the ``alphabet`` terms (``gamma_alphabet`` times the
  sum of magnitudes, Higham's bound, for both sums); a round where some row is closer than that (exact ties between
  classes with equal tables, or a near tie) runs the dense matmul, rebuilt from the sparse histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit, prange

#: k-means rounds when assigning rows to class tables (converges in 3-6 on real KV).
KMEANS_ROUNDS = 8
#: Safety factor on the rounding bound that decides whether a sparse score may stand in for the dense one.
_MARGIN = 4.0


@dataclass(frozen=True)
class RowCounts:
    """Sparse symbol histograms of rows ``[n_groups, rows]`` (flat row ``r = group * rows + row``).

    Row ``r``'s nonzero counts are ``count[start[r] : start[r] + size[r]]`` of the symbols at the same positions of
    ``symbol`` (in no particular order); every row counts ``tokens`` symbols, and ``weighted[r]`` is their sum.
    ``start``: int64 ``[n]``; ``size``: int32 ``[n]``; ``symbol``: uint8 ``[capacity]``; ``count``: int32
    ``[capacity]`` (only the listed positions are set); ``weighted``: int64 ``[n]``.
    """

    n_groups: int
    rows: int
    alphabet: int
    tokens: int
    start: np.ndarray
    size: np.ndarray
    symbol: np.ndarray
    count: np.ndarray
    weighted: np.ndarray

    @classmethod
    def of(cls, symbols: np.ndarray, alphabet: int) -> RowCounts:
        """The histograms of the rows of uint8 ``symbols [n_groups, rows, tokens]`` (values ``< alphabet``)."""
        n_groups, rows, tokens = symbols.shape
        flat = np.ascontiguousarray(symbols).reshape(n_groups * rows, tokens)
        start, size, symbol, count, weighted = _sparse_rows(flat, max(n_groups, 1), min(tokens, 256))
        return cls(n_groups, rows, alphabet, tokens, start, size, symbol, count, weighted)

    def class_counts(self, classes: np.ndarray, n_classes: int, dtype: npt.DTypeLike) -> np.ndarray:
        """Summed histograms ``[n_groups, n_classes, alphabet]`` (``dtype``: int64 or float64, exact) of the rows of
        each class; ``classes``: int ``[n_groups, rows]``."""
        out: np.ndarray = np.zeros((self.n_groups, n_classes, self.alphabet), dtype)
        _class_sums(self.start, self.size, self.symbol, self.count, classes.reshape(-1).astype(np.int64),
                    self.rows, out)
        return out

    def dense(self) -> np.ndarray:
        """float64 ``[n_groups, rows, alphabet]``: the histograms as a dense array."""
        out = np.zeros((self.n_groups * self.rows, self.alphabet), np.float64)
        _scatter(self.start, self.size, self.symbol, self.count, out)
        return out.reshape(self.n_groups, self.rows, self.alphabet)


@njit(nogil=True, cache=True, parallel=True)
def _sparse_rows(flat, n_groups, width):  # type: ignore[no-untyped-def]
    """Nonzero counts of every row of ``flat [n_groups * rows, tokens]``: group ``g``'s entries are written from
    ``g * rows * width`` on (``width >= `` any row's distinct symbols), so only ``nnz`` entries are touched."""
    n, tokens = flat.shape
    rows = n // n_groups
    start = np.empty(n, np.int64)
    size = np.empty(n, np.int32)
    symbol = np.empty(n * width, np.uint8)
    count = np.empty(n * width, np.int32)
    weighted = np.empty(n, np.int64)
    for g in prange(n_groups):
        hist = np.zeros(256, np.int32)
        seen = np.empty(256, np.uint8)
        pos = g * rows * width
        for r in range(g * rows, (g + 1) * rows):
            row = flat[r]
            k = 0
            w = 0
            for t in range(tokens):
                s = row[t]
                seen[k] = s
                k += hist[s] == 0
                hist[s] += 1
                w += s
            start[r] = pos
            size[r] = k
            weighted[r] = w
            for i in range(k):
                s = seen[i]
                symbol[pos + i] = s
                count[pos + i] = hist[s]
                hist[s] = 0
            pos += k
    return start, size, symbol, count, weighted


@njit(nogil=True, cache=True, parallel=True)
def _class_sums(start, size, symbol, count, classes, rows, out):  # type: ignore[no-untyped-def]
    """``out[g, classes[r], s] += count`` over the nonzero counts of every row ``r`` of group ``g``."""
    for g in prange(out.shape[0]):
        for r in range(g * rows, (g + 1) * rows):
            c = classes[r]
            for i in range(start[r], start[r] + size[r]):
                out[g, c, symbol[i]] += count[i]


@njit(nogil=True, cache=True, parallel=True)
def _move_rows(start, size, symbol, count, old, new, rows, sums):  # type: ignore[no-untyped-def]
    """Update the class sums ``sums [n_groups, n_classes, alphabet]`` of classes ``old`` to those of ``new`` (flat
    ``[n_groups * rows]``) by moving the counts of the rows that changed class (exact: integers)."""
    for g in prange(sums.shape[0]):
        for r in range(g * rows, (g + 1) * rows):
            a = old[r]
            b = new[r]
            if a != b:
                for i in range(start[r], start[r] + size[r]):
                    sums[g, a, symbol[i]] -= count[i]
                    sums[g, b, symbol[i]] += count[i]


@njit(nogil=True, cache=True)
def _scatter(start, size, symbol, count, out):  # type: ignore[no-untyped-def]
    for r in range(out.shape[0]):
        for i in range(start[r], start[r] + size[r]):
            out[r, symbol[i]] = count[i]


@njit(nogil=True, cache=True, inline="always")
def _sums2(l0, l1, symbol, count, lo, hi):  # type: ignore[no-untyped-def]
    """Scores of one row (nonzero counts ``lo .. hi``) under two classes' log-probabilities, as a 4-tuple."""
    a0 = 0.0
    a1 = 0.0
    for i in range(lo, hi):
        h = np.float64(count[i])
        a0 += h * l0[symbol[i]]
        a1 += h * l1[symbol[i]]
    return a0, a1, 0.0, 0.0


@njit(nogil=True, cache=True, inline="always")
def _sums4(l0, l1, l2, l3, symbol, count, lo, hi):  # type: ignore[no-untyped-def]
    """The same under four classes: one pass over the counts instead of two (with 4+ classes)."""
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    for i in range(lo, hi):
        h = np.float64(count[i])
        s = symbol[i]
        a0 += h * l0[s]
        a1 += h * l1[s]
        a2 += h * l2[s]
        a3 += h * l3[s]
    return a0, a1, a2, a3


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _best_classes(start, size, symbol, count, logp, rows, bound, active, best):  # type: ignore[no-untyped-def]
    """``best[r]`` = the class maximising row ``r``'s score ``sum count * logp[g, class, symbol]`` for the rows of
    the groups with ``active[g]``; returns False if some row's best class does not win by ``bound`` times the scores'
    magnitudes (then only the dense matmul's rounding decides).

    Classes are scored four (or two) at a time, each sum in a register over the row's nonzero counts, rather than
    a score array updated per count (faster in a one-off timing; no command here measures this kernel alone)."""
    n_groups, n_classes, _ = logp.shape
    step = min(n_classes, 4)
    sure = np.ones(n_groups, np.bool_)
    for g in prange(n_groups):
        if not active[g]:
            continue
        for r in range(g * rows, (g + 1) * rows):
            lo, hi = start[r], start[r] + size[r]
            b = 0
            top = -np.inf
            second = -np.inf  # the best score among the other classes
            for c in range(0, n_classes, step):
                if step == 4:
                    sums = _sums4(logp[g, c], logp[g, c + 1], logp[g, c + 2], logp[g, c + 3], symbol, count, lo, hi)
                else:
                    sums = _sums2(logp[g, c], logp[g, c + 1], symbol, count, lo, hi)
                for k in range(step):
                    if sums[k] > top:
                        b, top, second = c + k, sums[k], top
                    elif sums[k] > second:
                        second = sums[k]
            best[r] = b
            # every score is <= 0 (log-probabilities), so the closest rival is the largest other score
            if top - second <= bound * (abs(top) + abs(second)):
                sure[g] = False
    return sure.all()


def assign_classes(counts: RowCounts, n_classes: int) -> np.ndarray:
    """Cluster rows by their symbol histograms into ``n_classes`` tables per group.

    Returns:
        uint8 ``[n_groups, rows]``: the class of every row. Starts from quantiles of the rows' mean symbol and
        moves each row to the class whose (add-one smoothed) distribution codes it in the fewest bits, for up to
        :data:`KMEANS_ROUNDS` rounds (ties to the lowest class).
    """
    n_groups, rows, alphabet = counts.n_groups, counts.rows, counts.alphabet
    if n_classes == 1 or rows == 0:
        return np.zeros((n_groups, rows), np.uint8)
    mean = counts.weighted.reshape(n_groups, rows).astype(np.float64) / max(counts.tokens, 1)
    rank = np.argsort(np.argsort(mean, axis=1, kind="stable"), axis=1, kind="stable")
    assign = (rank * n_classes // rows).astype(np.int64)
    gamma = alphabet * 2.0**-53 / (1 - alphabet * 2.0**-53)  # Higham's gamma_n for sums of n = alphabet products
    # A group whose classes did not change in a round gets the same tables and classes in the next: only the groups
    # that changed are scored again, and the class sums follow the rows that moved.
    active = np.ones(n_groups, np.bool_)
    sums = counts.class_counts(assign, n_classes, np.float64)
    dense: np.ndarray | None = None
    for _ in range(KMEANS_ROUNDS):
        smoothed = sums + 1.0 / alphabet
        logp = np.log2(smoothed / smoothed.sum(axis=2, keepdims=True))
        new = assign.copy()
        if not _best_classes(counts.start, counts.size, counts.symbol, counts.count,
                             logp, rows, 2 * _MARGIN * gamma, active,
                             new.reshape(-1)):
            dense = counts.dense() if dense is None else dense
            new = (dense @ logp.transpose(0, 2, 1)).argmax(axis=2)
        active = (new != assign).any(axis=1)
        if not active.any():
            break
        _move_rows(counts.start, counts.size, counts.symbol, counts.count, assign.reshape(-1), new.reshape(-1), rows,
                   sums)
        assign = new
    return assign.astype(np.uint8)


__all__ = ["KMEANS_ROUNDS", "RowCounts", "assign_classes"]
