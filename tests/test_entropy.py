"""Interleaved rANS (kvpack.entropy): exact round trips, typed errors on bad bytes, tables, escapes, an oracle."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpack.entropy import (
    PROB_BITS,
    PROB_SCALE,
    counts_to_tables,
    decode_lanes,
    encode_lanes,
    merge_escapes,
    pack,
    pack_tables,
    parse,
    quantize_freqs,
    rans,
    split_escapes,
    unpack,
    unpack_tables,
)
from kvpack.entropy.models import Model, reciprocals
from kvpack.entropy.rans import STATE_LOWER
from kvpack.entropy.tables import validate_freqs
from kvpack.errors import FormatError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(symbols: np.ndarray, starts: np.ndarray, lane_table: np.ndarray, freqs: np.ndarray) -> None:
    """Encode, check the layout invariants, decode; then the same through pack/unpack with and without tables."""
    words, offsets = encode_lanes(symbols, starts, lane_table, freqs)
    n_sym = np.diff(starts)
    n_words = np.diff(offsets)
    assert words.dtype == np.uint16 and offsets.dtype == np.int64 and offsets[-1] == words.size
    assert np.all(n_words[n_sym == 0] == 0)
    assert np.all((n_words[n_sym > 0] >= 2) & (n_words[n_sym > 0] <= n_sym[n_sym > 0] + 2))
    np.testing.assert_array_equal(decode_lanes(words, offsets, starts, lane_table, freqs), symbols)
    for include in (True, False):
        blob = pack(symbols, starts, lane_table, freqs, include_tables=include)
        got, got_starts = unpack(blob, max_symbols=symbols.size, freqs=None if include else freqs)
        np.testing.assert_array_equal(got, symbols)
        np.testing.assert_array_equal(got_starts, starts)
    blob = pack(symbols, starts, lane_table, freqs, include_tables=False)
    for model in compiled(freqs):
        assert np.array_equal(encode_lanes(symbols, starts, lane_table, model)[0], words)
        np.testing.assert_array_equal(decode_lanes(words, offsets, starts, lane_table, model), symbols)
        assert pack(symbols, starts, lane_table, model, include_tables=False) == blob
        np.testing.assert_array_equal(unpack(blob, max_symbols=symbols.size, freqs=model)[0], symbols)


def compiled(freqs: np.ndarray) -> list[Model]:
    """``freqs`` as the decoder's three lookups: exact rows built per block, a coarse precompiled lookup (buckets of
    128 slots, cachegen's), and the coarsest (one entry per table: the decoder walks the whole table)."""
    models = [Model.from_freqs(freqs, lookup_bytes=n) for n in (freqs.shape[0] * PROB_SCALE, freqs.shape[0] * 256, 0)]
    assert not freqs.shape[0] or [m.shift for m in models] == [0, PROB_BITS - 8, PROB_BITS]
    return models


