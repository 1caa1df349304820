"""Frequency tables for the rANS coder: quantization, compact serialization, escape symbols.

A *frequency table* is one row of a ``freqs`` array of shape ``[n_tables, alphabet]`` (``1 <= alphabet <= 256``).
A row either sums to exactly ``PROB_SCALE = 2**PROB_BITS`` (every symbol with a nonzero entry can be coded, with
probability ``freqs[t, s] / PROB_SCALE``) or is all zeros (a table that only empty lanes may use).

``PROB_BITS = 15`` (chosen by measurement, see ``docs/entropy.md``): tables taken from a profile rather than from
the data must give rare symbols room, and a symbol with probability 0.999 then costs 16% more than its entropy at
12 bits, 0.5% at 14 and 0.13% at 15; the price is under 0.001 bit per symbol of extra coding loss against 12-14
bits (the 32-bit state has ``L / PROB_SCALE = 2``). 15 is the largest precision that keeps a frequency in 16 bits
(a single-symbol table holds ``2**15``), which the coder's packed tables rely on.

Serialized tables (:func:`pack_tables`), per row, LEB128 varints::

    span                 number of symbols from the first to the last nonzero one; 0 = all-zero row (1 byte)
    lo                   first symbol with a nonzero frequency (only if span > 0); lo + span <= alphabet
    f[lo] .. f[hi-1]     span - 1 frequencies; f[lo] >= 1; the last one, f[hi] with hi = lo + span - 1,
                         is implied: PROB_SCALE - (sum of the others), and must be >= 1

The form is canonical: :func:`unpack_tables` rejects overlong varints, a zero first frequency, an implied last
frequency below 1, and trailing bytes, so every table set has exactly one serialization.

Escapes (:func:`split_escapes`): codecs whose values do not all fit an alphabet reserve its top symbol
``alphabet - 1`` as an escape. A value ``v`` with ``0 <= v < alphabet - 1`` is coded as the symbol ``v``; any other
value is coded as the symbol ``alphabet - 1`` and appended, as the raw int32, to a separate escape array (in symbol
order); how the codec stores that array is its own business. :func:`merge_escapes` inverts this and checks that the
number of escape symbols equals the number of escape values and that no escape value could have been coded directly.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from kvpack.errors import FormatError

PROB_BITS = 15
PROB_SCALE = 1 << PROB_BITS
MAX_ALPHABET = 256
MAX_ROW_TOTAL = 1 << 46  # keeps 2 * count * PROB_SCALE below 2**63 and counts exact in float64

__all__ = [
    "MAX_ALPHABET",
    "PROB_BITS",
    "PROB_SCALE",
    "counts_to_tables",
    "merge_escapes",
    "pack_tables",
    "quantize_freqs",
    "split_escapes",
    "unpack_tables",
    "validate_freqs",
]

# --------------------------------------------------------------------------------------------- LEB128 varints


@njit(nogil=True, cache=True)
def write_varint(out: np.ndarray, pos: int, value: int) -> int:
    """Write nonnegative ``value`` as LEB128 into ``out`` (uint8) at ``pos``; returns the position after it."""
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@njit(nogil=True, cache=True)
def read_varint(data: np.ndarray, pos: int, max_value: int) -> tuple[int, int]:
    """Read one canonical LEB128 varint from ``data`` (uint8) at ``pos``.

    Returns ``(value, new_pos)``; ``new_pos`` is -1 when the bytes are truncated, overlong (a final byte of zero
    after a continuation), longer than 9 bytes, or the value exceeds ``max_value``.
    """
    value = 0
    shift = 0
    for k in range(9):
        if pos + k >= data.shape[0]:
            return 0, -1
        b = int(data[pos + k])
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if (b == 0 and k > 0) or value > max_value:
                return 0, -1
            return value, pos + k + 1
        shift += 7
    return 0, -1


@njit(nogil=True, cache=True)
def encode_varints(values: np.ndarray) -> np.ndarray:
    """LEB128 encoding of nonnegative int64 ``values [n]``, back to back: uint8 ``[<= 9 n]``."""
    out = np.empty(9 * values.shape[0], np.uint8)
    pos = 0
    for v in values:
        pos = write_varint(out, pos, v)
    return out[:pos].copy()


@njit(nogil=True, cache=True)
def decode_varints(data: np.ndarray, pos: int, count: int, max_value: int) -> tuple[np.ndarray, int]:
    """Read ``count`` varints (each ``<= max_value``) from ``data`` at ``pos``: ``(int64 [count], new_pos)``.

    ``new_pos`` is -1 on malformed input (see :func:`read_varint`). The caller bounds ``count`` by the bytes left.
    """
    out = np.empty(count, np.int64)
    for k in range(count):
        out[k], pos = read_varint(data, pos, max_value)
        if pos < 0:
            break
    return out, pos


# --------------------------------------------------------------------------------------------- quantization


@njit(nogil=True, cache=True)
def _gain(c: float, f: int) -> float:
    """``c * ln((f + 1) / f)`` for ``f >= 1``: the series ``2 c (y + y^3/3 + y^5/5 + y^7/7)``, ``y = 1 / (2f + 1)``.

    Relative error below 2e-5 at ``f = 1`` and below 1e-9 from ``f = 4``; only ``+ * /``, so IEEE arithmetic makes
    it bit-identical on every machine (a libm ``log`` may differ in its last bit between platforms).
    """
    y = 1.0 / (2 * f + 1)
    y2 = y * y
    return 2.0 * c * y * (1.0 + y2 * (1.0 / 3.0 + y2 * (1.0 / 5.0 + y2 / 7.0)))


@njit(nogil=True, cache=True, inline="always")
def _rate(count: int, f: int, up_gain: np.ndarray, down_loss: np.ndarray, k: int) -> None:
    """Marginal gain and loss of used symbol ``k`` (``count`` occurrences) at frequency ``f``."""
    up_gain[k] = _gain(np.float64(count), f)
    if f >= 2:
        down_loss[k] = _gain(np.float64(count), f - 1)


@njit(nogil=True, cache=True)
def _quantize_row(c: np.ndarray, f: np.ndarray) -> None:
    """Quantize one row of counts ``c`` (int64[alphabet]) into ``f`` (uint32[alphabet], zeroed by the caller).

    Minimizes the coded size ``sum_s c[s] * -log2(f[s] / PROB_SCALE)`` subject to ``f[s] >= 1`` where ``c[s] > 0``
    and ``sum f = PROB_SCALE``. The objective is separable and convex in ``f``, so unit moves (greedy on the
    marginal gain :func:`_gain`), from the rounded proportional share until no move from one symbol to
    another pays, reach its optimum. The gains are kept per used symbol and recomputed only for the symbols a move
    changes: scanning all 256 symbols and recomputing two gains each per move had cost 12 us per table (1.5 ms of a
    256-token fp8 chunk's 120 tables).
    """
    a = c.shape[0]
    total = np.int64(0)
    nonzero = 0
    for s in range(a):
        total += c[s]
        if c[s] > 0:
            nonzero += 1
    if nonzero == 0:
        return
    used = np.empty(nonzero, np.int64)  # the symbols with a count, ascending (the scans' tie order)
    fs = np.empty(nonzero, np.int64)
    up_gain = np.empty(nonzero, np.float64)  # gain of one more unit for each used symbol
    down_loss = np.empty(nonzero, np.float64)  # loss of one unit less (only read where fs >= 2)
    placed = np.int64(0)
    k = 0
    for s in range(a):
        if c[s] > 0:
            used[k] = s
            fs[k] = max(np.int64(1), (2 * c[s] * PROB_SCALE + total) // (2 * total))  # nearest
            placed += fs[k]
            k += 1
    for k in range(nonzero):
        _rate(c[used[k]], fs[k], up_gain, down_loss, k)
    for _ in range(2 * PROB_SCALE + a):  # each move improves the objective; the bound only guards rounding
        # best increment: largest gain; best decrement: smallest loss, over f >= 2 (ties: lowest symbol)
        up = 0
        down = -1
        for k in range(nonzero):
            if up_gain[k] > up_gain[up]:
                up = k
            if fs[k] >= 2 and (down < 0 or down_loss[k] < down_loss[down]):
                down = k
        if placed < PROB_SCALE:
            fs[up] += 1
            placed += 1
            _rate(c[used[up]], fs[up], up_gain, down_loss, up)
        elif placed > PROB_SCALE:
            fs[down] -= 1
            placed -= 1
            _rate(c[used[down]], fs[down], up_gain, down_loss, down)
        elif down >= 0 and up != down and up_gain[up] > down_loss[down]:
            fs[up] += 1
            fs[down] -= 1
            _rate(c[used[up]], fs[up], up_gain, down_loss, up)
            _rate(c[used[down]], fs[down], up_gain, down_loss, down)
        else:
            break
    for k in range(nonzero):
        f[used[k]] = fs[k]


@njit(nogil=True, cache=True, parallel=True)
def _quantize_rows(counts: np.ndarray, out: np.ndarray) -> None:
    for t in prange(counts.shape[0]):
        _quantize_row(counts[t], out[t])


def quantize_freqs(counts: npt.ArrayLike) -> np.ndarray:
    """Quantize symbol counts to frequency tables that sum to ``PROB_SCALE``.

    Args:
        counts: nonnegative integers, shape ``[n_tables, alphabet]`` with ``1 <= alphabet <= 256``; each row's
            total must stay below ``2**46``.

    Returns:
        uint32 ``[n_tables, alphabet]``: every symbol with a nonzero count gets a frequency ``>= 1``, symbols with a
        zero count get 0, each row sums to exactly ``PROB_SCALE`` (a row with a single used symbol gives it all of
        it), and an all-zero row stays all zeros. The cost ``sum counts * -log2(freqs / PROB_SCALE)`` is the
        least any integer table reaches (up to a 2e-5 relative error in comparing marginal costs, see
        ``_gain``); bit-identical on every machine.
    """
    c = np.asarray(counts)
    if c.ndim != 2 or not 1 <= c.shape[1] <= MAX_ALPHABET:
        raise ValueError(f"counts must have shape [n_tables, alphabet] with 1 <= alphabet <= 256, got {c.shape}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got {c.dtype}")
    c = c.astype(np.int64)
    if c.size and c.min() < 0:
        raise ValueError("counts must be nonnegative")
    if c.size and c.sum(axis=1).max() >= MAX_ROW_TOTAL:
        raise ValueError("a row of counts totals 2**46 or more: scale the counts down (keeping nonzeros nonzero)")
    out = np.zeros(c.shape, np.uint32)
    _quantize_rows(c, out)
    return out


def counts_to_tables(symbols: npt.ArrayLike, lane_starts: npt.ArrayLike, alphabet: int) -> np.ndarray:
    """One table per lane, quantized from that lane's own symbol counts.

    Args:
        symbols: uint8 ``[N]``, every value ``< alphabet``.
        lane_starts: int64 ``[n_lanes + 1]``, non-decreasing, from 0 to ``N``.
        alphabet: 1..256.

    Returns:
        uint32 ``[n_lanes, alphabet]``; use it with ``lane_table = arange(n_lanes)``. Empty lanes get a zero row.
    """
    sym = np.asarray(symbols)
    starts = np.asarray(lane_starts, dtype=np.int64)
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be in 1..256, got {alphabet}")
    if sym.ndim != 1 or sym.dtype != np.uint8:
        raise ValueError("symbols must be a 1-D uint8 array")
    if starts.ndim != 1 or starts.size < 1 or starts[0] != 0 or starts[-1] != sym.size or np.any(np.diff(starts) < 0):
        raise ValueError("lane_starts must be non-decreasing from 0 to len(symbols)")
    if sym.size and int(sym.max()) >= alphabet:
        raise ValueError(f"a symbol is >= alphabet ({alphabet})")
    n_lanes = starts.size - 1
    lane_of = np.repeat(np.arange(n_lanes, dtype=np.int64), np.diff(starts))
    counts = np.bincount(lane_of * alphabet + sym, minlength=n_lanes * alphabet).reshape(n_lanes, alphabet)
    return quantize_freqs(counts)


def validate_freqs(freqs: npt.ArrayLike) -> np.ndarray:
    """Check a table array and return it as C-contiguous uint32 ``[n_tables, alphabet]``.

    Raises:
        FormatError: wrong shape, an entry outside ``0..PROB_SCALE``, or a row that neither sums to ``PROB_SCALE``
            nor is all zeros.
    """
    f = np.asarray(freqs)
    if f.ndim != 2 or not 1 <= f.shape[1] <= MAX_ALPHABET:
        raise FormatError(f"frequency tables must have shape [n_tables, alphabet <= 256], got {f.shape}")
    if f.size and not np.issubdtype(f.dtype, np.integer):
        raise FormatError(f"frequency tables must be integers, got {f.dtype}")
    out, bad, total = _checked(np.ascontiguousarray(f))
    if bad == -2:
        raise FormatError(f"a frequency lies outside 0..{PROB_SCALE}")
    if bad >= 0:
        raise FormatError(f"frequency table {bad} sums to {total}, not {PROB_SCALE} (or 0)")
    return out


@njit(nogil=True, cache=True)
def _checked(f):  # type: ignore[no-untyped-def]
    """:func:`validate_freqs`'s checks and conversion of integer ``f [n_tables, alphabet]`` in one pass (numpy's
    min, max, cast, row sums and comparisons: 0.060 -> 0.014 ms for 1,024 tables of 16 symbols, 0.042 -> 0.012 for
    120 of 256, microbenchmark; on one thread before every coder
    call): ``(uint32 copy, -1 or the first row whose sum is wrong or -2 if an entry is out of range, that sum)``."""
    n_tables, alphabet = f.shape
    out = np.empty((n_tables, alphabet), np.uint32)
    bad, total, outside = -1, 0, False
    for t in range(n_tables):
        row = 0
        for s in range(alphabet):
            v = f[t, s]
            outside |= v < 0 or v > PROB_SCALE
            out[t, s] = v
            row += np.int64(v)
        if row != PROB_SCALE and row != 0 and bad < 0:
            bad, total = t, row
    return out, -2 if outside else bad, total


# --------------------------------------------------------------------------------------------- serialization


@njit(nogil=True, cache=True)
def _pack_tables(freqs: np.ndarray) -> np.ndarray:
    n_tables, a = freqs.shape
    out = np.empty(n_tables * (2 + 3 * a) + 1, np.uint8)  # every varint here fits in 3 bytes
    pos = 0
    for t in range(n_tables):
        lo = 0
        while lo < a and freqs[t, lo] == 0:
            lo += 1
        if lo == a:
            pos = write_varint(out, pos, 0)
            continue
        hi = a - 1
        while freqs[t, hi] == 0:
            hi -= 1
        pos = write_varint(out, pos, hi - lo + 1)
        pos = write_varint(out, pos, lo)
        for s in range(lo, hi):
            pos = write_varint(out, pos, int(freqs[t, s]))
    return out[:pos].copy()


@njit(nogil=True, cache=True)
def _unpack_tables(data: np.ndarray, freqs: np.ndarray) -> int:
    """Parse ``data`` into the zeroed ``freqs``; returns 0, or 1 + the index of the first bad table."""
    n_tables, a = freqs.shape
    pos = 0
    for t in range(n_tables):
        span, pos = read_varint(data, pos, a)
        if pos < 0:
            return t + 1
        if span == 0:
            continue
        lo, pos = read_varint(data, pos, a - span)
        if pos < 0:
            return t + 1
        total = 0
        for s in range(lo, lo + span - 1):
            f, pos = read_varint(data, pos, PROB_SCALE - 1)
            if pos < 0 or (s == lo and f == 0):
                return t + 1
            total += f
            freqs[t, s] = f
        if total >= PROB_SCALE:
            return t + 1
        freqs[t, lo + span - 1] = PROB_SCALE - total
    return 0 if pos == data.shape[0] else n_tables + 1


def pack_tables(freqs: npt.ArrayLike) -> bytes:
    """Serialize valid tables ``[n_tables, alphabet]`` compactly (format in the module docstring).

    The shape is not stored: the reader passes it to :func:`unpack_tables`. Costs 1 byte per all-zero row and
    about 1-2 bytes per used symbol otherwise.
    """
    return _pack_tables(validate_freqs(freqs)).tobytes()


def unpack_tables(data: bytes | bytearray | memoryview, n_tables: int, alphabet: int) -> np.ndarray:
    """Inverse of :func:`pack_tables`: uint32 ``[n_tables, alphabet]``.

    Raises:
        FormatError: the bytes are not exactly ``n_tables`` canonical rows for this alphabet. Allocates at most
            ``n_tables * alphabet`` entries, and only after checking that ``data`` has a byte for every row.
    """
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise FormatError(f"table alphabet must be in 1..256, got {alphabet}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if n_tables < 0 or n_tables > raw.size:
        raise FormatError(f"{n_tables} frequency tables cannot fit in {raw.size} bytes")
    freqs = np.zeros((n_tables, alphabet), np.uint32)
    bad = _unpack_tables(raw, freqs)
    if bad == n_tables + 1:
        raise FormatError("trailing bytes after the frequency tables")
    if bad:
        raise FormatError(f"frequency table {bad - 1} is truncated or malformed")
    return freqs


# --------------------------------------------------------------------------------------------- escapes


def split_escapes(values: npt.ArrayLike, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """Map int32 ``values [N]`` onto ``alphabet`` symbols with an escape (scheme in the module docstring).

    Returns:
        ``(symbols, escapes)``: uint8 ``[N]`` with every entry ``< alphabet``, and int32 ``[E]``, the values that
        took the escape symbol ``alphabet - 1``, in order.
    """
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet must be in 1..256, got {alphabet}")
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype != np.int32:
        raise ValueError("values must be a 1-D int32 array")
    esc = (v < 0) | (v >= alphabet - 1)
    symbols = np.where(esc, alphabet - 1, v).astype(np.uint8)
    return symbols, v[esc].copy()


def merge_escapes(symbols: npt.ArrayLike, escapes: npt.ArrayLike, alphabet: int) -> np.ndarray:
    """Inverse of :func:`split_escapes`: int32 ``[N]``.

    Raises:
        FormatError: a symbol ``>= alphabet``, a count of escape symbols other than ``len(escapes)``, or an escape
            value inside ``0 .. alphabet - 2`` (it would have been coded directly).
    """
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise FormatError(f"alphabet must be in 1..256, got {alphabet}")
    s = np.asarray(symbols)
    e = np.asarray(escapes)
    if s.ndim != 1 or s.dtype != np.uint8 or e.ndim != 1 or e.dtype != np.int32:
        raise FormatError("symbols must be 1-D uint8 and escapes 1-D int32")
    if s.size and int(s.max()) >= alphabet:
        raise FormatError(f"a symbol is >= alphabet ({alphabet})")
    esc = s == alphabet - 1
    n_esc = int(np.count_nonzero(esc))
    if n_esc != e.size:
        raise FormatError(f"{n_esc} escape symbols but {e.size} escape values")
    if np.any((e >= 0) & (e < alphabet - 1)):
        raise FormatError("an escape value lies inside the alphabet")
    values = s.astype(np.int32)
    values[esc] = e
    return values
