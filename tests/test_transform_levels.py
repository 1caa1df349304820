"""The fused level kernels of `transform` (:mod:`kvpack.codecs.transform.levels`) against the quantizer's numpy
definition (:mod:`kvpack.codecs.transform.quant`), value for value, and their refusal of sections that lie."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codecs.transform import levels
from kvpack.codecs.transform.quant import (
    ALPHABET,
    ESCAPE,
    FP8_GAIN,
    N_RATES,
    ec_dequantize,
    ec_quantize,
    fp8_dequantize,
    low_bits,
    pack_bits,
    rates,
    unzigzag,
    zigzag,
)
from kvpack.entropy.tables import encode_varints
from kvpack.errors import FormatError


def _reference(z: np.ndarray, classes: np.ndarray, freqs: np.ndarray, rounding: float,
               shrink: np.ndarray) -> tuple[np.ndarray, bytes, bytes, np.ndarray]:
    """The numpy pipeline the kernels replace: symbols, escape and low-bit sections, dequantized ``[n, T]``."""
    r = rates()[classes][:, None]
    q = ec_quantize(z, r, rounding)
    u = zigzag(q)
    b = low_bits()[classes][:, None]
    high, low = u >> b, u & ((1 << b) - 1)
    esc = (high >= ESCAPE) | (freqs[classes[:, None], np.minimum(high, ESCAPE)] == 0)
    symbols = np.where(esc, ESCAPE, high).astype(np.uint8).reshape(-1)
    lows = b"".join(pack_bits(low[b[:, 0] == nb].reshape(-1), int(nb)) for nb in np.unique(b[:, 0]) if nb)
    back = ec_dequantize(unzigzag(u), r, shrink[classes][:, None])
    return symbols, encode_varints(high[esc]).tobytes(), lows, back


def _case(seed: int, n: int, tokens: int, groups: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                                                   np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.sort(rng.integers(0, N_RATES, n))
    group = rng.integers(0, groups, n)
    widths = [int((group == g).sum()) + 3 for g in range(groups)]
    column = np.zeros(n, np.int64)
    for g in range(groups):
        sel = np.flatnonzero(group == g)
        column[sel] = rng.permutation(widths[g])[: sel.size]
    # heavy tails: some levels escape the alphabet, some land on symbols the tables cannot code
    zs = [(rng.standard_t(2, (tokens, w)) * 3).astype(np.float32) for w in widths]
    freqs = rng.integers(0, 3, (N_RATES, ALPHABET)).astype(np.uint32)
    return zs, group, column, classes, freqs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), tokens=st.integers(1, 70), groups=st.integers(1, 3),
       rounding=st.sampled_from([0.5, 0.35]))
def test_kernels_match_the_numpy_definition(seed: int, n: int, tokens: int, groups: int, rounding: float) -> None:
    zs, group, column, classes, freqs = _case(seed, n, tokens, groups)
    shrink = np.random.default_rng(seed + 1).uniform(0, 0.3, N_RATES).astype(np.float32)
    z = np.stack([zs[g][:, c] for g, c in zip(group, column, strict=True)])  # [n, T]
    symbols, escapes, lows, back = _reference(z, classes, freqs, rounding, shrink)
    got_symbols, got_escapes, got_lows = levels.quantize(zs, group, column, classes, freqs, rounding)
    assert np.array_equal(got_symbols, symbols) and got_escapes == escapes and got_lows == lows
    target = np.random.default_rng(seed + 2).permutation(n + 2)[:n]
    out = np.full((n + 2, tokens), np.nan, np.float32)
    levels.dequantize(symbols, tokens, np.frombuffer(escapes, np.uint8), np.frombuffer(lows, np.uint8), classes,
                      shrink, target, out)
    assert np.array_equal(out[target].view(np.uint32), back.view(np.uint32))  # bit for bit


def test_sections_that_do_not_match_the_symbols_are_refused() -> None:
    zs, group, column, classes, freqs = _case(3, 30, 50, 1)
    classes[-5:] = N_RATES - 1  # raw low bits present
    symbols, escapes, lows = levels.quantize(zs, group, column, classes, freqs, 0.5)
    esc, low = np.frombuffer(escapes, np.uint8), np.frombuffer(lows, np.uint8)
    assert esc.size and low.size
    shrink = np.zeros(N_RATES, np.float32)
    out = np.zeros((30, 50), np.float32)
    target = np.arange(30)
    levels.dequantize(symbols, 50, esc, low, classes, shrink, target, out)
    for bad_esc, bad_low, bad_symbols in ((esc[:-1], low, symbols), (np.append(esc, 0), low, symbols),
                                          (esc, low[:-1], symbols), (esc, np.append(low, 0), symbols),
                                          (esc, low, symbols[:-1])):
        with pytest.raises(FormatError):
            levels.dequantize(bad_symbols, 50, bad_esc.copy(), bad_low.copy(), classes, shrink, target, out)


def test_an_output_that_does_not_fit_is_refused_before_any_write() -> None:
    zs, group, column, classes, freqs = _case(4, 6, 20, 1)
    symbols, escapes, lows = levels.quantize(zs, group, column, classes, freqs, 0.5)
    esc, low, shrink = np.frombuffer(escapes, np.uint8), np.frombuffer(lows, np.uint8), np.zeros(N_RATES, np.float32)
    for shape, target in (((20, 6), np.arange(6)), ((6, 20), np.arange(1, 7)), ((6, 20), np.arange(-1, 5)),
                          ((8, 20), np.arange(5))):
        with pytest.raises(ValueError, match="do not fit"):
            levels.dequantize(symbols, 20, esc, low, classes, shrink, target, np.zeros(shape, np.float32))


def test_fp8_blocks_decode_every_byte_as_torch_does() -> None:
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = torch.from_numpy(every.copy()).view(torch.float8_e4m3fn).float().numpy() / FP8_GAIN
    got = fp8_dequantize(every)
    assert got.dtype == np.float32 and np.array_equal(got, expected.astype(np.float32), equal_nan=True)
    every.setflags(write=False)  # a read-only view of a container decodes too, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8_dequantize(every)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(0, 70), tokens=st.integers(0, 100), seed=st.integers(0, 2**31))
def test_transposed_is_torch_s_transposing_cast(rows: int, tokens: int, seed: int) -> None:
    z = (np.random.default_rng(seed).standard_normal((rows, tokens)) * 1e3).astype(np.float32)
    bits = z.view(np.uint32)
    bits[:, ::3] = (bits[:, ::3] & ~np.uint32(0xFFFF)) | np.uint32(0x8000)  # exact bf16 ties: to nearest even
    for dtype in (torch.float32, torch.bfloat16):
        got = levels.transposed(z, dtype)
        want = torch.from_numpy(z).t().to(dtype, memory_format=torch.contiguous_format)
        assert got.dtype == dtype and got.shape == (tokens, rows) and got.is_contiguous()
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        levels.transposed(z, torch.float16)