def laplace_lanes(
    rng: np.random.Generator, lens: list[int], alphabet: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    v = np.round(rng.laplace(alphabet / 2, scale, int(starts[-1])))
    return np.clip(v, 0, alphabet - 1).astype(np.uint8), starts


@st.composite
def lane_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random alphabet, skew, lane split and table sharing; symbols drawn from each table's own distribution."""
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 64, 255, 256]))
    n_lanes = draw(st.integers(0, 11))
    lens = draw(st.lists(st.integers(0, 400), min_size=n_lanes, max_size=n_lanes))
    n_tables = draw(st.integers(1, max(1, n_lanes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    skew = draw(st.sampled_from([0.05, 1.0, 20.0]))
    probs = rng.dirichlet(np.full(alphabet, skew), size=n_tables)
    counts = np.round(probs * 10_000).astype(np.int64)
    counts[np.arange(n_tables), rng.integers(0, alphabet, n_tables)] += 1  # no all-zero rows
    freqs = quantize_freqs(counts)
    lane_table = rng.integers(0, n_tables, n_lanes).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    symbols = np.empty(int(starts[-1]), np.uint8)
    for i in range(n_lanes):
        p = freqs[lane_table[i]] / PROB_SCALE
        symbols[starts[i] : starts[i + 1]] = rng.choice(alphabet, size=lens[i], p=p)
    return symbols, starts, lane_table, freqs


# ------------------------------------------------------------------------------------------- round trips


@FAST
@given(lane_sets())
def test_roundtrip_random_lanes_and_shared_tables(case: tuple[np.ndarray, ...]) -> None:
    roundtrip(*case)


@pytest.mark.parametrize(
    "lens",
    [[], [0], [0, 0, 0, 0, 0], [1], [1, 1, 1, 1], [5, 0, 7, 3], [300, 1, 300, 300, 2, 0, 9], [50] * 9, [4096]],
)
def test_roundtrip_lane_shapes(lens: list[int]) -> None:
    """Empty lanes, single symbols, and groups of four with unequal lengths (the lockstep path's remainders)."""
    rng = np.random.default_rng(len(lens))
    symbols, starts = laplace_lanes(rng, lens, 16, 2.0)
    freqs = counts_to_tables(symbols, starts, 16)
    roundtrip(symbols, starts, np.arange(len(lens), dtype=np.int32), freqs)


@pytest.mark.parametrize("alphabet", [1, 2, 256])
def test_roundtrip_single_symbol_tables(alphabet: int) -> None:
    """A table with one symbol holds all of PROB_SCALE: the lane costs only its flushed state."""
    symbol = alphabet - 1
    starts = np.array([0, 1000, 1000, 1001], np.int64)
    symbols = np.full(1001, symbol, np.uint8)
    counts = np.zeros((1, alphabet), np.int64)
    counts[0, symbol] = 7
    freqs = quantize_freqs(counts)
    assert freqs[0, symbol] == PROB_SCALE
    roundtrip(symbols, starts, np.zeros(3, np.int32), freqs)
    words, _ = encode_lanes(symbols, starts, np.zeros(3, np.int32), freqs)
    assert words.size == 4  # two lanes with symbols, two words each


def test_roundtrip_nearly_all_mass_on_one_symbol() -> None:
    rng = np.random.default_rng(1)
    freqs = np.ones((1, 256), np.uint32)
    freqs[0, 7] = PROB_SCALE - 255
    symbols = np.where(rng.random(20_000) < 0.001, rng.integers(0, 256, 20_000), 7).astype(np.uint8)
    symbols[-1] = 255
    roundtrip(symbols, np.array([0, 10_000, 20_000], np.int64), np.zeros(2, np.int32), freqs)


def test_all_zero_table_for_empty_lanes_only() -> None:
    freqs = np.zeros((2, 4), np.uint32)
    freqs[1] = [PROB_SCALE // 2, PROB_SCALE // 2, 0, 0]
    starts = np.array([0, 0, 3, 3], np.int64)
    symbols = np.array([0, 1, 1], np.uint8)
    roundtrip(symbols, starts, np.array([0, 1, 0], np.int32), freqs)
    with pytest.raises(ValueError, match="frequency 0"):
        encode_lanes(symbols, starts, np.array([0, 0, 0], np.int32), freqs)


def test_threads_give_identical_bytes() -> None:
    rng = np.random.default_rng(2)
    symbols, starts = laplace_lanes(rng, [700] * 13, 64, 5.0)
    freqs = counts_to_tables(symbols, starts, 64)
    lane_table = np.arange(13, dtype=np.int32)
    one = encode_lanes(symbols, starts, lane_table, freqs, threads=1)
    two = encode_lanes(symbols, starts, lane_table, freqs, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(decode_lanes(*one, starts, lane_table, freqs, threads=2), symbols)
    with pytest.raises(ValueError, match="threads"):
        encode_lanes(symbols, starts, lane_table, freqs, threads=0)  # numba's own check


@pytest.mark.parametrize("threads", [1, 2])
def test_schedule_codes_equal_lanes_together_and_leaves_the_words_alone(threads: int) -> None:
    """Each thread's block of lanes is coded longest lane first, so four lanes in lockstep have equal lengths where
    the layout allows; the words are the ones storage order gives, and both orders decode."""
    rng = np.random.default_rng(5)
    lens = [4096, 4096, 1024, 4096, 3072, 4096, 4096, 256, 0, 4096, 2048, 4096, 1, 4096] * 3
    symbols, starts = laplace_lanes(rng, lens, 32, 3.0)
    freqs = counts_to_tables(symbols, starts, 32)
    lane_table = np.arange(len(lens), dtype=np.int32)
    model = Model.from_freqs(freqs)
    etab = model.etab
    blocks, order = rans._schedule(starts, threads)
    n = np.diff(starts)
    for lo, hi in itertools.pairwise(blocks):
        assert sorted(order[lo:hi]) == list(range(lo, hi))
        assert np.all(np.diff(n[order[lo:hi]]) <= 0)
    assert not np.array_equal(order, np.arange(len(lens)))
    storage = np.arange(len(lens), dtype=np.int64)
    scratch = np.empty(symbols.size + 2 * len(lens), np.uint16)
    words, offsets, bad = rans._encode_kernel(symbols, starts, lane_table, etab, model.reciprocals, blocks, order,
                                              scratch)
    words_s, offsets_s, _ = rans._encode_kernel(symbols, starts, lane_table, etab, model.reciprocals, blocks, storage,
                                                scratch)
    assert not bad.any()
    np.testing.assert_array_equal(words, words_s)
    np.testing.assert_array_equal(offsets, offsets_s)
    for lanes in (order, storage):
        out = np.empty(symbols.size, np.uint8)
        bad = rans._decode_kernel(words, offsets, starts, lane_table, etab, np.zeros((0, 0), np.uint8), 0, blocks,
                                  lanes, out)
        assert not bad.any()
        np.testing.assert_array_equal(out, symbols)


def test_layout_of_a_lane_is_the_documented_one() -> None:
    """Decode one lane by hand from the spec in docs/entropy.md (what a GPU kernel would do)."""
    rng = np.random.default_rng(3)
    symbols, starts = laplace_lanes(rng, [3, 2000], 16, 1.0)
    freqs = counts_to_tables(symbols, starts, 16)
    words, offsets = encode_lanes(symbols, starts, np.arange(2, dtype=np.int32), freqs)
    f = freqs[1].astype(np.int64)
    cum = np.cumsum(f) - f
    w = words[offsets[1] : offsets[2]].astype(np.int64)
    x, p, out = int(w[0] | (w[1] << 16)), 2, []
    for _ in range(2000):
        slot = x & (PROB_SCALE - 1)
        s = int(np.searchsorted(cum, slot, side="right") - 1)
        out.append(s)
        x = int(f[s]) * (x >> PROB_BITS) + slot - int(cum[s])
        if x < STATE_LOWER:
            x = (x << 16) | int(w[p])
            p += 1
    assert out == symbols[3:].tolist() and x == STATE_LOWER and p == w.size


def test_blob_bytes_are_pinned() -> None:
    """The pack() layout is a file format: these bytes must not change."""
    symbols = np.array([0, 1, 1, 2, 0, 0, 0, 2, 1], np.uint8)
    starts = np.array([0, 4, 4, 9], np.int64)
    freqs = quantize_freqs(np.array([[1, 2, 1], [5, 1, 3]]))
    blob = pack(symbols, starts, np.array([0, 1, 1], np.int32), freqs)
    # version 1, 15-bit probabilities, flags=tables | 3 lanes, 2 tables, alphabet 3 | lane sizes 4 0 5 |
    # lane tables 0 1 1 | word counts 2 0 2 | 14 bytes of tables | words (lane 0 starts in state 0x00468000)
    assert blob.hex() == ("010f010302030400050001010200020e0300804080800103009c8e01b91c00804600240f9a00")


# ------------------------------------------------------------------------------------------- bad input


def encoded_example() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    symbols, starts = laplace_lanes(rng, [120, 0, 64, 33, 90, 5], 16, 1.5)
    freqs = counts_to_tables(symbols, starts, 16)
    lane_table = np.arange(6, dtype=np.int32)
    words, offsets = encode_lanes(symbols, starts, lane_table, freqs)
    return words, offsets, starts, lane_table, freqs


def _set(a: np.ndarray, i: int, v: int) -> np.ndarray:
    a = a.copy()
    a[i] = v
    return a


@pytest.mark.parametrize(("what", "match"), [
    ("starts", "lane_starts must start at 0 and be non-decreasing"),
    ("offsets", "word_offsets must start at 0 and be non-decreasing"),
    ("offsets_from_1", "word_offsets must start at 0"),
    ("table", "a lane uses a table outside 0..5"),
    ("empty_lane_words", "word count does not fit"),
    ("one_word", "word count does not fit"),
    ("zero_table", "all-zero frequency table"),
])
def test_lane_arrays_are_checked_before_decoding(what: str, match: str) -> None:
    """Each check of the lane arrays reports its own fault (the kernel's final-state check would catch most of
    them too, as a corrupted lane: these pin the checks themselves)."""
    words, offsets, starts, lane_table, freqs = encoded_example()  # lane 1 is empty, lane 5 has 5 symbols
    args = {"starts": _set(starts, 2, int(starts[1]) - 1),
            "offsets": _set(offsets, 3, int(offsets[2]) - 1),
            "offsets_from_1": _set(offsets, 0, 1),
            "table": _set(lane_table, 5, 6),
            "empty_lane_words": _set(offsets, 1, int(offsets[1]) - 2),
            "one_word": _set(offsets, 5, int(offsets[6]) - 1),
            "zero_table": _set(freqs, 0, 0)}[what]
    call = {"starts": starts, "offsets": offsets, "lane_table": lane_table, "freqs": freqs}
    call[{"starts": "starts", "table": "lane_table", "zero_table": "freqs"}.get(what, "offsets")] = args
    with pytest.raises(FormatError, match=match):
        decode_lanes(words, call["offsets"], call["starts"], call["lane_table"], call["freqs"])


def test_corrupted_first_word_fails_the_final_state_check() -> None:
    words, offsets, starts, lane_table, freqs = encoded_example()
    for lane in (0, 2, 5):
        bad = words.copy()
        bad[offsets[lane] + 1] ^= 0x5A5A
        with pytest.raises(FormatError, match=f"lane {lane}"):
            decode_lanes(bad, offsets, starts, lane_table, freqs)


def test_corrupted_words_fail_under_every_lookup() -> None:
    words, offsets, starts, lane_table, freqs = encoded_example()
    rng = np.random.default_rng(3)
    for model in compiled(freqs):
        for _ in range(20):
            bad = words.copy()
            bad[rng.integers(words.size)] ^= np.uint16(rng.integers(1, 1 << 16))
            with contextlib.suppress(FormatError):  # a flip may decode to other symbols; it must never crash
                decode_lanes(bad, offsets, starts, lane_table, model)
        bad = words.copy()
        bad[offsets[0] + 1] ^= 0x5A5A
        with pytest.raises(FormatError, match="lane 0"):
            decode_lanes(bad, offsets, starts, lane_table, model)


def test_model_is_checked_against_the_blob() -> None:
    blob, _, freqs = small_blob(include_tables=False)
    other = freqs.copy()
    other[0] = np.roll(other[0], 1)
    with pytest.raises(FormatError, match="not the ones"):
        parse(blob, max_symbols=1000, freqs=Model.from_freqs(other))
    with pytest.raises(FormatError, match="shape"):
        parse(blob, max_symbols=1000, freqs=Model.from_freqs(quantize_freqs(np.ones((5, 4), np.int64))))
    with pytest.raises(FormatError):
        Model.from_freqs(np.full((2, 3), 7))


def test_lane_reading_past_its_words_is_refused() -> None:
    words, offsets, starts, lane_table, freqs = encoded_example()
    shifted = offsets.copy()
    shifted[1] -= 1  # lane 0 loses its last word; the (empty) lane 1 gains it
    with pytest.raises(FormatError):
        decode_lanes(words, shifted, starts, lane_table, freqs)
    shifted = offsets.copy()
    shifted[3] -= 1  # lane 2 loses a word to lane 3, which then has one too many
    with pytest.raises(FormatError, match="lane 2"):
        decode_lanes(words, shifted, starts, lane_table, freqs)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a.update(offsets=a["offsets"][:-1]),
        lambda a: a.update(offsets=a["offsets"] - 1),
        lambda a: a.update(words=a["words"][:-1]),
        lambda a: a.update(words=a["words"].astype(np.int32)),
        lambda a: a.update(lane_table=a["lane_table"] + 1),
        lambda a: a.update(freqs=a["freqs"] * 2),
        lambda a: a.update(freqs=a["freqs"][:, ::-1] - 1),
        lambda a: a.update(starts=a["starts"][::-1]),
        lambda a: a.update(starts=a["starts"] * 3),
        lambda a: a.update(freqs=np.zeros_like(a["freqs"])),
    ],
)
def test_inconsistent_arrays_raise_format_error(mutate: object) -> None:
    words, offsets, starts, lane_table, freqs = encoded_example()
    a = {"words": words, "offsets": offsets, "starts": starts, "lane_table": lane_table, "freqs": freqs}
    mutate(a)  # type: ignore[operator]
    with pytest.raises(FormatError):
        decode_lanes(a["words"], a["offsets"], a["starts"], a["lane_table"], a["freqs"])


@FAST
@given(st.data())
def test_random_word_corruption_raises_only_format_error(data: st.DataObject) -> None:
    words, offsets, starts, lane_table, freqs = encoded_example()
    bad = words.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        bad[data.draw(st.integers(0, bad.size - 1))] = data.draw(st.integers(0, 0xFFFF))
    try:
        out = decode_lanes(bad, offsets, starts, lane_table, freqs)
    except FormatError:
        return
    assert out.shape == (int(starts[-1]),)  # undetected corruption decodes to some symbols, never crashes


def small_blob(include_tables: bool = True) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    symbols, starts = laplace_lanes(rng, [40, 0, 17, 3, 25], 8, 1.0)
    freqs = counts_to_tables(symbols, starts, 8)
    return pack(symbols, starts, np.arange(5, dtype=np.int32), freqs, include_tables=include_tables), symbols, freqs


def test_every_truncation_of_a_blob_is_a_format_error() -> None:
    for include in (True, False):
        blob, _, freqs = small_blob(include)
        for n in range(len(blob)):
            with pytest.raises(FormatError):
                unpack(blob[:n], max_symbols=1000, freqs=None if include else freqs)
        with pytest.raises(FormatError):
            unpack(blob + b"\0\0", max_symbols=1000, freqs=None if include else freqs)


def test_blob_limits_and_external_tables() -> None:
    blob, symbols, freqs = small_blob(include_tables=False)
    with pytest.raises(FormatError, match="max_symbols"):
        parse(blob, max_symbols=symbols.size - 1, freqs=freqs)
    with pytest.raises(FormatError, match="without tables"):
        parse(blob, max_symbols=1000)
    other = freqs.copy()
    other[0] = np.roll(other[0], 1)
    with pytest.raises(FormatError, match="not the ones"):
        parse(blob, max_symbols=1000, freqs=other)
    with pytest.raises(FormatError, match="shape"):
        parse(blob, max_symbols=1000, freqs=quantize_freqs(np.ones((5, 4), np.int64)))
    # a header that declares 2**40 symbols in a uniform lane must be refused before allocating them
    huge = bytes([1, PROB_BITS, 7, 1, 1, 1]) + bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x01])
    with pytest.raises(FormatError, match="max_symbols"):
        parse(huge, max_symbols=10**9)


@FAST
@given(st.data())
def test_mutated_blobs_raise_only_format_error(data: st.DataObject) -> None:
    blob, _, _ = small_blob()
    b = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    try:
        got, _ = unpack(bytes(b), max_symbols=1000)
    except FormatError:
        return
    assert got.size <= 1000


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_are_never_a_crash(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        unpack(bytes([1, PROB_BITS]) + data, max_symbols=1000)


# ------------------------------------------------------------------------------------------- tables


def optimal_cost(counts: np.ndarray) -> float:
    """The best ``sum c * -log2(f / M)`` over integer tables (greedy unit gains on a convex separable cost)."""
    c = counts.tolist()
    f = [1 if x else 0 for x in c]
    heap = [(-x, s) for s, x in enumerate(c) if x]  # gain of 1 -> 2 is c * log2(2)
    heapq.heapify(heap)
    for _ in range(PROB_SCALE - len(heap)):
        _, s = heapq.heappop(heap)
        f[s] += 1
        heapq.heappush(heap, (-c[s] * math.log2((f[s] + 1) / f[s]), s))
    return sum(x * -math.log2(f[s] / PROB_SCALE) for s, x in enumerate(c) if x)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=256), st.integers(0, 3))
