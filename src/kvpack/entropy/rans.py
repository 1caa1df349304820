"""Interleaved rANS over many independent lanes: CPU encoder and decoder (numba).

Why hand-written: kvpack needs an entropy coder that takes *its own* per-channel frequency tables and writes *one*
bitstream layout that a CPU decodes (here, numba) and a GPU decodes with one thread per lane. No maintained
library does both: ``constriction`` is exact but holds the GIL and is slow (127/57 Msym/s on this machine class);
``torchac`` is GPL and slow (10 Msym/s); zstd and nvCOMP's ANS do not take custom tables (and nvCOMP's output
decodes only on a GPU). The coder is range ANS (Duda, "Asymmetric numeral systems: entropy coding combining speed of
Huffman coding with compression rate of arithmetic coding", arXiv 1311.2540) with the word-wise renormalization and
interleaving of Giesen ("Interleaved entropy coders", arXiv 1402.3392).

Parameters: 32-bit state ``x`` kept in ``[L, 2**32)`` with ``L = 2**16``; renormalization moves 16-bit words;
probabilities have ``PROB_BITS = 15`` bits (:mod:`kvpack.entropy.tables`). With these, one symbol moves at most one
word each way, so both loops are branch-free.

Stream layout (full spec in ``docs/entropy.md``): lane ``i`` codes ``symbols[lane_starts[i]:lane_starts[i+1]]`` with
table ``freqs[lane_table[i]]`` into ``words[word_offsets[i]:word_offsets[i+1]]`` (uint16). An empty lane has no
words. Otherwise ``w[0] | w[1] << 16`` is the initial decoder state and the decoder consumes ``w[2:]`` strictly in
order, one word whenever its state drops below ``L``; after the last symbol the state is ``L`` again and every word
is consumed. The encoder runs each lane backwards from state ``L`` and writes its words back to front.

CPU schedule (:func:`_schedule`): lanes are split into contiguous blocks balanced by symbol count, one ``prange``
iteration per block; within a block a thread codes four lanes in lockstep, longest lanes first, so their independent
dependency chains overlap (interleaving in Giesen's sense, done in registers rather than in the format). The
coders read compiled tables (:class:`kvpack.entropy.models.Model`: encoder entries and the decoder's slot -> symbol
lookup); give them a model built once where the tables are fixed (a profile's), or raw tables, which they compile
per call.

The decoder's refill ("if the state fell below L, shift a word in") is written two ways with identical results
(:func:`_refill_select`, :func:`_refill_arith`), picked by the core LLVM tunes for: on a 2-core AMD EPYC Zen 3
(``znver3``), LLVM compiled the select into a branch that the data mispredicts, and one thread decoded the
``laplace-a16`` stream of ``kvpack bench entropy`` at 113 Msym/s; written in shifts and masks, 227-279 (the same
select tuned for ``skylake`` on that host: 298). Intel cores keep the select, the code measured there (docs/entropy.md
has why, and ``docs/results/zen3/decode_probe.py`` the measurement).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import binding as llvm
from numba import njit, prange

from kvpack.entropy.models import Model, encoder_table, fill_lookup, reciprocals
from kvpack.entropy.tables import (
    MAX_ALPHABET,
    PROB_BITS,
    PROB_SCALE,
    decode_varints,
    encode_varints,
    pack_tables,
    read_varint,
    validate_freqs,
)
from kvpack.errors import FormatError

__all__ = ["MIN_PACKED_BYTES", "STATE_LOWER", "LaneStream", "check_lanes", "decode_lanes", "encode_lanes",
           "max_packed_bytes", "pack", "parse", "unpack"]

STATE_LOWER = 1 << 16  # L: the state lies in [L, 2**32) between symbols
BLOB_VERSION = 1
_FLAG_TABLES = 1  # the blob carries the frequency tables
_FLAG_UNIFORM = 2  # every lane has the same symbol count (stored once)
_FLAG_IDENTITY = 4  # lane i uses table i (table indices not stored)
_MAX_COUNT = 1 << 40  # bound on any per-lane count read from a blob

_U = np.uint64
_L = np.uint64(STATE_LOWER)
_SLOT_MASK = np.uint64(PROB_SCALE - 1)
_PBITS = np.uint64(PROB_BITS)
_XMAX_SHIFT = np.uint64(32 - PROB_BITS)
_W = np.uint64(16)
_LOW16 = np.uint64(0xFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_4 = np.uint64(4)
_ZERO = np.uint64(0)
_GROUP = 4  # lanes coded in lockstep by one thread
#: log2 of the slots per entry of the lookup rows a decoder block builds for itself: 2 KiB rows, four in L1 (the
#: exact 32 KiB rows of shift 0 were not faster); a bucket that straddles symbols costs a step or two.
_ROW_SHIFT = 4

# --------------------------------------------------------------------------------------------- numba kernels
# Encoder table etab[t, s] (uint32, 256 columns): freq | cum << 16; freq 0 = symbol not codable with table t.


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _enc_step(x, e, r, scratch, p, bad):  # type: ignore[no-untyped-def]
    """Push one symbol with table entry ``e`` and multiplier ``r`` onto state ``x``; a word (maybe) goes to
    ``scratch[p - 1]``.

    ``x // f`` is a multiply-high, an add and a shift (:func:`~kvpack.entropy.models.reciprocals`: exact for the
    32-bit states): 328 -> 364 Msym/s on one thread, 665 -> 754 on two, for 256-token fp8 chunks, against the exact
    float64 division it replaces (in-process A/B, identical blobs; Zen 1's 64-bit integer divider, not pipelined,
    had bounded the encoder at ~125 Msym/s before that). A
    symbol of frequency 0 (``r == 0``) marks its lane bad; its state is then garbage but stays in range of the
    scratch writes (at most one word per symbol)."""
    f = e & _LOW16
    bad |= f == 0
    emit = x >= (f << _XMAX_SHIFT)
    scratch[p - 1] = x & _LOW16
    p -= emit
    x = (x >> _W) if emit else x
    q = (((x * (r & _LOW32)) >> _32) + x) >> (r >> _32)  # == x // f
    x = (q << _PBITS) + (x - q * f) + (e >> _W)
    return x, p, bad


@njit(nogil=True, cache=True, error_model="numpy")
def _enc_run(symbols, lo, hi, tab, rcp, x, p, scratch, bad):  # type: ignore[no-untyped-def]
    """Push ``symbols[lo:hi]`` (last first) with table row ``tab`` (multipliers ``rcp``), then flush; returns
    ``(first word, bad)``."""
    for j in range(hi - 1, lo - 1, -1):
        s = symbols[j]
        x, p, bad = _enc_step(x, _U(tab[s]), rcp[s], scratch, p, bad)
    scratch[p - 1] = x >> _W
    scratch[p - 2] = x & _LOW16
    return p - 2, bad


@njit(nogil=True, cache=True, error_model="numpy")
def _encode_block(symbols, lane_starts, lane_table, etab, rtab, order, lo, hi, scratch, first, bad):  # type: ignore[no-untyped-def]
    """Encode lanes ``order[lo:hi]``; lane ``i`` writes back to front ending at ``lane_starts[i+1] + 2 * (i + 1)``."""
    j = lo
    while j < hi:
        if j + _GROUP <= hi:
            l0 = order[j]
            l1 = order[j + 1]
            l2 = order[j + 2]
            l3 = order[j + 3]
            e0 = lane_starts[l0 + 1]
            e1 = lane_starts[l1 + 1]
            e2 = lane_starts[l2 + 1]
            e3 = lane_starts[l3 + 1]
            m = min(e0 - lane_starts[l0], e1 - lane_starts[l1], e2 - lane_starts[l2], e3 - lane_starts[l3])
            if m > 0:
                t0 = etab[lane_table[l0]]
                t1 = etab[lane_table[l1]]
                t2 = etab[lane_table[l2]]
                t3 = etab[lane_table[l3]]
                r0 = rtab[lane_table[l0]]
                r1 = rtab[lane_table[l1]]
                r2 = rtab[lane_table[l2]]
                r3 = rtab[lane_table[l3]]
                p0 = e0 + 2 * (l0 + 1)
                p1 = e1 + 2 * (l1 + 1)
                p2 = e2 + 2 * (l2 + 1)
                p3 = e3 + 2 * (l3 + 1)
                x0 = x1 = x2 = x3 = _L
                b0 = b1 = b2 = b3 = False
                for k in range(1, m + 1):
                    s0 = symbols[e0 - k]
                    s1 = symbols[e1 - k]
                    s2 = symbols[e2 - k]
                    s3 = symbols[e3 - k]
                    x0, p0, b0 = _enc_step(x0, _U(t0[s0]), r0[s0], scratch, p0, b0)
                    x1, p1, b1 = _enc_step(x1, _U(t1[s1]), r1[s1], scratch, p1, b1)
                    x2, p2, b2 = _enc_step(x2, _U(t2[s2]), r2[s2], scratch, p2, b2)
                    x3, p3, b3 = _enc_step(x3, _U(t3[s3]), r3[s3], scratch, p3, b3)
                first[l0], bad[l0] = _enc_run(symbols, lane_starts[l0], e0 - m, t0, r0, x0, p0, scratch, b0)
                first[l1], bad[l1] = _enc_run(symbols, lane_starts[l1], e1 - m, t1, r1, x1, p1, scratch, b1)
                first[l2], bad[l2] = _enc_run(symbols, lane_starts[l2], e2 - m, t2, r2, x2, p2, scratch, b2)
                first[l3], bad[l3] = _enc_run(symbols, lane_starts[l3], e3 - m, t3, r3, x3, p3, scratch, b3)
                j += _GROUP
                continue
        i = order[j]
        end = lane_starts[i + 1] + 2 * (i + 1)
        if lane_starts[i + 1] == lane_starts[i]:
            first[i] = end
        else:
            t = lane_table[i]
            first[i], bad[i] = _enc_run(symbols, lane_starts[i], lane_starts[i + 1], etab[t], rtab[t], _L, end, scratch,
                                        False)
        j += 1


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _encode_kernel(symbols, lane_starts, lane_table, etab, rtab, blocks, order, scratch):  # type: ignore[no-untyped-def]
    """Encode every lane, back to front, into ``scratch`` (uint16 ``[N + 2 n_lanes]``, from numpy: see
    :func:`_decode_kernel`), then compact: ``(words, word_offsets, bad lanes)``."""
    n_lanes = lane_starts.shape[0] - 1
    first = np.empty(n_lanes, np.int64)
    bad = np.zeros(n_lanes, np.bool_)
    for b in prange(blocks.shape[0] - 1):
        _encode_block(symbols, lane_starts, lane_table, etab, rtab, order, blocks[b], blocks[b + 1], scratch, first,
                      bad)
    word_offsets = np.zeros(n_lanes + 1, np.int64)
    for i in range(n_lanes):
        word_offsets[i + 1] = word_offsets[i] + lane_starts[i + 1] + 2 * (i + 1) - first[i]
    words = np.empty(word_offsets[n_lanes], np.uint16)
    for b in prange(blocks.shape[0] - 1):
        for i in range(blocks[b], blocks[b + 1]):
            o = word_offsets[i]
            words[o : word_offsets[i + 1]] = scratch[first[i] : first[i] + word_offsets[i + 1] - o]
    return words, word_offsets, bad


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _dec_step(x, slots, shift, tab, words, p, last, out, j):  # type: ignore[no-untyped-def]
    """Pop one symbol into ``out[j]``; refill from ``words[p]`` if needed (reads clamp to ``last``).

    ``slots[slot >> shift]`` is the symbol holding the first slot of ``slot``'s bucket; with ``shift > 0`` step on to
    the one holding ``slot`` (see :mod:`kvpack.entropy.models`)."""
    slot = x & _SLOT_MASK
    s = slots[slot >> shift]
    e = _U(tab[s])
    if shift:
        while slot >= (e >> _W) + (e & _LOW16):
            s += 1
            e = _U(tab[s])
    out[j] = s
    x = (e & _LOW16) * (x >> _PBITS) + slot - (e >> _W)
    return _refill(x, _U(words[min(p, last)]), p)


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _refill_select(x, w, p):  # type: ignore[no-untyped-def]
    """``(x << 16 | w, p + 1)`` if ``x < L``, else ``(x, p)``: a select, which LLVM keeps as a conditional move when
    it tunes for Intel cores."""
    refill = x < _L
    return ((x << _W) | w) if refill else x, p + refill


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _refill_arith(x, w, p):  # type: ignore[no-untyped-def]
    """The same as :func:`_refill_select` in shifts and masks, with no select: tuning for AMD Zen cores, LLVM turns
    that select into a branch, which the data mispredicts (module docstring)."""
    refill = _U(x < _L)
    return (x << (refill << _4)) | (w & (_ZERO - refill)), p + np.int64(refill)


#: The refill the decoder inlines, by the core LLVM tunes for (numba's target: ``NUMBA_CPU_NAME`` or the host's).
_TUNED_FOR = getattr(numba.config, "CPU_NAME", None) or llvm.get_host_cpu_name()
_refill = _refill_arith if _TUNED_FOR.startswith("znver") else _refill_select


@njit(nogil=True, cache=True, error_model="numpy")
def _dec_run(x, p, words, end, slots, shift, tab, out, lo, hi, x0):  # type: ignore[no-untyped-def]
    """Pop ``out[lo:hi]``, then check the lane ends exactly: initial state ``x0 >= L``, final ``x == L``, all words."""
    for j in range(lo, hi):
        x, p = _dec_step(x, slots, shift, tab, words, p, end - 1, out, j)
    return not (x0 >= _L and x == _L and p == end)


@njit(nogil=True, cache=True, error_model="numpy")
def _dec_init(words, p):  # type: ignore[no-untyped-def]
    return _U(words[p]) | (_U(words[p + 1]) << _W)


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _row(slots, lookup, own, r, t):  # type: ignore[no-untyped-def]
    """The slot -> symbol row of the lane at position ``r`` of a group, whose table is ``t``: the block's ``own``
    row, or the model's precompiled one."""
    return slots[r] if own else lookup[t]


