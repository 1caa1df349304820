"""kvpack.codecs.common.rows_to_block and block_to_rows: symbol rows to a [token, channel] block and back, by words
where aligned, else bytes."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from kvpack.codecs.common import as_words, block_to_rows, rows_to_block, symbol_block


@njit
def _block(symbols, wide, offs, i0, n):  # type: ignore[no-untyped-def]
    q, q64 = symbol_block(offs.size)
    rows_to_block(symbols, wide, offs, i0, n, q, q64)
    return q[:n, : offs.size].copy()  # the columns past dim pad the rows to words


@njit
def _rows(block, symbols, wide, offs, i0):  # type: ignore[no-untyped-def]
    q, q64 = symbol_block(offs.size)
    q[: block.shape[0], : offs.size] = block
    block_to_rows(q, q64, i0, block.shape[0], symbols, wide, offs)


@pytest.mark.parametrize(("count", "dim", "i0", "n"), [
    (256, 64, 0, 64), (256, 64, 64, 64), (256, 64, 224, 32),  # aligned: words
    (252, 64, 0, 64), (256, 64, 4, 60), (256, 12, 0, 64), (256, 64, 0, 13), (9, 8, 1, 8),  # bytes
])
def test_block_is_the_rows_transposed(count: int, dim: int, i0: int, n: int) -> None:
    rng = np.random.default_rng([count, dim, i0, n])
    rows = 3 * dim
    symbols = rng.integers(0, 256, rows * count).astype(np.uint8)
    offs = (rng.permutation(rows)[:dim] * count).astype(np.int64)  # a tile's rows, anywhere in the stream
    want = symbols[offs[:, None] + i0 + np.arange(n)[None, :]].T
    for wide in (as_words(symbols), np.zeros(0, np.uint64)):
        np.testing.assert_array_equal(_block(symbols, wide, offs, i0, n), want)
        # and back: the block written into rows of a copy changes exactly those positions
        block = rng.integers(0, 256, (n, dim)).astype(np.uint8)
        written = symbols.copy()
        _rows(block, written, as_words(written) if wide.size else wide, offs, i0)
        expected = symbols.copy()
        expected[offs[:, None] + i0 + np.arange(n)[None, :]] = block.T
        np.testing.assert_array_equal(written, expected)


def test_words_only_where_size_and_address_allow() -> None:
    buffer = np.zeros(80, np.uint8)
    assert as_words(buffer).size == 10
    assert as_words(buffer[1:73]).size == 0  # misaligned
    assert as_words(buffer[:12]).size == 0  # not a whole number of words