def test_quantize_freqs_invariants(counts: list[int], zeros_every: int) -> None:
    c = np.array(counts, np.int64)
    if zeros_every:
        c[:: zeros_every + 1] = 0
    f = quantize_freqs(c[None, :])[0]
    assert f.dtype == np.uint32
    if c.sum() == 0:
        assert not f.any()
        return
    assert int(f.sum()) == PROB_SCALE
    assert np.all((f >= 1) == (c > 0))
    cost = float((c[c > 0] * -np.log2(f[c > 0] / PROB_SCALE)).sum())
    assert cost <= optimal_cost(c) * (1 + 1e-9) + 1e-9


def test_quantize_freqs_degenerate_rows() -> None:
    f = quantize_freqs(np.array([[0, 0, 0], [0, 9, 0], [10**12, 1, 0]]))
    np.testing.assert_array_equal(f[0], [0, 0, 0])
    np.testing.assert_array_equal(f[1], [0, PROB_SCALE, 0])
    assert f[2, 1] == 1 and f[2, 0] == PROB_SCALE - 1 and f[2, 2] == 0
    many = quantize_freqs(np.ones((1, 256), np.int64))
    assert np.all(many == PROB_SCALE // 256)
    with pytest.raises(ValueError):
        quantize_freqs(np.ones((1, 257), np.int64))
    with pytest.raises(ValueError):
        quantize_freqs(-np.ones((1, 4), np.int64))


def test_encoder_multipliers_divide_exactly_for_every_frequency() -> None:
    """``x // f`` as the encoder computes it, for every frequency 1 .. PROB_SCALE and states at and around the
    multiples of ``f``, the renormalization bound ``f << 17`` and ``2**32 - 1``, plus random ones."""
    f = np.arange(1, PROB_SCALE + 1, dtype=np.uint64)
    rcp = reciprocals((f.astype(np.uint32))[None, :])[0]
    assert rcp.dtype == np.uint64 and rcp.shape == f.shape
    m, shift = rcp & np.uint64(0xFFFFFFFF), rcp >> np.uint64(32)
    rng = np.random.default_rng(0)
    top = np.uint64(2**32 - 1)
    for _ in range(20):
        x = rng.integers(0, 2**32, f.size, dtype=np.uint64)
        for states in (x, x // f * f, x // f * f - np.uint64(1), (f << np.uint64(17)) - np.uint64(1),
                       np.full(f.size, top)):
            states = np.minimum(states, top)  # x // f * f - 1 wraps at 0
            q = (((states * m) >> np.uint64(32)) + states) >> shift
            np.testing.assert_array_equal(q, states // f)


@FAST
@given(st.integers(0, 12), st.integers(1, 256), st.integers(0, 2**32 - 1))
def test_pack_tables_roundtrip(n_tables: int, alphabet: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, (n_tables, alphabet)) * (rng.random((n_tables, alphabet)) < 0.5)
    freqs = quantize_freqs(counts)
    data = pack_tables(freqs)
    np.testing.assert_array_equal(unpack_tables(data, n_tables, alphabet), freqs)
    assert len(data) <= n_tables * (4 + 3 * alphabet)
    # compiled straight from the bytes (no second validation): what from_freqs builds, entries as documented
    model, ref = Model.unpack(data, n_tables, alphabet), Model.from_freqs(freqs)
    cum = np.cumsum(freqs, axis=1) - freqs
    np.testing.assert_array_equal(model.etab[:, :alphabet], freqs | (cum << 16))
    assert not model.etab[:, alphabet:].any()
    for a, b in ((model.etab, ref.etab), (model.freqs, ref.freqs), (model.usable, freqs.sum(axis=1) > 0)):
        np.testing.assert_array_equal(a, b)
    assert model.shift == ref.shift


def test_unpack_tables_rejects_bad_bytes() -> None:
    freqs = quantize_freqs(np.array([[0, 3, 5, 0], [0, 0, 0, 0], [1, 0, 0, 0]]))
    data = pack_tables(freqs)
    assert data[:2] == bytes([2, 1])  # span 2 from symbol 1, then f[1]; f[2] is implied
    for n in range(len(data)):
        with pytest.raises(FormatError):
            unpack_tables(data[:n], 3, 4)
    bad_cases = [
        data + b"\0",  # trailing byte
        bytes([2, 1, 0]) + data[3:],  # first frequency zero
        bytes([2, 1]) + bytes([0x80, 0x80, 0x02]) + data[5:],  # f[1] = 32768 leaves nothing for f[2]
        bytes([2, 1, 0x85, 0x00]) + data[4:],  # overlong varint
        bytes([5]) + data[1:],  # span beyond the alphabet
        bytes([2, 3]) + data[2:],  # starts too late for its span
    ]
    for bad in bad_cases:
        with pytest.raises(FormatError):
            unpack_tables(bad, 3, 4)
    with pytest.raises(FormatError):
        unpack_tables(data, 10**9, 4)  # more tables than bytes: refused before allocating


@FAST
@given(st.binary(max_size=40), st.integers(0, 6), st.integers(1, 256))
def test_unpack_tables_random_bytes(data: bytes, n_tables: int, alphabet: int) -> None:
    try:
        f = unpack_tables(data, n_tables, alphabet)
    except FormatError:
        return
    assert pack_tables(f) == data  # whatever parses is canonical


# ------------------------------------------------------------------------------------------- escapes


@FAST
@given(st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 20), max_size=200), st.integers(1, 256))
def test_escape_roundtrip(values: list[int], alphabet: int) -> None:
    v = np.array(values, np.int32)
    symbols, escapes = split_escapes(v, alphabet)
    assert symbols.dtype == np.uint8 and escapes.dtype == np.int32
    assert np.all(symbols < alphabet)
    np.testing.assert_array_equal(merge_escapes(symbols, escapes, alphabet), v)