@njit(nogil=True, cache=True, error_model="numpy")
def _decode_block(words, word_offsets, lane_starts, lane_table, etab, lookup, shift, order, lo, hi, out,  # type: ignore[no-untyped-def]
                  bad):
    """Decode lanes ``order[lo:hi]``, four at a time. With ``shift == 0`` the exact slot -> symbol rows are built
    here, per position in the group of four, only when a lane's table differs from the previous lane's at that
    position (rows just written are in cache; few tables); otherwise the rows are the model's precompiled coarse
    ``lookup`` (many tables)."""
    own = shift == 0
    if own:
        shift = _ROW_SHIFT
    slots = np.empty((_GROUP, (PROB_SCALE >> _ROW_SHIFT) if own else 0), np.uint8)
    cached = np.full(_GROUP, -1, np.int64)
    j = lo
    while j < hi:
        g = min(_GROUP, hi - j)
        for r in range(g if own else 0):
            t = lane_table[order[j + r]]
            if cached[r] != t:
                fill_lookup(etab[t], _ROW_SHIFT, slots[r])
                cached[r] = t
        m = 0
        if g == _GROUP:
            l0 = order[j]
            l1 = order[j + 1]
            l2 = order[j + 2]
            l3 = order[j + 3]
            m = min(
                lane_starts[l0 + 1] - lane_starts[l0],
                lane_starts[l1 + 1] - lane_starts[l1],
                lane_starts[l2 + 1] - lane_starts[l2],
                lane_starts[l3 + 1] - lane_starts[l3],
            )
        if m > 0:
            a0 = lane_starts[l0]
            a1 = lane_starts[l1]
            a2 = lane_starts[l2]
            a3 = lane_starts[l3]
            e0 = word_offsets[l0 + 1]
            e1 = word_offsets[l1 + 1]
            e2 = word_offsets[l2 + 1]
            e3 = word_offsets[l3 + 1]
            t0 = etab[lane_table[l0]]
            t1 = etab[lane_table[l1]]
            t2 = etab[lane_table[l2]]
            t3 = etab[lane_table[l3]]
            z0 = x0 = _dec_init(words, word_offsets[l0])
            z1 = x1 = _dec_init(words, word_offsets[l1])
            z2 = x2 = _dec_init(words, word_offsets[l2])
            z3 = x3 = _dec_init(words, word_offsets[l3])
            p0 = word_offsets[l0] + 2
            p1 = word_offsets[l1] + 2
            p2 = word_offsets[l2] + 2
            p3 = word_offsets[l3] + 2
            d0 = _row(slots, lookup, own, 0, lane_table[l0])
            d1 = _row(slots, lookup, own, 1, lane_table[l1])
            d2 = _row(slots, lookup, own, 2, lane_table[l2])
            d3 = _row(slots, lookup, own, 3, lane_table[l3])
            for k in range(m):
                x0, p0 = _dec_step(x0, d0, shift, t0, words, p0, e0 - 1, out, a0 + k)
                x1, p1 = _dec_step(x1, d1, shift, t1, words, p1, e1 - 1, out, a1 + k)
                x2, p2 = _dec_step(x2, d2, shift, t2, words, p2, e2 - 1, out, a2 + k)
                x3, p3 = _dec_step(x3, d3, shift, t3, words, p3, e3 - 1, out, a3 + k)
            bad[l0] = _dec_run(x0, p0, words, e0, d0, shift, t0, out, a0 + m, lane_starts[l0 + 1], z0)
            bad[l1] = _dec_run(x1, p1, words, e1, d1, shift, t1, out, a1 + m, lane_starts[l1 + 1], z1)
            bad[l2] = _dec_run(x2, p2, words, e2, d2, shift, t2, out, a2 + m, lane_starts[l2 + 1], z2)
            bad[l3] = _dec_run(x3, p3, words, e3, d3, shift, t3, out, a3 + m, lane_starts[l3 + 1], z3)
        else:
            for r in range(g):
                lane = order[j + r]
                if lane_starts[lane + 1] > lane_starts[lane]:
                    p = word_offsets[lane]
                    x = _dec_init(words, p)
                    bad[lane] = _dec_run(
                        x,
                        p + 2,
                        words,
                        word_offsets[lane + 1],
                        _row(slots, lookup, own, r, lane_table[lane]),
                        shift,
                        etab[lane_table[lane]],
                        out,
                        lane_starts[lane],
                        lane_starts[lane + 1],
                        x,
                    )
        j += g


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _decode_kernel(words, word_offsets, lane_starts, lane_table, etab, lookup, shift, blocks, order, out):  # type: ignore[no-untyped-def]
    """Decode every lane into ``out`` (uint8 ``[N]``; numpy allocates it: it asks the kernel for huge pages on large
    arrays, numba's allocator does not); returns the lanes that failed their checks."""
    n_lanes = lane_starts.shape[0] - 1
    bad = np.zeros(n_lanes, np.bool_)
    for b in prange(blocks.shape[0] - 1):
        _decode_block(words, word_offsets, lane_starts, lane_table, etab, lookup, shift, order, blocks[b],
                      blocks[b + 1], out, bad)
    return bad


