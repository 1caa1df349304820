"""Row classes for :func:`kvpack.codecs.common.encode_rows`: sparse row histograms and the k-means over them.

Rows of symbols ``[n_groups, rows, tokens]`` are clustered per group into ``n_classes`` classes by their symbol
histograms (the algorithm in :func:`assign_classes`). A row uses few of the alphabet's symbols (SmolLM2's lossless
exponent rows: ~28 of 256 in a 256-token chunk; kivi's key-group parameters: at most 8), so every histogram is
kept sparse, as its nonzero ``(symbol, count)`` pairs in the order the symbols first appear in the row: a dense
``[rows, alphabet]`` float64 histogram was 24 MB per 256-token chunk and, with its conversion and the per-round
class sums over it, half of the encode time.

Groups are independent, so each runs its whole k-means in one compiled loop (one ``prange`` iteration per group,
until its classes stop changing): per-round numpy steps and kernel launches had cost as much as the scoring itself
(2.3 of 6.7 ms per 256-token fp8 chunk). Rows are compared by integer costs (code lengths in fixed point), which
are exact in any order: the classes are a deterministic function of the symbols (and of ``log2``, one call per
class and symbol per round). The rounds score each row from its counts laid out densely over the symbols its group
uses (fp8: ~150 of 256; float32, one group's at a time), in vectorized float64 sums that stay exact integers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

#: k-means rounds when assigning rows to class tables (converges in 3-6 on real KV).
KMEANS_ROUNDS = 8
#: Fraction bits of the integer code lengths the k-means compares rows with: a cost is exact (a row of ``n``
#: symbols costs at most ``n * 2**(LENGTH_BITS + 7)``, far below ``2**63``), and ``2**-24`` bits per symbol is
#: finer than any difference between classes worth a move.
LENGTH_BITS = 24
#: Alphabets up to this size (kivi's symbols) are counted densely: every row uses most of its symbols.
DENSE_ALPHABET = 32
_UNIT = float(1 << LENGTH_BITS)


@dataclass(frozen=True)
class RowCounts:
    """Sparse symbol histograms of rows ``[n_groups, rows]`` (flat row ``r = group * rows + row``).

    Row ``r``'s nonzero counts are ``count[start[r] : start[r] + size[r]]`` of the symbols at the same positions of
    ``symbol``, in no particular order (the k-means's costs are exact integers: no sum depends on it); every row
    counts ``tokens`` symbols, and ``weighted[r]`` is their sum.
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
        if alphabet <= DENSE_ALPHABET:
            start, size, symbol, count, weighted = _small_rows(flat, max(n_groups, 1), alphabet)
        else:
            start, size, symbol, count, weighted = _sparse_rows(flat, max(n_groups, 1), min(tokens, 256))
        return cls(n_groups, rows, alphabet, tokens, start, size, symbol, count, weighted)


@njit(nogil=True, cache=True, inline="always")
def _row_arrays(n, width):  # type: ignore[no-untyped-def]
    """The arrays of :class:`RowCounts` for ``n`` rows of up to ``width`` distinct symbols each (unfilled)."""
    return (np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n * width, np.uint8), np.empty(n * width, np.int32),
            np.empty(n, np.int64))


@njit(nogil=True, cache=True, parallel=True)
def _sparse_rows(flat, n_groups, width):  # type: ignore[no-untyped-def]
    """Nonzero counts of every row of ``flat [n_groups * rows, tokens]``: group ``g``'s entries are written from
    ``g * rows * width`` on (``width >= `` any row's distinct symbols), so only ``nnz`` entries are touched."""
    n, tokens = flat.shape
    rows = n // n_groups
    start, size, symbol, count, weighted = _row_arrays(n, width)
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
def _small_rows(flat, n_groups, alphabet):  # type: ignore[no-untyped-def]
    """:func:`_sparse_rows` for an alphabet of at most :data:`DENSE_ALPHABET` symbols, listed in ascending order:
    each row is counted into four histograms (token ``t`` into ``t % 4``), so that a run of one symbol (a 2-bit
    kivi row has four) does not wait on its own counter; 1.7 -> 0.9 ms for a 256-token 2-bit chunk."""
    n, tokens = flat.shape
    rows = n // n_groups
    width = min(tokens, alphabet)
    start, size, symbol, count, weighted = _row_arrays(n, width)
    for g in prange(n_groups):
        hist = np.zeros((4, alphabet), np.int32)
        pos = g * rows * width
        for r in range(g * rows, (g + 1) * rows):
            row = flat[r]
            hist[:] = 0
            for t in range(0, tokens - 3, 4):
                hist[0, row[t]] += 1
                hist[1, row[t + 1]] += 1
                hist[2, row[t + 2]] += 1
                hist[3, row[t + 3]] += 1
            for t in range(tokens - tokens % 4, tokens):
                hist[0, row[t]] += 1
            start[r] = pos
            w = 0
            for s in range(alphabet):
                c = hist[0, s] + hist[1, s] + hist[2, s] + hist[3, s]
                if c:
                    symbol[pos] = s
                    count[pos] = c
                    w += s * c
                    pos += 1
            size[r] = pos - start[r]
            weighted[r] = w
    return start, size, symbol, count, weighted


