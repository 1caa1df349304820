"""Building blocks shared by the codecs: symbol rows coded with rANS under per-class tables, float rounding.

**Symbol rows.** The codecs turn a KV cache into rows of small integer symbols, one row per
``(layer, K/V, head, channel)`` running over the tokens (``[n_groups, rows, tokens]`` with ``n_groups = 2 *
num_layers`` and ``rows = num_kv_heads * head_dim``). Channels differ in their statistics, but a table per row costs
far too much to store (about 50 bytes for an exponent table, measured on SmolLM2's KV, 0.25 bit per element at 1536
tokens and 0.8 at 256), while one table per group misses the differences. :func:`encode_rows` finds, per group,
``n_classes`` tables by clustering the rows' symbol histograms (a few rounds of k-means under the coded size) and
codes every row with its class's table; the class of each row is stored in ``log2(n_classes)`` bits.

Stream layout: rows are sorted (stably) by ``(group, class)``; consecutive rows of the same class are cut into rANS
lanes of ``ceil(LANE_SYMBOLS / tokens)`` rows (lanes of a few thousand symbols keep the per-lane flush below 1%);
lane tables are ``group * n_classes + class``. The blob (:func:`kvpack.entropy.pack`, tables included) is followed
by nothing else; the class ids travel separately (:func:`pack_classes`). The decoder gets the symbols back in the
sorted order plus the offset of every row in it, so a codec's reconstruction kernel reads row ``r`` at
``symbols[row_offset[r] : row_offset[r] + tokens]`` without a permutation copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch
from numba import njit, prange

from kvpack.codecs.clusters import RowCounts, assign_classes
from kvpack.codecs.validate import Size, exact
from kvpack.entropy import MIN_PACKED_BYTES, max_packed_bytes, pack, parse, quantize_freqs
from kvpack.entropy.rans import LaneStream, decode_lanes
from kvpack.errors import FormatError
from kvpack.kv import KVCache
from kvpack.spec import DTYPES

#: Below this many elements a chunk is coded on one thread: waking numba's workers costs milliseconds on a busy
#: machine, more than the work itself.
PARALLEL_MIN_ELEMENTS = 1 << 18
#: Target symbols per rANS lane: a lane pays ~6 bytes (final state and word count), < 1% of 4K symbols.
LANE_SYMBOLS = 4096
#: Allowed numbers of class tables per group (a power of two, so class ids pack into whole bits).
CLASS_CHOICES = (1, 2, 4, 8, 16)


@contextmanager
def threads_for(elements: int) -> Iterator[None]:
    """Run the numba kernels inside on one thread when ``elements`` is below :data:`PARALLEL_MIN_ELEMENTS`."""
    if elements >= PARALLEL_MIN_ELEMENTS:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def tile_span(tiles: np.ndarray) -> tuple[np.ndarray, int]:
    """``tiles [n, rows, cols]`` for numba kernels that read or write each tile as a contiguous ``[rows, cols]``
    block: the memory from the first tile's first element to the last tile's last as one contiguous 1-D array, and
    the tile stride in elements. A view (writes reach ``tiles``) when each tile is contiguous, whatever the stride
    between tiles; a contiguous copy otherwise.

    A token slice of a longer cache (what a chunk encodes from, what the loader decodes into) has contiguous tiles
    further apart than a tile's size. numba compiles its kernels for such an array as non-contiguous, and loses the
    vector moves of their inner loops: scattering a 256-token chunk of SmolLM2 into a slice took 2.0-2.1 ms against
    1.2-1.4 ms into a buffer of its own (in-process A/B on the 2-core Xeon). A tile sliced out of the span is a
    contiguous array to numba."""
    n, rows, cols = tiles.shape
    item = tiles.itemsize
    strides = tiles.strides
    if tiles.size and ((cols > 1 and strides[2] != item) or (rows > 1 and strides[1] != cols * item)
                       or (n > 1 and (strides[0] < rows * cols * item or strides[0] % item))):
        tiles = np.ascontiguousarray(tiles)
    stride = tiles.strides[0] // item if n > 1 else rows * cols
    size = (n - 1) * stride + rows * cols if tiles.size else 0
    return np.lib.stride_tricks.as_strided(tiles, shape=(size,), strides=(item,)), stride


def check_classes(n_classes: int) -> None:
    """Validate a codec's ``classes`` parameter (``ValueError`` with the allowed values)."""
    if n_classes not in CLASS_CHOICES:
        raise ValueError(f"classes must be one of {CLASS_CHOICES}, got {n_classes!r}")