@njit(nogil=True, cache=True)
def _parse_counts(data, pos, count, max_value, total_limit):  # type: ignore[no-untyped-def]
    """``count`` varints (each <= max_value) whose running sum stays <= total_limit; ``pos`` -1 if not."""
    out, pos = decode_varints(data, pos, count, max_value)
    total = 0
    for k in range(count if pos >= 0 else 0):
        total += out[k]
        if total > total_limit:
            return out, -1
    return out, pos


# --------------------------------------------------------------------------------------------- Python API


@contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    """Run numba parallel regions in this thread with ``threads`` threads (default: numba's current setting)."""
    previous = numba.get_num_threads()
    if threads is None:
        yield previous
        return
    numba.set_num_threads(threads)  # raises ValueError outside 1..NUMBA_NUM_THREADS
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)


def _schedule(lane_starts: np.ndarray, n_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The coders' work split: ``(blocks, order)``, int64.

    ``blocks``: lane boundaries of up to ``4 * n_threads`` contiguous blocks with about equal symbol counts.
    ``order``: the lanes of each block (a permutation of ``blocks[b]:blocks[b + 1]`` in place), longest first
    (stable). A thread codes four consecutive lanes of ``order`` in lockstep up to the shortest one's length and
    finishes the rest of each alone, one dependency chain at a time; lanes of equal length side by side keep that
    rest small. In storage order a class's last, short lane broke the groups: in 256-token chunks, where a class
    holds one or two lanes, a large share of the symbols was coded alone. The order changes no output byte.
    """
    n_lanes = lane_starts.size - 1
    n_blocks = max(1, min(-(-n_lanes // _GROUP), 4 * n_threads))
    targets = np.arange(n_blocks + 1, dtype=np.int64) * int(lane_starts[-1]) // n_blocks
    blocks = np.searchsorted(lane_starts, targets, side="left").astype(np.int64)
    blocks[0] = 0
    blocks[-1] = n_lanes
    block_of = np.repeat(np.arange(n_blocks, dtype=np.int64), np.diff(blocks))
    order = np.lexsort((-np.diff(lane_starts), block_of)).astype(np.int64)
    return blocks, order


def _as_int64(name: str, a: npt.ArrayLike, size: int | None, error: type[Exception]) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise error(f"{name} must be a 1-D integer array")
    if size is not None and arr.size != size:
        raise error(f"{name} has {arr.size} entries, expected {size}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_offsets(name: str, offsets: np.ndarray, total: int | None, error: type[Exception]) -> None:
    if not _from_zero_up(offsets):
        raise error(f"{name} must start at 0 and be non-decreasing")
    if total is not None and offsets[-1] != total:
        raise error(f"{name} must end at {total}, ends at {int(offsets[-1])}")


def _check_lane_tables(lane_table: np.ndarray, n_tables: int, error: type[Exception]) -> None:
    if not _all_below(lane_table, n_tables):
        raise error(f"a lane uses a table outside 0..{n_tables - 1}")


# The checks every coder call makes, compiled: as numpy expressions (slices, diffs, masks, any), check_lanes took
# 0.046-0.055 ms per call (120-1,024 lanes; 0.008-0.011 now, microbenchmark), on one thread before the lanes are
# coded in parallel, once per stream of every decode (a kivi chunk has three).


@njit(nogil=True, cache=True)
def _from_zero_up(offsets):  # type: ignore[no-untyped-def]
    """Whether int64 ``offsets`` is non-empty, starts at 0 and never decreases."""
    ok = offsets.size > 0 and offsets[0] == 0
    for i in range(1, offsets.size):
        ok &= offsets[i] >= offsets[i - 1]
    return ok


@njit(nogil=True, cache=True)
def _all_below(values, n):  # type: ignore[no-untyped-def]
    """Whether every one of int64 ``values`` lies in ``0 .. n - 1``."""
    ok = True
    for v in values:
        ok &= 0 <= v < n
    return ok


@njit(nogil=True, cache=True)
def _lane_fault(starts, offsets, table_of, usable):  # type: ignore[no-untyped-def]
    """0 if every lane's word count fits its symbol count (empty: 0 words, else 2 .. symbols + 2) and every nonempty
    lane's table is usable; 1 if a count does not fit; 2 if the counts fit but a nonempty lane's table is all zero."""
    counts, tables = True, True
    for i in range(starts.size - 1):
        n_sym, n_words = starts[i + 1] - starts[i], offsets[i + 1] - offsets[i]
        counts &= n_words == 0 if n_sym == 0 else 2 <= n_words <= n_sym + 2
        tables &= n_sym == 0 or usable[table_of[i]]
    return 0 if counts and tables else (1 if not counts else 2)


def encode_lanes(
    symbols: npt.ArrayLike,
    lane_starts: npt.ArrayLike,
    lane_table: npt.ArrayLike,
    freqs: npt.ArrayLike | Model,
    *,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode every lane with its own table.

    Args:
        symbols: uint8 ``[N]``.
        lane_starts: int64 ``[n_lanes + 1]``, non-decreasing from 0 to ``N``; lane ``i`` is
            ``symbols[lane_starts[i]:lane_starts[i+1]]`` (may be empty).
        lane_table: int32 ``[n_lanes]``, the table row of each lane.
        freqs: uint16/uint32 ``[n_tables, alphabet]``, rows summing to ``PROB_SCALE`` or all zero
            (see :func:`kvpack.entropy.tables.quantize_freqs`), or those tables compiled into a :class:`Model`.
        threads: numba threads to use (default: ``numba.get_num_threads()``).

    Returns:
        ``(words, word_offsets)``: uint16 ``[W]`` and int64 ``[n_lanes + 1]``; lane ``i``'s stream is
        ``words[word_offsets[i]:word_offsets[i+1]]``: no words if the lane is empty, else 2 to ``n_i + 2``.

    Raises:
        ValueError: malformed arguments, or a symbol whose frequency in its lane's table is 0 (or that lies
            outside the alphabet).
    """
    sym = np.ascontiguousarray(symbols)
    if sym.ndim != 1 or sym.dtype != np.uint8:
        raise ValueError("symbols must be a 1-D uint8 array")
    starts = _as_int64("lane_starts", lane_starts, None, ValueError)
    _check_offsets("lane_starts", starts, sym.size, ValueError)
    n_lanes = starts.size - 1
    table_of = _as_int64("lane_table", lane_table, n_lanes, ValueError)
    if isinstance(freqs, Model):
        etab, rtab = freqs.etab, freqs.reciprocals
    else:
        try:
            valid = validate_freqs(freqs)
        except FormatError as exc:
            raise ValueError(str(exc)) from None
        etab = encoder_table(valid)
        rtab = reciprocals(etab, valid.shape[1])
    _check_lane_tables(table_of, etab.shape[0], ValueError)
    scratch = np.empty(sym.size + 2 * n_lanes, np.uint16)
    with _threads(threads) as n_threads:
        words, word_offsets, bad = _encode_kernel(sym, starts, table_of.astype(np.int32), etab, rtab,
                                                  *_schedule(starts, n_threads), scratch)
    if bad.any():
        lane = int(np.flatnonzero(bad)[0])
        raise ValueError(f"lane {lane} holds a symbol with frequency 0 in its table {int(table_of[lane])}")
    return words, word_offsets


def decode_lanes(
    words: npt.ArrayLike,
    word_offsets: npt.ArrayLike,
    lane_starts: npt.ArrayLike,
    lane_table: npt.ArrayLike,
    freqs: npt.ArrayLike | Model,
    *,
    threads: int | None = None,
) -> np.ndarray:
    """Decode the lanes written by :func:`encode_lanes`.

    Args:
        words: uint16 ``[W]``.
        word_offsets: int64 ``[n_lanes + 1]``, non-decreasing from 0 to ``W``.
        lane_starts: int64 ``[n_lanes + 1]``, the symbol count of every lane (from the caller, who bounds ``N``).
        lane_table: int32 ``[n_lanes]``.
        freqs: ``[n_tables, alphabet]``, the tables the lanes were encoded with (or their :class:`Model`).
        threads: numba threads to use (default: ``numba.get_num_threads()``).

    Returns:
        uint8 ``[N]`` with ``N = lane_starts[-1]``.

    Raises:
        FormatError: inconsistent arrays, a table that is not a valid frequency table, or a corrupted lane (it
            would read past its words, does not end in the initial state ``L``, or leaves words unread). Never
            reads out of bounds, and runs in time linear in ``N + n_lanes``.
    """
    w, offsets, starts, table_of, model = check_lanes(words, word_offsets, lane_starts, lane_table, freqs)
    # Rows built per block (shift 0 below) unless lanes change tables so often that rebuilding them would cost more
    # than the model's precompiled lookup (cachegen: one table per short lane).
    runs = 1 + int(np.count_nonzero(table_of[1:] != table_of[:-1]))
    own = model.shift == 0 or int(starts[-1]) >= runs * (PROB_SCALE >> _ROW_SHIFT)
    out = np.empty(int(starts[-1]), np.uint8)
    with _threads(threads) as n_threads:
        bad = _decode_kernel(
            w,
            offsets,
            starts,
            table_of.astype(np.int32),
            model.etab,
            model.slots if not own else np.zeros((0, 0), np.uint8),
            0 if own else model.shift,
            *_schedule(starts, n_threads),
            out,
        )
    if bad.any():
        raise FormatError(f"rANS lane {int(np.flatnonzero(bad)[0])} is corrupted (its words do not decode exactly)")
    return out


def check_lanes(words: npt.ArrayLike, word_offsets: npt.ArrayLike, lane_starts: npt.ArrayLike,
                lane_table: npt.ArrayLike, freqs: npt.ArrayLike | Model
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Model]:
    """Every check :func:`decode_lanes` makes before decoding (shared with the GPU decoder,
    :mod:`kvpack.entropy.rans_triton`): ``(words uint16, word_offsets int64, lane_starts int64, lane_table int64,
    model)``, contiguous; :class:`FormatError` as :func:`decode_lanes` documents."""
    w = np.asarray(words)
    if w.ndim != 1 or w.dtype != np.uint16:
        raise FormatError("words must be a 1-D uint16 array")
    starts = _as_int64("lane_starts", lane_starts, None, FormatError)
    _check_offsets("lane_starts", starts, None, FormatError)
    n_lanes = starts.size - 1
    offsets = _as_int64("word_offsets", word_offsets, n_lanes + 1, FormatError)
    _check_offsets("word_offsets", offsets, w.size, FormatError)
    table_of = _as_int64("lane_table", lane_table, n_lanes, FormatError)
    model = freqs if isinstance(freqs, Model) else Model.from_freqs(freqs)
    _check_lane_tables(table_of, model.shape[0], FormatError)
    fault = _lane_fault(starts, offsets, table_of, model.usable)
    if fault == 1:
        raise FormatError("a lane's word count does not fit its symbol count (empty: 0, else 2..symbols+2)")
    if fault == 2:
        raise FormatError("a nonempty lane uses an all-zero frequency table")
    return np.ascontiguousarray(w), offsets, starts, table_of, model


@dataclass(frozen=True)
class LaneStream:
    """A parsed blob: everything :func:`decode_lanes` (or a GPU decoder) needs. Shapes as in :func:`decode_lanes`;
    ``freqs``: the tables read from the blob, compiled (a :class:`Model`), or the tables (or model) the caller gave
    :func:`parse`, validated."""

    words: np.ndarray
    word_offsets: np.ndarray
    lane_starts: np.ndarray
    lane_table: np.ndarray
    freqs: np.ndarray | Model


def pack(
    symbols: npt.ArrayLike,
    lane_starts: npt.ArrayLike,
    lane_table: npt.ArrayLike,
    freqs: npt.ArrayLike | Model,
    *,
    include_tables: bool = True,
    threads: int | None = None,
) -> bytes:
    """Encode (as :func:`encode_lanes`) and serialize into one self-contained blob (layout in ``docs/entropy.md``).

    With ``include_tables=False`` the blob stores only a CRC-32 of the tables, and :func:`parse` / :func:`unpack`
    must be given the same ``freqs`` (for tables kept in a per-model profile: pass their :class:`Model`).
    """
    model = freqs if isinstance(freqs, Model) else None
    f = freqs.freqs if isinstance(freqs, Model) else np.asarray(freqs)
    words, word_offsets = encode_lanes(symbols, lane_starts, lane_table, freqs, threads=threads)
    starts = np.asarray(lane_starts, dtype=np.int64)
    table_of = np.asarray(lane_table, dtype=np.int64)
    n_lanes = starts.size - 1
    n_sym = np.diff(starts)
    flags = 0
    parts: list[bytes] = []
    if n_lanes and np.all(n_sym == n_sym[0]):
        flags |= _FLAG_UNIFORM
        parts.append(encode_varints(n_sym[:1]).tobytes())
    else:
        parts.append(encode_varints(n_sym).tobytes())
    if f.shape[0] == n_lanes and np.array_equal(table_of, np.arange(n_lanes)):
        flags |= _FLAG_IDENTITY
    else:
        parts.append(encode_varints(table_of).tobytes())
    parts.append(encode_varints(np.diff(word_offsets)).tobytes())
    if include_tables:
        flags |= _FLAG_TABLES
        tables = pack_tables(f)
        parts += [encode_varints(np.array([len(tables)], np.int64)).tobytes(), tables]
    else:
        crc = model.crc if model is not None else zlib.crc32(pack_tables(f))
        parts.append(crc.to_bytes(4, "little"))
    header = (
        bytes([BLOB_VERSION, PROB_BITS, flags])
        + encode_varints(np.array([n_lanes, f.shape[0], f.shape[1]], np.int64)).tobytes()
    )
    return b"".join([header, *parts, np.ascontiguousarray(words, "<u2").data])  # one copy of the words


def parse(data: bytes | bytearray | memoryview, *, max_symbols: int, freqs: npt.ArrayLike | Model | None = None,
          tables: tuple[int, int] | None = None) -> LaneStream:
    """Read a :func:`pack` blob without decoding it.

    Args:
        data: the blob.
        max_symbols: the most symbols the caller accepts; a blob declaring more is refused before any allocation.
        freqs: the tables (or their :class:`Model`, which the stream then carries), required if and only if the
            blob was packed with ``include_tables=False``.
        tables: ``(n_tables, alphabet)`` the caller expects, checked before the tables are unpacked (without it, a
            blob may make the reader allocate up to ``1 KiB`` of tables per byte of its own).

    Raises:
        FormatError: truncated, malformed or inconsistent bytes, too many symbols, tables missing, of another shape
            than ``tables`` or not the ones the blob was written with. Allocations are bounded by ``len(data)`` and
            ``max_symbols`` (and by ``1 KiB * len(data)`` for the tables when ``tables`` is not given).
    """
    if not 0 <= max_symbols < 1 << 62:
        raise ValueError(f"max_symbols must be in 0..2**62, got {max_symbols}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size < 3 or raw[0] != BLOB_VERSION or raw[1] != PROB_BITS or int(raw[2]) & ~7:
        raise FormatError(f"not an rANS lane blob of version {BLOB_VERSION} with {PROB_BITS}-bit probabilities")
    flags = int(raw[2])
    header, pos = decode_varints(raw, 3, 3, _MAX_COUNT)
    if pos < 0:
        raise FormatError("rANS blob header is truncated or malformed")
    n_lanes, n_tables, alphabet = (int(v) for v in header)
    if n_lanes > raw.size or not 1 <= alphabet <= MAX_ALPHABET:
        raise FormatError(f"rANS blob declares {n_lanes} lanes / alphabet {alphabet}: impossible for its size")
    if tables is not None and (n_tables, alphabet) != tables:
        raise FormatError(f"rANS blob has tables {(n_tables, alphabet)}, expected {tables}")
    if flags & _FLAG_UNIFORM:
        lane_len, pos = read_varint(raw, pos, _MAX_COUNT)
        if pos < 0 or n_lanes == 0 or lane_len * n_lanes > max_symbols:
            raise FormatError(f"rANS blob lane length is malformed or exceeds max_symbols={max_symbols}")
        n_sym = np.full(n_lanes, lane_len, np.int64)
    else:
        n_sym, pos = _parse_counts(raw, pos, n_lanes, _MAX_COUNT, max_symbols)
        if pos < 0:
            raise FormatError(f"rANS blob lane sizes are malformed or exceed max_symbols={max_symbols}")
    if flags & _FLAG_IDENTITY:
        if n_tables != n_lanes:
            raise FormatError("rANS blob maps lane i to table i but has a different number of tables")
        table_of = np.arange(n_lanes, dtype=np.int32)
    else:
        tab, pos = decode_varints(raw, pos, n_lanes, max(n_tables - 1, 0))
        if pos < 0 or (n_lanes and n_tables == 0):
            raise FormatError("rANS blob table indices are malformed or out of range")
        table_of = tab.astype(np.int32)
    n_words, pos = _parse_counts(raw, pos, n_lanes, _MAX_COUNT, raw.size)
    if pos < 0:
        raise FormatError("rANS blob word counts are malformed")
    if flags & _FLAG_TABLES:
        if freqs is not None:
            raise FormatError("rANS blob carries its own tables; do not pass freqs")
        size, pos = read_varint(raw, pos, raw.size)
        if pos < 0 or pos + size > raw.size:
            raise FormatError("rANS blob tables are truncated")
        f: np.ndarray | Model = Model.unpack(memoryview(data)[pos : pos + size], n_tables, alphabet)
        pos += size
    else:
        if freqs is None:
            raise FormatError("rANS blob was packed without tables: pass the freqs it was encoded with")
        f = freqs if isinstance(freqs, Model) else validate_freqs(freqs)
        if f.shape != (n_tables, alphabet) or pos + 4 > raw.size:
            raise FormatError(f"rANS blob needs tables of shape {(n_tables, alphabet)}, got {f.shape}")
        crc = f.crc if isinstance(f, Model) else zlib.crc32(pack_tables(f))
        if crc != int.from_bytes(raw[pos : pos + 4].tobytes(), "little"):
            raise FormatError("the given frequency tables are not the ones this rANS blob was encoded with")
        pos += 4
    word_offsets = np.zeros(n_lanes + 1, np.int64)
    np.cumsum(n_words, out=word_offsets[1:])
    if raw.size - pos != 2 * int(word_offsets[-1]):
        raise FormatError(f"rANS blob holds {raw.size - pos} bytes of words, expected {2 * int(word_offsets[-1])}")
    lane_starts = np.zeros(n_lanes + 1, np.int64)
    np.cumsum(n_sym, out=lane_starts[1:])
    words = raw[pos:].view("<u2").astype(np.uint16)
    return LaneStream(words, word_offsets, lane_starts, table_of, f)


def max_packed_bytes(n_symbols: int, n_lanes: int, n_tables: int, alphabet: int, include_tables: bool = True) -> int:
    """An upper bound on the size of a :func:`pack` blob of ``n_symbols`` symbols in at most ``n_lanes`` lanes with
    ``n_tables`` tables of ``alphabet`` symbols (a reader's sanity bound on a section's length)."""
    varints = 9 * (3 + 1 + 3 * n_lanes)  # header, table size, per-lane symbol count, table index, word count
    table_bytes = 9 * n_tables * (2 + alphabet) if include_tables else 4
    return 3 + varints + table_bytes + 2 * (n_symbols + 2 * n_lanes)


#: The smallest :func:`pack` blob: version, probability bits, flags and three one-byte header varints.
MIN_PACKED_BYTES = 6


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    max_symbols: int,
    freqs: npt.ArrayLike | Model | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Parse and decode a :func:`pack` blob: ``(symbols uint8 [N], lane_starts int64 [n_lanes + 1])``.

    Arguments and errors as :func:`parse` and :func:`decode_lanes`.
    """
    s = parse(data, max_symbols=max_symbols, freqs=freqs)
    symbols = decode_lanes(s.words, s.word_offsets, s.lane_starts, s.lane_table, s.freqs, threads=threads)
    return symbols, s.lane_starts