@njit(nogil=True, cache=True)
def code_lengths(sums, alphabet, out):  # type: ignore[no-untyped-def]
    """``out[c, s] = rint(-log2((sums[c, s] + 1 / alphabet) / (sums[c].sum() + 1)) * 2**LENGTH_BITS)``: the code
    lengths, in units of ``2**-LENGTH_BITS`` bits, of the add-one smoothed distributions of classes with integer
    symbol counts ``sums [n_classes, alphabet]``; ``out``: int64 of the same shape."""
    for c in range(sums.shape[0]):
        total = np.float64(sums[c].sum()) + 1.0  # an exact integer sum, then one rounding
        unseen = np.rint(-np.log2(1.0 / alphabet / total) * _UNIT)  # the same expression for a count of 0, once
        for s in range(alphabet):
            out[c, s] = np.rint(-np.log2((np.float64(sums[c, s]) + 1.0 / alphabet) / total) * _UNIT) \
                if sums[c, s] else unseen


@njit(nogil=True, cache=True)
def _stable_order(values):  # type: ignore[no-untyped-def]
    """``np.argsort(values, kind="stable")`` of nonnegative int64 ``values [n]``: an LSD radix sort on bytes, as many
    passes as the largest value has bytes (numba's merge sort took 7 us for 192 values, 0.4 ms of a k-means)."""
    n = values.size
    order = np.arange(n)
    spare = np.empty(n, np.int64)
    top = values.max() if n else 0
    shift = 0
    while top >> shift:
        count = np.zeros(257, np.int64)
        for i in range(n):
            count[((values[order[i]] >> shift) & 0xFF) + 1] += 1
        for b in range(256):
            count[b + 1] += count[b]
        for i in range(n):
            digit = (values[order[i]] >> shift) & 0xFF
            spare[count[digit]] = order[i]
            count[digit] += 1
        order, spare = spare, order
        shift += 8
    return order


#: Floating-point flags of the scoring sums: reassociation lets LLVM vectorize them, and changes no result, since
#: every count, code length, product and partial sum is an integer below ``2**53`` (:func:`_kmeans`).
_EXACT_REORDER = {"reassoc", "contract"}


@njit(nogil=True, cache=True, inline="always")
def _gap_sum(h, gap):  # type: ignore[no-untyped-def]
    """``h @ gap``: a row's cost under class 1 minus that under class 0, from its dense counts ``h [n]`` (float32)
    and the classes' code length differences ``gap [n]`` (float64)."""
    d = 0.0
    for j in range(h.size):
        d += np.float64(h[j]) * gap[j]
    return d


@njit(nogil=True, cache=True, inline="always")
def _costs4(h, l0, l1, l2, l3):  # type: ignore[no-untyped-def]
    """A row's costs under four classes' code lengths ``l0 .. l3 [n]`` (float64), from its dense counts ``h [n]``
    (float32), in one pass."""
    a0 = a1 = a2 = a3 = 0.0
    for j in range(h.size):
        x = np.float64(h[j])
        a0 += x * l0[j]
        a1 += x * l1[j]
        a2 += x * l2[j]
        a3 += x * l3[j]
    return a0, a1, a2, a3