def _class_bits(n_classes: int) -> int:
    return n_classes.bit_length() - 1


def pack_classes(classes: np.ndarray, n_classes: int) -> bytes:
    """Class ids (uint8, each ``< n_classes``) in ``log2(n_classes)`` bits each, most significant bit first."""
    bits = _class_bits(n_classes)
    if bits == 0:
        return b""
    flat = classes.reshape(-1)
    planes = np.empty((flat.size, bits), np.uint8)  # bit planes by column: a broadcast shift to [n, bits] and its
    for b in range(bits):  # cast took 0.25 ms for 23,040 2-bit ids (unpack's sum along the short axis 0.50)
        np.bitwise_and(flat >> (bits - 1 - b), 1, out=planes[:, b])
    return np.packbits(planes.reshape(-1)).tobytes()


def unpack_classes(data: bytes | memoryview, n_rows: int, n_classes: int) -> np.ndarray:
    """Inverse of :func:`pack_classes`: uint8 ``[n_rows]``; a wrong length is a :class:`FormatError`."""
    bits = _class_bits(n_classes)
    expected = (n_rows * bits + 7) // 8
    if len(data) != expected:
        raise FormatError(f"class section has {len(data)} bytes, expected {expected} for {n_rows} rows")
    if bits == 0:
        return np.zeros(n_rows, np.uint8)
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=n_rows * bits).reshape(n_rows, bits)
    out = planes[:, 0].copy()
    for b in range(1, bits):  # column by column, as pack_classes
        out <<= 1
        out |= planes[:, b]
    return out


