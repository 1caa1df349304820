"""The stream layout of symbol rows (:func:`kvpack.codecs.common.row_layout`) and the packing of their class ids
(``pack_classes``) against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.common import CLASS_CHOICES, LANE_SYMBOLS, pack_classes, row_layout, unpack_classes
from kvpack.errors import FormatError


def _definition(classes: np.ndarray, n_groups: int, n_classes: int, tokens: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The layout as the module docstring states it, in numpy: rows sorted stably by ``(group, class)``, each run of
    one table cut into lanes of ``ceil(LANE_SYMBOLS / tokens)`` rows."""
    n_rows = classes.size
    rows = n_rows // max(n_groups, 1)
    key = np.repeat(np.arange(n_groups, dtype=np.int64), rows) * n_classes + classes.astype(np.int64)
    order = np.argsort(key, kind="stable")
    keys = key[order]
    per_lane = max(1, -(-LANE_SYMBOLS // max(tokens, 1)))
    run_start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if n_rows else np.zeros(0, np.int64)
    position = np.arange(n_rows) - np.repeat(run_start, np.diff(np.r_[run_start, n_rows]))
    first = np.flatnonzero(position % per_lane == 0)
    row_offset = np.empty(n_rows, np.int64)
    row_offset[order] = np.arange(n_rows, dtype=np.int64) * tokens
    return order, row_offset, np.r_[first, n_rows].astype(np.int64) * tokens, keys[first].astype(np.int32)


@settings(max_examples=200, deadline=None)
@given(n_groups=st.integers(0, 5), rows=st.integers(0, 40), n_classes=st.sampled_from(CLASS_CHOICES),
       tokens=st.sampled_from([0, 1, 7, 256, 1536, 5000]), seed=st.integers(0, 2**32 - 1))
def test_row_layout_is_its_definition(n_groups: int, rows: int, n_classes: int, tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    skew = rng.dirichlet(np.full(n_classes, 0.3))  # some classes empty or dominant, as k-means leaves them
    classes = rng.choice(n_classes, size=n_groups * rows, p=skew).astype(np.uint8)
    got = row_layout(classes, n_groups, n_classes, tokens)
    want = _definition(classes, n_groups, n_classes, tokens)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_long_runs_are_cut_into_lanes() -> None:
    tokens = 256  # 16 rows per lane
    classes = np.array([0] * 40 + [1] * 3 + [0] * 5, np.uint8)  # one group: class 0 has 45 rows, class 1 three
    order, row_offset, starts, lane_table = row_layout(classes, 1, 2, tokens)
    assert list(starts // tokens) == [0, 16, 32, 45, 48] and list(lane_table) == [0, 0, 0, 1]
    assert list(order[:45]) == list(range(40)) + list(range(43, 48)) and list(order[45:]) == [40, 41, 42]
    assert row_offset[40] == 45 * tokens and row_offset[43] == 40 * tokens


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CLASS_CHOICES), st.integers(0, 300), st.data())
def test_class_ids_pack_msb_first_and_back(n_classes: int, n_rows: int, data: st.DataObject) -> None:
    """Each id in log2(n_classes) bits, most significant first, the bit string packed MSB first (np.packbits);
    unpacking returns the ids, and a section of the wrong length is a FormatError."""
    classes = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n_rows, max_size=n_rows)),
                       np.uint8)
    bits = n_classes.bit_length() - 1
    want = "".join(format(int(c), f"0{bits}b") for c in classes) if bits else ""
    packed = pack_classes(classes, n_classes)
    assert "".join(format(b, "08b") for b in packed)[: len(want)] == want
    assert len(packed) == (n_rows * bits + 7) // 8
    np.testing.assert_array_equal(unpack_classes(packed, n_rows, n_classes), classes)
    with pytest.raises(FormatError, match="class section"):
        unpack_classes(packed + b"\0", n_rows, n_classes)
