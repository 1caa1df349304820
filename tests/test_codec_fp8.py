"""The `fp8` codec: E4M3 rounding identical to torch, the documented error bound on random and real KV, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

import kvpack
from conftest import make_kv
from kvpack.codecs import get
from kvpack.codecs.base import Codec
from kvpack.codecs.common import OUT_KINDS, as_words, float_bits
from kvpack.codecs.fp8 import _encode_codes
from kvpack.errors import CodecError, FormatError
from kvpack.format import read_container
from kvpack.kv import KVCache
from test_codec_lossless import real_cache, with_sections

#: relative rounding of the cache dtype (half an ulp), and its absolute floor (float16 subnormals)
OUT_U = {"bfloat16": (2.0**-8, 0.0), "float16": (2.0**-11, 2.0**-25), "float32": (0.0, 0.0)}


def stacked(kv: KVCache) -> torch.Tensor:
    """``[2 * layers, heads, tokens, head_dim]`` float64."""
    return torch.stack([t for pair in zip(kv.keys, kv.values, strict=True) for t in pair]).double()


def check_bound(kv: KVCache, **params: Any) -> tuple[KVCache, bytes]:
    """Encode, decode and assert |x - x̂| <= 2^-4 (1 + 2^-19) |x| + 2^-10 s + u |x̂| for every element."""
    data = get("fp8", **params).encode(kv)
    out = kvpack.decode(data)
    x, xh = stacked(kv), stacked(out)
    groups, heads, _, dim = x.shape
    n_rows = groups * heads * dim
    scales = np.frombuffer(read_container(data).section("rows"), "<f2", count=n_rows).astype(np.float64)
    s = torch.from_numpy(scales).reshape(groups, heads, 1, dim)
    u, floor = OUT_U[kv.spec.dtype]
    bound = 2.0**-4 * (1 + 2.0**-19) * x.abs() + 2.0**-10 * s + u * xh.abs() + floor
    err = (x - xh).abs()
    assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-300)).max())
    assert torch.equal(out.positions, kv.positions)
    return out, data


def test_e4m3_codes_match_torch() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    y = np.concatenate([bits[np.isfinite(bits) & (np.abs(bits) <= 448)],
                        rng.uniform(-448, 448, 100_000).astype(np.float32),
                        (rng.standard_normal(100_000) * 0.02).astype(np.float32),
                        np.float32([0.0, -0.0, 448, -448, 2**-6, 2**-7, 2**-9, 2**-10, 1.5 * 2**-9, 432, 440])])
    y = y[: y.size - y.size % 16].reshape(1, -1, 16)
    expected = torch.from_numpy(y[0]).to(torch.float8_e4m3fn).view(torch.uint8).numpy().T
    whole = y.shape[1] // 8 * 8
    for tokens in (whole, whole - 3):  # rows of whole words (the block moves as words), and not
        codes = np.empty(16 * tokens, np.uint8)
        _encode_codes(y[:, :tokens], np.ones(16, np.float32), np.zeros(16, np.uint8), codes, as_words(codes))
        assert np.array_equal(codes.reshape(16, tokens), expected[:, :tokens])


@njit
def _convert_all(u: np.ndarray, kind: int) -> np.ndarray:
    out = np.empty(u.size, np.int64)
    for i in range(u.size):
        out[i] = float_bits(np.int64(u[i]), kind)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float32_rounding_matches_torch(dtype: str) -> None:
    """The decoders' float32 -> bf16/fp16 rounding (nearest even, subnormals, overflow) is torch's, bit for bit."""
    rng = np.random.default_rng(5)
    anything = rng.integers(0, 1 << 32, 300_000, dtype=np.uint64).astype(np.uint32)
    near = rng.integers(0x32000000, 0x48000000, 300_000, dtype=np.uint64).astype(np.uint32) | (
        rng.integers(0, 2, 300_000, dtype=np.uint64).astype(np.uint32) << 31)
    u = np.concatenate([anything, near])
    f = torch.from_numpy(u.view(np.int32).copy()).view(torch.float32)
    expected = f.to(kvpack.spec.DTYPES[dtype]).view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    got = _convert_all(u, OUT_KINDS[dtype])
    nan = torch.isnan(f).numpy()
    assert np.array_equal(got[~nan], expected[~nan])
    exp_mask = 0x7F80 if dtype == "bfloat16" else 0x7C00
    assert np.all((got[nan] & exp_mask) == exp_mask) and np.all(got[nan] & ~exp_mask & 0x7FFF)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["bfloat16", "float16", "float32"]), tokens=st.integers(0, 150),
       head_dim=st.sampled_from([1, 5, 8, 16]), log_scale=st.floats(-12, 8), offset=st.floats(-4, 4),
       classes=st.sampled_from([1, 2, 8]), seed=st.integers(0, 2**32 - 1))
def test_error_bound_on_random_kv(dtype: str, tokens: int, head_dim: int, log_scale: float,
                                  offset: float, classes: int, seed: int) -> None:
    kv = make_kv(tokens=tokens, seed=seed % 1000, head_dim=head_dim, dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    heavy = [((t + offset) * 2.0**log_scale * torch.exp(torch.randn(t.shape, generator=gen))).clamp(-6e4, 6e4)
             for t in kv.keys]
    spec = kvpack.spec.ModelSpec(**{**kv.spec.__dict__, "dtype": dtype})
    kv = KVCache.from_layers(spec=spec, keys=[t.to(spec.torch_dtype) for t in heavy],
                 values=[t.to(spec.torch_dtype) for t in kv.values], positions=kv.positions)
    check_bound(kv, classes=classes)


def test_special_rows(kv_factory: Any) -> None:
    """All-zero rows (scale 0), rows spanning the E4M3 subnormals, exact ±absmax, a dominant negative sign."""
    kv = kv_factory(tokens=50, dtype="bfloat16")
    keys = [k.clone() for k in kv.keys]
    keys[0][:, :, 0] = 0
    keys[0][:, :, 1] = torch.logspace(-12, 2, 50, base=2).to(torch.bfloat16)
    keys[1][:, :, 2] = -torch.rand(50).to(torch.bfloat16) - 3
    keys[1][0, 7, 3] = -1000.0
    kv = KVCache.from_layers(spec=kv.spec, keys=keys, values=kv.values, positions=kv.positions)
    out, _ = check_bound(kv)
    assert bool((out.keys[0][:, :, 0] == 0).all())
    assert float(out.keys[1][0, 7, 3]) == -1000.0  # absmax maps to ±448 exactly


def refuses(codec: Codec, kv: KVCache, layer: int, index: tuple[int, int, int], too_large: float) -> None:
    """``codec`` refuses ``kv`` with a NaN, an infinity or ``too_large`` at ``index`` ``(head, token, channel)`` of
    layer ``layer``'s keys."""
    for bad in (float("nan"), float("inf"), too_large):
        keys = [k.clone() for k in kv.keys]
        keys[layer][index] = bad
        with pytest.raises(CodecError):
            codec.encode(KVCache.from_layers(spec=kv.spec, keys=keys, values=kv.values, positions=kv.positions))


def test_refuses_what_it_cannot_represent(kv_factory: Any) -> None:
    kv = kv_factory(tokens=8)
    refuses(get("fp8"), kv, 1, (0, 3, 2), 1e30)
    with pytest.raises(CodecError, match="classes"):
        get("fp8", classes=5)


def test_nan_scales_are_format_errors(kv_factory: Any) -> None:
    """Section lengths are checked for every codec (test_forged.py); here, a rows section of the right length whose
    scales are NaN."""
    kv = kv_factory(tokens=30)
    data = get("fp8").encode(kv)
    n_rows = 2 * 3 * 2 * 8
    nan_scale = np.full(n_rows, np.nan, "<f2").tobytes()
    with pytest.raises(FormatError, match="scales"):
        kvpack.decode(with_sections(data, {"rows": lambda b: nan_scale + b[2 * n_rows :]}))


@pytest.mark.model
def test_real_kv_bound_and_ratio(smollm: Any) -> None:
    kv = real_cache(smollm, 128)
    _, data = check_bound(kv)
    assert kv.fp16_bytes / len(data) > 2.0