def test_merge_escapes_validates() -> None:
    symbols, escapes = split_escapes(np.array([1, 70, -2, 3], np.int32), 16)
    np.testing.assert_array_equal(escapes, [70, -2])
    with pytest.raises(FormatError, match="escape"):
        merge_escapes(symbols, escapes[:1], 16)
    with pytest.raises(FormatError, match="inside the alphabet"):
        merge_escapes(symbols, np.array([70, 5], np.int32), 16)
    with pytest.raises(FormatError):
        merge_escapes(np.array([16], np.uint8), escapes[:0], 16)


# ------------------------------------------------------------------------------------------- oracle


def test_sizes_agree_with_constriction() -> None:
    """Same quantized tables through constriction's ANS coder (24-bit probabilities, 64-bit state, 32-bit words).

    ``f / 2**15`` is exactly representable at constriction's precision, so both coders spend the same ideal
    ``sum -log2(f / M)`` bits plus their own termination: ours flushes a 32-bit state (about 16 bits more than
    the information, since it starts from ``L = 2**16``) rounded to 16-bit words; constriction rounds to 32-bit
    words. Tolerance: 48 bits per lane (our two flush words plus one word of rounding), plus 1e-4 relative for
    the finite-state coding loss.
    """
    constriction = pytest.importorskip("constriction")
    rng = np.random.default_rng(6)
    for alphabet, scale, lens in [(16, 1.5, [8192] * 4), (64, 6.0, [3000, 1, 5]), (256, 30.0, [2000] * 3)]:
        symbols, starts = laplace_lanes(rng, lens, alphabet, scale)
        freqs = counts_to_tables(symbols, starts, alphabet)
        _, offsets = encode_lanes(symbols, starts, np.arange(len(lens), dtype=np.int32), freqs)
        ours = theirs = ideal = 0.0
        for i in range(len(lens)):
            lane = symbols[starts[i] : starts[i + 1]]
            support = np.flatnonzero(freqs[i])
            rank = np.zeros(alphabet, np.int32)
            rank[support] = np.arange(support.size)
            coder = constriction.stream.stack.AnsCoder()
            if support.size > 1:
                model = constriction.stream.model.Categorical(freqs[i, support] / PROB_SCALE, perfect=False)
                coder.encode_reverse(rank[lane], model)
            ours += 16 * int(offsets[i + 1] - offsets[i])
            theirs += coder.num_bits()
            ideal += float(-np.log2(freqs[i, lane] / PROB_SCALE).sum())
        assert abs(ours - theirs) <= 48 * len(lens) + 1e-4 * ideal, (alphabet, ours, theirs, ideal)
        assert ideal <= ours <= ideal + 48 * len(lens) + 1e-4 * ideal


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.int64, np.uint64])
def test_validate_freqs_converts_and_reports_the_first_bad_row(dtype: type) -> None:
    """Valid tables come back as the same values in uint32; an entry out of range, or a row summing to neither
    PROB_SCALE nor 0, is a FormatError naming the problem (the range first, then the first bad row)."""
    good = np.array([[PROB_SCALE, 0, 0], [0, 0, 0], [1, PROB_SCALE - 3, 2]], dtype)
    out = validate_freqs(good)
    assert out.dtype == np.uint32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, good.astype(np.int64))
    np.testing.assert_array_equal(validate_freqs(good[:, ::-1]), good[:, ::-1].astype(np.int64))  # not contiguous
    rows = good.copy()
    rows[2, 0] += 1
    rows[0, 0] -= 5
    with pytest.raises(FormatError, match=f"table 0 sums to {PROB_SCALE - 5}, not {PROB_SCALE}"):
        validate_freqs(rows)
    big = good.copy()
    big[2, 1] = PROB_SCALE + 1
    big[0, 0] = 7  # a bad sum too: the range is reported
    with pytest.raises(FormatError, match="outside"):
        validate_freqs(big)
    if np.issubdtype(dtype, np.signedinteger):
        with pytest.raises(FormatError, match="outside"):
            validate_freqs(good - 1)
    with pytest.raises(FormatError, match="integers"):
        validate_freqs(good.astype(np.float64))
    with pytest.raises(FormatError, match="shape"):
        validate_freqs(good.reshape(-1))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(STATE_LOWER - 2, STATE_LOWER + 1), st.integers(1, (1 << 32) - 1)),
       st.integers(0, 0xFFFF), st.integers(0, 1 << 40))
def test_both_refills_of_the_decoder_agree(x: int, w: int, p: int) -> None:
    """The decoder inlines one of two refills by the core LLVM tunes for; the other is checked here, on every host."""
    from kvpack.entropy.rans import _refill_arith, _refill_select

    args = (np.uint64(x), np.uint64(w), np.int64(p))
    expected = ((x << 16) | w, p + 1) if x < STATE_LOWER else (x, p)
    assert tuple(int(v) for v in _refill_select(*args)) == expected
    assert tuple(int(v) for v in _refill_arith(*args)) == expected
