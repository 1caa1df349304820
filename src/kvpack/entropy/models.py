"""Compiled entropy models: frequency tables turned once into what the lane coders read.

A :class:`Model` holds validated tables plus everything derived from them: the encoder entries, the decoder's
slot -> symbol lookup and the CRC-32 a blob packed without tables records. The coders (:mod:`kvpack.entropy.rans`)
take a model in place of raw tables, so tables kept in a per-model profile are compiled once per profile (the
codec keeps the model) and a chunk only runs the coder; a blob that carries its own tables compiles them once when
it is parsed. This is the split the constriction library makes between entropy models and coders.

Decoder lookup: slot ``x mod PROB_SCALE`` lies in the range ``[cum_s, cum_s + freq_s)`` of exactly one symbol ``s``.
``slots[t, b]`` is the symbol whose range holds slot ``b << shift``; the decoder starts there and steps forward to
the symbol holding its slot. With few tables (``n_tables * PROB_SCALE <= LOOKUP_BYTES``) ``shift`` is 0 and the
model holds no lookup: the decoder builds its own rows (2 KiB, :data:`kvpack.entropy.rans._ROW_SHIFT`) per block as
lanes need them (a row it has just written is in cache, where a precompiled one would not be). With many tables
(cachegen has one per channel and role, tens of thousands, each used by one short lane) rebuilding a row per lane
would dominate decoding, so ``shift`` grows until the precompiled lookup fits in :data:`LOOKUP_BYTES`, at a few extra
steps for the symbols that share a bucket; it is built on first use, and only used when lanes switch tables more
often than a row costs to build.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from kvpack.entropy.tables import MAX_ALPHABET, PROB_BITS, PROB_SCALE, pack_tables, unpack_tables, validate_freqs

__all__ = ["LOOKUP_BYTES", "Model", "encoder_table", "fill_lookup"]

#: Upper bound on a model's decoder lookup (``n_tables * PROB_SCALE >> shift`` bytes), unless one table needs more.
LOOKUP_BYTES = 1 << 23


def encoder_table(freqs: np.ndarray) -> np.ndarray:
    """uint32 ``[n_tables, 256]`` of validated ``freqs [n_tables, alphabet]``: ``freq | cum << 16`` per symbol, zero
    past the alphabet."""
    return _entries(freqs)[0]


@njit(nogil=True, cache=True)
def _entries(freqs):  # type: ignore[no-untyped-def]
    """``(encoder_table(freqs), usable)`` of validated uint32 ``freqs`` in one pass (a chunk's blob carries its
    tables, so this runs per chunk: numpy's cumsum, shift and row sums cost 40-115 us for 120-240 tables)."""
    n_tables, alphabet = freqs.shape
    etab = np.zeros((n_tables, MAX_ALPHABET), np.uint32)
    usable = np.zeros(n_tables, np.bool_)
    for t in range(n_tables):
        cum = 0
        for s in range(alphabet):
            f = np.int64(freqs[t, s])
            etab[t, s] = f | (cum << 16)
            cum += f
        usable[t] = cum > 0
    return etab, usable


def _multipliers() -> np.ndarray:
    """uint64 ``[PROB_SCALE + 1]``: ``m | l << 32`` for every frequency ``f >= 1`` (:func:`reciprocals`), 0 for 0."""
    f = np.arange(1, PROB_SCALE + 1, dtype=np.uint64)
    lg = np.ceil(np.log2(f)).astype(np.uint64)  # exact: log2 of an integer <= 2**15 is an integer or far from one
    m = (np.uint64(1 << 32) * ((np.uint64(1) << lg) - f)) // f + np.uint64(1)  # below 2**47 before the division
    return np.concatenate([np.zeros(1, np.uint64), m | (lg << np.uint64(32))])


#: :func:`_multipliers`, computed once (256 KiB): a table's multipliers are then lookups, not divisions.
_MULTIPLIERS = _multipliers()


def reciprocals(etab: np.ndarray, alphabet: int | None = None) -> np.ndarray:
    """The encoder's divisors of encoder table ``etab [n_tables, 256]`` as multipliers: uint64, ``m | l << 32`` per
    symbol of frequency ``f >= 1`` (0 where ``f == 0``), with ``l = ceil(log2 f)`` and ``m = floor(2**32 (2**l - f)
    / f) + 1 < 2**32``, so that ``x // f == ((x * m >> 32) + x) >> l`` for every ``0 <= x < 2**32`` (Granlund and
    Montgomery, "Division by invariant integers using multiplication", PLDI 1994, Theorem 4.2; checked for every
    ``f`` by the tests). Only the first ``alphabet`` symbols are looked up (default: all; the table's rows are zero
    past its alphabet): 0.22 -> 0.09 ms for 1,024 tables of 16 symbols, 0.04 -> 0.02 ms for 240 (kivi), work a
    coder does on one thread before its lanes (microbenchmark, medians of 9 alternating rounds)."""
    out = np.zeros(etab.shape, np.uint64)
    _lookup(etab, etab.shape[1] if alphabet is None else min(alphabet, etab.shape[1]), _MULTIPLIERS, out)
    return out


@njit(nogil=True, cache=True)
def _lookup(etab, alphabet, table, out):  # type: ignore[no-untyped-def]
    for t in range(etab.shape[0]):
        for s in range(alphabet):
            out[t, s] = table[etab[t, s] & 0xFFFF]


@njit(nogil=True, cache=True, error_model="numpy")
def fill_lookup(tab, shift, row):  # type: ignore[no-untyped-def]
    """``row[b]`` = the symbol of encoder row ``tab`` whose slot range holds slot ``b << shift`` (uint8
    ``[PROB_SCALE >> shift]``; untouched for an all-zero table)."""
    mask = (1 << shift) - 1
    for s in range(MAX_ALPHABET):
        e = tab[s]
        f = e & 0xFFFF
        if f:
            c = e >> 16
            row[(c + mask) >> shift : (c + f + mask) >> shift] = s


@njit(nogil=True, cache=True, parallel=True, error_model="numpy")
def _fill_lookups(etab, shift, out):  # type: ignore[no-untyped-def]
    for t in prange(etab.shape[0]):
        fill_lookup(etab[t], shift, out[t])


@dataclass(frozen=True, eq=False)
class Model:
    """Compiled tables; build with :meth:`from_freqs`.

    Attributes:
        freqs: uint32 ``[n_tables, alphabet]``, validated (rows sum to ``PROB_SCALE`` or are all zero).
        etab: uint32 ``[n_tables, 256]``: ``freq | cum << 16`` per symbol, zero past the alphabet (the coders' view).
        shift: log2 of the slots per entry of the precompiled lookup ``slots``.
        usable: bool ``[n_tables]``: the tables with any mass (only those can code a nonempty lane).
        slots: uint8 ``[n_tables, PROB_SCALE >> shift]``: decoder lookup (module docstring), built on first use; with
            ``shift == 0`` empty (``[0, PROB_SCALE]``): the decoder builds its rows as lanes need them.
        crc: CRC-32 of :func:`kvpack.entropy.pack_tables` of ``freqs``, computed on first use.
    """

    freqs: np.ndarray
    etab: np.ndarray
    shift: int
    usable: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_tables, alphabet)``."""
        return self.freqs.shape[0], self.freqs.shape[1]

    @functools.cached_property
    def slots(self) -> np.ndarray:
        """The decoder lookup, built on first use (a decoder whose lanes are long builds its own rows instead)."""
        slots = np.zeros((self.shape[0] if self.shift else 0, PROB_SCALE >> self.shift), np.uint8)
        if self.shift:
            _fill_lookups(self.etab, self.shift, slots)
        return slots

    @functools.cached_property
    def reciprocals(self) -> np.ndarray:
        """The encoder's multipliers (:func:`reciprocals`), built on first use (decoders do not need them)."""
        return reciprocals(self.etab, self.freqs.shape[1])

    @functools.cached_property
    def crc(self) -> int:
        """CRC-32 of the packed tables, computed on first use."""
        return zlib.crc32(pack_tables(self.freqs))

    @classmethod
    def from_freqs(cls, freqs: npt.ArrayLike, lookup_bytes: int = LOOKUP_BYTES) -> Model:
        """Compile ``freqs`` (``[n_tables, alphabet]``); :class:`~kvpack.errors.FormatError` if they are not valid
        frequency tables. ``lookup_bytes``: the exact lookup is used while ``n_tables * PROB_SCALE`` fits in it."""
        return cls._compiled(validate_freqs(freqs), lookup_bytes)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, n_tables: int, alphabet: int,
               lookup_bytes: int = LOOKUP_BYTES) -> Model:
        """Compile the tables :func:`~kvpack.entropy.tables.pack_tables` wrote (read by
        :func:`~kvpack.entropy.tables.unpack_tables`, with its errors). Its rows are valid by construction (each sums
        to ``PROB_SCALE`` or is all zero), so :meth:`from_freqs`'s checks are not repeated."""
        return cls._compiled(unpack_tables(data, n_tables, alphabet), lookup_bytes)

    @classmethod
    def _compiled(cls, f: np.ndarray, lookup_bytes: int) -> Model:
        shift = 0
        while shift < PROB_BITS and f.shape[0] * (PROB_SCALE >> shift) > lookup_bytes:
            shift += 1
        etab, usable = _entries(f)
        return cls(freqs=f, etab=etab, shift=shift, usable=usable)