def row_layout(classes: np.ndarray, n_groups: int, n_classes: int, tokens: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stream layout (module docstring) of the rows of ``n_groups`` groups with class ids ``classes`` (uint8
    ``[n_groups * rows]``, each ``< n_classes``: :func:`unpack_classes` and :func:`assign_classes` ensure it) and
    ``tokens`` symbols each.

    Returns:
        ``(order, row_offset, lane_starts, lane_table)``: the rows (flat index) sorted stably by ``(group, class)``,
        int64 ``[n_rows]``; where row ``r`` starts in the sorted symbols, int64 ``[n_rows]``; the lane starts in
        symbols, int64 ``[n_lanes + 1]``; the lane tables ``group * n_classes + class``, int32 ``[n_lanes]``.
    """
    per_lane = max(1, -(-LANE_SYMBOLS // max(tokens, 1)))
    flat = np.ascontiguousarray(classes.reshape(-1), dtype=np.uint8)
    return _row_layout(flat, max(n_groups, 1), n_classes, tokens, per_lane)


@njit(nogil=True, cache=True)
def _row_layout(classes, n_groups, n_classes, tokens, per_lane):  # type: ignore[no-untyped-def]
    """:func:`row_layout` in one pass per group: a counting sort by class (stable), lanes of ``per_lane`` rows cut
    from each run of one class. One compiled pass instead of a dozen numpy calls (a stable argsort, run detection,
    a scatter), which cost a tenth of a 256-token fp8 decode."""
    n_rows = classes.size
    rows = n_rows // n_groups
    order = np.empty(n_rows, np.int64)
    row_offset = np.empty(n_rows, np.int64)
    lane_first = np.empty(n_rows + 1, np.int64)
    lane_table = np.empty(n_rows, np.int32)
    count = np.empty(n_classes, np.int64)
    n_lanes = 0
    for g in range(n_groups):
        count[:] = 0
        for r in range(g * rows, (g + 1) * rows):
            count[classes[r]] += 1
        at = g * rows  # sorted position of the group's first row; then of each class's next row
        for c in range(n_classes):
            for i in range(0, count[c], per_lane):
                lane_first[n_lanes] = at + i
                lane_table[n_lanes] = g * n_classes + c
                n_lanes += 1
            at, count[c] = at + count[c], at
        for r in range(g * rows, (g + 1) * rows):
            p = count[classes[r]]
            count[classes[r]] = p + 1
            order[p] = r
            row_offset[r] = p * tokens
    lane_first[n_lanes] = n_rows
    return order, row_offset, lane_first[: n_lanes + 1] * tokens, lane_table[:n_lanes].copy()


def encode_rows(symbols: np.ndarray, alphabet: int, n_classes: int) -> tuple[bytes, bytes]:
    """Entropy-code symbol rows with per-class tables.

    Args:
        symbols: uint8 ``[n_groups, rows, tokens]``, every value ``< alphabet``.
        alphabet: 1..256.
        n_classes: tables per group, one of :data:`CLASS_CHOICES`.

    Returns:
        ``(blob, classes)``: the rANS blob (tables included) and the packed class ids of the rows.
    """
    n_groups, rows, tokens = symbols.shape
    flat = symbols.reshape(n_groups * rows, tokens)
    hist = RowCounts.of(symbols, alphabet)
    classes, sums = assign_classes(hist, n_classes)
    counts = sums.reshape(-1, alphabet)
    order, _, starts, lane_table = row_layout(classes, n_groups, n_classes, tokens)
    stream = np.empty(flat.size, np.uint8)  # numpy: huge pages for a large array
    _gather_rows(flat, order, stream)
    blob = pack(stream, starts, lane_table, quantize_freqs(counts))
    return blob, pack_classes(classes, n_classes)


@njit(nogil=True, cache=True, parallel=True)
def _gather_rows(flat, order, out):  # type: ignore[no-untyped-def]
    """``out = flat[order].reshape(-1)`` for ``flat [rows, tokens]`` (uint8), the rows copied in parallel (numpy's
    fancy indexing runs on one thread: 0.70 -> 0.37 ms for a 256-token kivi chunk's symbols, microbenchmark)."""
    rows, tokens = flat.shape
    for r in prange(rows):
        out[r * tokens : (r + 1) * tokens] = flat[order[r]]


def decode_rows(blob: bytes | memoryview, classes: bytes | memoryview, shape: tuple[int, int, int], alphabet: int,
                n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_rows`.

    Args:
        blob, classes: the two byte strings :func:`encode_rows` returned.
        shape: ``(n_groups, rows, tokens)`` the caller expects.
        alphabet, n_classes: as encoded.

    Returns:
        ``(symbols, row_offset)``: uint8 ``[n_groups * rows * tokens]`` in the stream's row order, and int64
        ``[n_groups * rows]``, where row ``r`` (flat ``group * rows + row``) starts in ``symbols``.

    Raises:
        FormatError: a blob that is not exactly ``n_groups * rows * tokens`` symbols of this alphabet, coded with
            ``n_groups * n_classes`` tables in the lanes the class ids imply (the encoder's layout: any other lane
            layout could make the decoder rebuild a table per lane), or a class section of the wrong size.
    """
    stream, row_offset = rows_stream(blob, classes, shape, alphabet, n_classes)
    symbols = decode_lanes(stream.words, stream.word_offsets, stream.lane_starts, stream.lane_table, stream.freqs)
    return symbols, row_offset


def rows_stream(blob: bytes | memoryview, classes: bytes | memoryview, shape: tuple[int, int, int], alphabet: int,
                n_classes: int) -> tuple[LaneStream, np.ndarray]:
    """:func:`decode_rows` up to the lane decoding (shared with the GPU decoders): the parsed, checked stream and
    ``row_offset``; same arguments and errors."""
    n_groups, rows, tokens = shape
    n_rows = n_groups * rows
    total = n_rows * tokens
    cls = unpack_classes(classes, n_rows, n_classes)
    stream = parse(blob, max_symbols=total, tables=(n_groups * n_classes, alphabet))
    _, row_offset, starts, lane_table = row_layout(cls, n_groups, n_classes, tokens)
    if not (np.array_equal(stream.lane_starts, starts) and np.array_equal(stream.lane_table, lane_table)):
        raise FormatError(f"symbol stream's lanes do not match the {n_rows} rows of {tokens} symbols and their "
                          "classes: the stream is corrupted")
    return stream, row_offset


def rows_sizes(shape: tuple[int, int, int], alphabet: int, n_classes: int, prefix: str = "") -> dict[str, Size]:
    """Byte lengths of the ``classes`` (exact) and ``symbols`` (bounded) sections :func:`encode_rows` writes for
    symbols ``[n_groups, rows, tokens]`` (named ``prefix + name``)."""
    n_groups, rows, tokens = shape
    n_rows = n_groups * rows
    return {f"{prefix}classes": exact((n_rows * _class_bits(n_classes) + 7) // 8),
            f"{prefix}symbols": Size(MIN_PACKED_BYTES, max_packed_bytes(n_rows * tokens, n_rows,
                                                                        n_groups * n_classes, alphabet))}


#: Output float layouts of :func:`float_bits`: the KV dtypes, each written as its bit pattern.
OUT_KINDS = {"float32": 0, "bfloat16": 1, "float16": 2}
#: Tokens a decoder transposes from symbol rows to ``[token, channel]`` at a time (64 channels x 64 tokens: 4 KiB of
#: symbols, in L1), so that it computes and writes over contiguous channels (:mod:`kvpack.codecs.fp8`, ``kivi``).
BLOCK_TOKENS = 64


_M1, _M2, _M4 = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF), np.uint64(0x00000000FFFFFFFF)
_S1, _S2, _S4 = np.uint64(8), np.uint64(16), np.uint64(32)


@njit(nogil=True, cache=True, inline="always")
def _swaps(a0, a1, a2, a3, b0, b1, b2, b3, s, m):  # type: ignore[no-untyped-def]
    """Swap the bytes of ``ai`` above ``m`` (shifted down by ``s`` bits) with those of ``bi`` under ``m``, i = 0..3."""
    t0, t1, t2, t3 = ((a0 >> s) ^ b0) & m, ((a1 >> s) ^ b1) & m, ((a2 >> s) ^ b2) & m, ((a3 >> s) ^ b3) & m
    return a0 ^ (t0 << s), a1 ^ (t1 << s), a2 ^ (t2 << s), a3 ^ (t3 << s), b0 ^ t0, b1 ^ t1, b2 ^ t2, b3 ^ t3


@njit(nogil=True, cache=True, inline="always")
def transpose8(x0, x1, x2, x3, x4, x5, x6, x7):  # type: ignore[no-untyped-def]
    """The 8 x 8 byte matrix whose row ``j`` is the little-endian bytes of uint64 ``xj``, transposed: byte ``j`` of
    result ``k`` is byte ``k`` of ``xj``. Three rounds of masked swaps of 1-, 2- and 4-byte blocks between rows 1, 2
    and 4 apart (Warren, "Hacker's Delight", 7-3): 12 swaps for 64 bytes, where a byte-by-byte transpose moves each
    byte alone."""
    x0, x2, x4, x6, x1, x3, x5, x7 = _swaps(x0, x2, x4, x6, x1, x3, x5, x7, _S1, _M1)
    x0, x1, x4, x5, x2, x3, x6, x7 = _swaps(x0, x1, x4, x5, x2, x3, x6, x7, _S2, _M2)
    x0, x1, x2, x3, x4, x5, x6, x7 = _swaps(x0, x1, x2, x3, x4, x5, x6, x7, _S4, _M4)
    return x0, x1, x2, x3, x4, x5, x6, x7


@njit(nogil=True, cache=True, inline="always")
def symbol_block(dim):  # type: ignore[no-untyped-def]
    """A block of symbols for :func:`rows_to_block` / :func:`block_to_rows`, ``(q, q64)``: uint8 ``[BLOCK_TOKENS,
    8 * ceil(dim / 8)]`` (channel ``c`` of token ``i`` at ``q[i, c]``; the columns past ``dim`` pad the rows to
    whole words) and its uint64 view ``[BLOCK_TOKENS, ceil(dim / 8)]``. Contiguous, so that numba compiles the
    loops over a row's channels for a contiguous array (a ``[:, :dim]`` slice of it is not)."""
    q64 = np.empty((BLOCK_TOKENS, (dim + 7) // 8), np.uint64)
    return q64.view(np.uint8), q64


@njit(nogil=True, cache=True, inline="always")
def _word_aligned(wide, offs, i0, n):  # type: ignore[no-untyped-def]
    """Whether rows ``offs[c] + i0`` (``c < dim``) of ``n`` symbols each move as words: ``wide`` is not empty and
    every row start, ``n`` and ``dim`` are multiples of 8."""
    aligned = wide.size > 0 and n % 8 == 0 and offs.size % 8 == 0
    for c in range(offs.size):
        aligned &= (offs[c] + i0) % 8 == 0
    return aligned


@njit(nogil=True, cache=True, inline="always")
def rows_to_block(symbols, wide, offs, i0, n, q, q64):  # type: ignore[no-untyped-def]
    """``q[i, c] = symbols[offs[c] + i0 + i]`` for ``i < n`` and every channel ``c`` (``q``: uint8 ``[BLOCK_TOKENS,
    dim]``, ``q64`` its uint64 view ``[BLOCK_TOKENS, dim // 8]``): the symbol rows of a block, transposed to
    ``[token, channel]``. ``wide``: ``symbols`` as uint64 (empty where they do not divide into words); where every
    row's start, ``n`` and ``dim`` are multiples of 8, eight channels by eight tokens move as words through
    :func:`transpose8`."""
    dim = offs.size
    if _word_aligned(wide, offs, i0, n):
        for c8 in range(0, dim, 8):
            for i8 in range(0, n, 8):
                y = transpose8(wide[(offs[c8] + i0 + i8) >> 3], wide[(offs[c8 + 1] + i0 + i8) >> 3],
                               wide[(offs[c8 + 2] + i0 + i8) >> 3], wide[(offs[c8 + 3] + i0 + i8) >> 3],
                               wide[(offs[c8 + 4] + i0 + i8) >> 3], wide[(offs[c8 + 5] + i0 + i8) >> 3],
                               wide[(offs[c8 + 6] + i0 + i8) >> 3], wide[(offs[c8 + 7] + i0 + i8) >> 3])
                for t in range(8):
                    q64[i8 + t, c8 >> 3] = y[t]
        return
    for c in range(dim):
        row = symbols[offs[c] + i0 : offs[c] + i0 + n]
        for i in range(n):
            q[i, c] = row[i]


@njit(nogil=True, cache=True, inline="always")
def block_to_rows(q, q64, i0, n, symbols, wide, offs):  # type: ignore[no-untyped-def]
    """Inverse of :func:`rows_to_block`: ``symbols[offs[c] + i0 + i] = q[i, c]`` for ``i < n`` and every channel
    ``c``, as words through :func:`transpose8` under the same conditions."""
    dim = offs.size
    if _word_aligned(wide, offs, i0, n):
        for c8 in range(0, dim, 8):
            for i8 in range(0, n, 8):
                y = transpose8(q64[i8, c8 >> 3], q64[i8 + 1, c8 >> 3], q64[i8 + 2, c8 >> 3], q64[i8 + 3, c8 >> 3],
                               q64[i8 + 4, c8 >> 3], q64[i8 + 5, c8 >> 3], q64[i8 + 6, c8 >> 3], q64[i8 + 7, c8 >> 3])
                for j in range(8):
                    wide[(offs[c8 + j] + i0 + i8) >> 3] = y[j]
        return
    for c in range(dim):
        row = symbols[offs[c] + i0 : offs[c] + i0 + n]
        for i in range(n):
            row[i] = q[i, c]


def as_words(symbols: np.ndarray) -> np.ndarray:
    """``symbols`` (uint8, contiguous) as uint64 words for :func:`rows_to_block`, or an empty array where its size or
    address does not allow it."""
    if symbols.size % 8 or symbols.ctypes.data % 8:
        return np.zeros(0, np.uint64)
    return symbols.view(np.uint64)


@njit(nogil=True, cache=True, inline="always")
def f32_to_bf16_bits(u: int) -> int:
    """bfloat16 bits of the float32 with bits ``u``, rounded to nearest even as torch does; NaN stays a quiet NaN."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 0x40) & 0xFFFF
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


@njit(nogil=True, cache=True, inline="always")
def f32_to_f16_bits(u: int) -> int:
    """float16 bits of the float32 with bits ``u``, rounded to nearest even (subnormals, overflow to inf, NaN)."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # 65520 and above round to inf
        return sign | 0x7C00
    if a >= 0x38800000:  # normal: rebias the exponent, round the 13 dropped bits to nearest even
        r = a - 0x38000000
        return sign | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    if a < 0x33000000:  # below half the smallest subnormal
        return sign
    shift = 126 - (a >> 23)  # subnormal: the value in units of 2**-24 is m >> shift
    m = (a & 0x7FFFFF) | 0x800000
    r = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    return sign | (r + ((rem > half) | ((rem == half) & (r & 1))))


@njit(nogil=True, cache=True, inline="always")
def float_bits(u: int, kind: int) -> int:
    """The float32 with bits ``u`` as the bits of output kind ``kind`` (:data:`OUT_KINDS`), rounded to nearest even.

    Pass ``kind`` as a compile-time constant (a closure variable of a kernel factory) so the branch folds away.
    """
    if kind == 1:
        return f32_to_bf16_bits(u)
    if kind == 2:
        return f32_to_f16_bits(u)
    return u


def stacked_float32(kv: KVCache) -> np.ndarray:
    """Keys and values of every layer as one float32 array ``[2 * num_layers * num_kv_heads, tokens, head_dim]``
    (tiles ordered layer, K/V, head); exact for every KV dtype, numpy only (no torch thread pool)."""
    spec = kv.spec
    shape = (2 * spec.num_layers * spec.num_kv_heads, kv.num_tokens, spec.head_dim)
    if kv.spec.dtype == "bfloat16":  # one pass from the (maybe strided: a chunk of a longer cache) buffer
        # numpy allocates the result: it asks the kernel for huge pages on large arrays, numba's allocator does not
        # (a 1536-token SmolLM2 prefix: 14-18 -> 4-7 ms, the difference in page faults)
        out = np.empty((shape[0], shape[1] * shape[2]), np.uint32)
        _widen_bf16(*tile_span(kv.data.view(torch.int16).numpy().view(np.uint16).reshape(shape)), out)
        return out.reshape(shape).view(np.float32)
    if kv.spec.dtype == "float16":
        return kv.data.numpy().reshape(shape).astype(np.float32)
    return kv.tiles().numpy()


@njit(nogil=True, cache=True, parallel=True)
def _widen_bf16(span: np.ndarray, stride: int, out: np.ndarray) -> None:
    """``out [tiles, tokens * dim]`` (uint32, the float32 bits) of bfloat16 bits (uint16, the tiles of ``span`` at
    ``stride``: :func:`tile_span`): the bits shifted up."""
    tiles, size = out.shape
    for tile in prange(tiles):
        halves = span[tile * stride : tile * stride + size]
        row = out[tile]
        for i in range(size):
            row[i] = np.uint32(halves[i]) << 16


def out_buffer(shape: tuple[int, ...], dtype: str, out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """The tensor a CPU decoder fills, ``shape = [..., tokens, dim]`` in KV dtype ``dtype``, and its bits as tiles.

    ``out`` itself when given (same element count and dtype) and each of its ``[tokens, dim]`` tiles is contiguous
    (a token slice of a longer cache is): the decoder then writes the loader's buffer in place, instead of a tensor of
    its own that the caller copies (6 MB per 256-token SmolLM2 chunk); a new uninitialised tensor otherwise.

    Returns:
        ``(tensor, tiles, span, stride)``: the tensor; its bits (uint16 / uint32) as a numpy view ``[n, tokens, dim]``
        with the tensor's strides; and the same tiles as :func:`tile_span` gives them to kernels (a view).
    """
    if out is not None and out.device.type == "cpu" and out.dtype == DTYPES[dtype] and out.shape[-2:] == shape[-2:] \
            and out.numel() == np.prod(shape):
        viewed = bit_tiles(out)
        if viewed is not None:
            return (out, *viewed)
    data = torch.empty(shape, dtype=DTYPES[dtype])
    viewed = bit_tiles(data)
    assert viewed is not None  # a new contiguous tensor always has contiguous tiles
    return (data, *viewed)


def bit_tiles(data: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int] | None:
    """A CPU tensor ``[..., tokens, dim]`` (2- or 4-byte elements) as numba kernels write it in place: its bits
    (uint16 / uint32) as tiles ``[n, tokens, dim]`` and their :func:`tile_span`, all views of ``data``; None if no view
    expresses them (tiles that are not contiguous each, or leading dimensions that do not merge)."""
    wide = data.element_size() == 4
    try:
        merged = data.view(math.prod(data.shape[:-2]), *data.shape[-2:])
    except RuntimeError:
        return None
    tiles = merged.view(torch.int32 if wide else torch.int16).numpy().view(np.uint32 if wide else np.uint16)
    span, stride = tile_span(tiles)
    return (tiles, span, stride) if not tiles.size or np.may_share_memory(span, tiles) else None


__all__ = [
    "BLOCK_TOKENS",
    "CLASS_CHOICES",
    "LANE_SYMBOLS",
    "OUT_KINDS",
    "as_words",
    "bit_tiles",
    "block_to_rows",
    "check_classes",
    "decode_rows",
    "encode_rows",
    "f32_to_bf16_bits",
    "f32_to_f16_bits",
    "float_bits",
    "out_buffer",
    "pack_classes",
    "rows_sizes",
    "rows_stream",
    "rows_to_block",
    "stacked_float32",
    "symbol_block",
    "threads_for",
    "transpose8",
    "unpack_classes",
]