@functools.cache
def _kmeans(n_classes: int) -> Any:
    """The k-means kernel for ``n_classes`` classes, compiled with the count as a constant (with one class, run it
    for 0 rounds: it then only sums the rows' counts). Two classes compare one sum per row, over the differences
    of their code lengths (exact, as every cost is): 10.7 -> 8.1 ms per 256-token fp8 chunk on one thread against
    two sums. Rows are scored from dense counts over the group's used symbols, whose dot products vectorize
    (:data:`_EXACT_REORDER`): a 256-token chunk's k-means 4.7 -> 2.4 ms for fp8 and 4.3 -> 2.0 ms for lossless
    (two threads, against sums over each row's sparse counts; kivi's, dense before, unchanged at 0.4-0.7 ms; a
    one-off microbenchmark on Zen 4; whole encodes: ``docs/results/zen4/kmeans_ab.py``).
    Counts, lengths and costs are integers below ``2**53``: a length is below ``2**(LENGTH_BITS + 7)`` and a row
    has at most ``validate.MAX_TOKENS = 2**20`` symbols."""

    @njit(nogil=True, cache=True, parallel=True, error_model="numpy", fastmath=_EXACT_REORDER)
    def kmeans(start, size, symbol, count, weighted, rows, rounds, classes, sums):  # type: ignore[no-untyped-def]
        """Classes ``classes [n_groups * rows]`` (uint8) and their symbol counts ``sums [n_groups, n_classes,
        alphabet]`` (int64, zeroed by the caller) of the rows of every group (algorithm: :func:`assign_classes`)."""
        n_groups, _, alphabet = sums.shape
        for g in prange(n_groups):
            first = g * rows
            assign = np.empty(rows, np.int64)
            rank = _stable_order(weighted[first : first + rows])
            for i in range(rows):
                assign[rank[i]] = i * n_classes // rows
            total = sums[g]
            for r in range(rows):
                for i in range(start[first + r], start[first + r] + size[first + r]):
                    total[assign[r], symbol[i]] += count[i]
            # every row's counts, dense over the symbols the group uses (those its classes' sums hold)
            slot = np.empty(alphabet, np.int64)  # symbol -> column (an unused symbol's is never read)
            present = np.empty(alphabet, np.int64)  # column -> symbol
            used = 0
            for k in range(alphabet):
                slot[k] = used
                present[used] = k
                for c in range(n_classes):
                    if total[c, k]:
                        used += 1
                        break
            counts = np.zeros((rows if rounds else 0, used), np.float32)
            for r in range(counts.shape[0]):
                for i in range(start[first + r], start[first + r] + size[first + r]):
                    counts[r, slot[symbol[i]]] = count[i]
            length = np.empty((n_classes, alphabet), np.int64)
            lengths = np.empty((n_classes, used), np.float64)  # the used symbols' columns of ``length``
            gap = np.empty(used, np.float64)
            for _ in range(rounds):
                code_lengths(total, alphabet, length)
                for c in range(n_classes):
                    for j in range(used):
                        lengths[c, j] = length[c, present[j]]
                if n_classes == 2:
                    gap[:] = lengths[1] - lengths[0]
                moved = False
                for r in range(rows):
                    lo, hi = start[first + r], start[first + r] + size[first + r]
                    best = 0
                    if n_classes == 2:  # one sum per row: its cost under class 1 minus that under class 0
                        best = 1 if _gap_sum(counts[r], gap) < 0 else 0
                    else:
                        least = np.inf
                        for c in range(0, n_classes, 4):
                            costs = _costs4(counts[r], lengths[c], lengths[c + 1], lengths[c + 2], lengths[c + 3])
                            for k in range(4):
                                if costs[k] < least:
                                    best, least = c + k, costs[k]
                    old = assign[r]
                    if best != old:  # the class sums follow the rows that move (exact: integers)
                        moved = True
                        assign[r] = best
                        for i in range(lo, hi):
                            total[old, symbol[i]] -= count[i]
                            total[best, symbol[i]] += count[i]
                if not moved:
                    break
            for r in range(rows):
                classes[first + r] = assign[r]

    return kmeans


def assign_classes(counts: RowCounts, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster rows by their symbol histograms into ``n_classes`` tables per group.

    Per group, the rows start in classes by the quantiles of their symbol sums (class ``rank * n_classes // rows``
    for a row of that rank among the group's ``rows``, ties in row order); then, for up to :data:`KMEANS_ROUNDS`
    rounds and until no row moves, every row in turn moves to the class whose smoothed distribution codes it in the
    fewest bits (ties to the lowest class): the row's cost under a class is ``sum count[s] * length[class, s]``,
    with the class's code lengths :func:`code_lengths` from the class sums at the start of the round. Lengths are
    integers (in units of ``2**-LENGTH_BITS`` bits), so costs are exact and their sums need no order; only the one
    ``log2`` per length is floating point.

    Returns:
        ``(classes, sums)``: uint8 ``[n_groups, rows]``, the class of every row; int64 ``[n_groups, n_classes,
        alphabet]``, the symbol counts of each class's rows.
    """
    n_groups, rows = counts.n_groups, counts.rows
    classes = np.empty(n_groups * rows, np.uint8)
    sums = np.zeros((n_groups, n_classes, counts.alphabet), np.int64)
    _kmeans(n_classes)(counts.start, counts.size, counts.symbol, counts.count, counts.weighted, rows,
                       KMEANS_ROUNDS if n_classes > 1 else 0, classes, sums)
    return classes.reshape(n_groups, rows), sums


__all__ = ["KMEANS_ROUNDS", "LENGTH_BITS", "RowCounts", "assign_classes", "code_lengths"]
