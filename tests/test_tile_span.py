"""`kvpack.codecs.common.tile_span`: strided tiles as one contiguous span for the numba kernels."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.common import tile_span


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5), rows=st.integers(0, 6), cols=st.integers(1, 5), before=st.integers(0, 4),
       after=st.integers(0, 4))
def test_tiles_of_a_longer_buffer_are_a_view(n: int, rows: int, cols: int, before: int, after: int) -> None:
    parent = np.arange(n * (before + rows + after) * cols, dtype=np.uint16).reshape(n, before + rows + after, cols)
    tiles = parent[:, before : before + rows]  # a token slice of a longer cache, per head
    span, stride = tile_span(tiles)
    assert span.flags.c_contiguous and span.ndim == 1
    for i in range(n):
        assert np.array_equal(span[i * stride : i * stride + rows * cols].reshape(rows, cols), tiles[i])
    if tiles.size:
        assert np.shares_memory(span, parent)  # no copy: the kernels' writes reach the tiles
        first = int(tiles[n - 1, 0, 0])
        span[(n - 1) * stride] += 1
        assert tiles[n - 1, 0, 0] == first + 1


def test_tiles_that_are_not_contiguous_are_copied() -> None:
    tiles = np.arange(2 * 3 * 4, dtype=np.uint32).reshape(2, 4, 3).transpose(0, 2, 1)  # channels strided
    span, stride = tile_span(tiles)
    assert stride == 12 and not np.shares_memory(span, tiles)
    assert np.array_equal(span.reshape(2, 3, 4), tiles)
