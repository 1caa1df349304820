"""The `kivi` codec: the documented error bound on random and real KV, exact sink/residual tokens, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack
from conftest import make_kv
from kvpack.codecs import get, kivi
from kvpack.codecs.half import fp16_toward
from kvpack.errors import CodecError, FormatError
from kvpack.format import read_container
from kvpack.kv import KVCache
from test_codec_fp8 import OUT_U, refuses, stacked
from test_codec_lossless import real_cache, with_sections


def steps(data: bytes, kv: KVCache, group: int) -> tuple[torch.Tensor, int, int]:
    """Per quantized element the step ``s`` of its group ``[2L, H, Tq, D]``, and the sink and residual counts."""
    container = read_container(data)
    codec = get("kivi", group=group)
    n_sink, n_res, (_, kstep, _, vstep) = codec.read_groups(container.header["meta"], container, kv.spec,
                                                            kv.num_tokens)
    layers, heads, dim = kv.spec.num_layers, kv.spec.num_kv_heads, kv.spec.head_dim
    count = kv.num_tokens - n_sink - n_res
    k = torch.from_numpy(kstep).double().repeat_interleave(group, dim=3)[..., :count].transpose(2, 3)
    v = torch.from_numpy(vstep).double().repeat_interleave(group, dim=3)[..., :dim]
    return torch.stack([k, v], dim=1).reshape(2 * layers, heads, count, dim), n_sink, n_res


def check_bound(kv: KVCache, **params: Any) -> tuple[KVCache, bytes, int, int]:
    """Encode, decode, assert |x - x̂| <= s/2 + (2^-23 + u)|x̂| on quantized tokens and exactness elsewhere."""
    codec = get("kivi", **params)
    data = codec.encode(kv)
    out = kvpack.decode(data)
    step, n_sink, n_res = steps(data, kv, codec.group)
    x, xh = stacked(kv), stacked(out)
    t = kv.num_tokens
    u, floor = OUT_U[kv.spec.dtype]
    q, qh = x[:, :, n_sink : t - n_res], xh[:, :, n_sink : t - n_res]
    bound = step / 2 + (2.0**-23 + u) * qh.abs() + floor
    err = (q - qh).abs()
    assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-300)).max())
    assert torch.equal(x[:, :, :n_sink], xh[:, :, :n_sink])
    assert torch.equal(x[:, :, t - n_res :], xh[:, :, t - n_res :])
    assert torch.equal(out.positions, kv.positions)
    return out, data, n_sink, n_res


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["bfloat16", "float16", "float32"]), bits=st.sampled_from([2, 3, 4]),
       group=st.sampled_from([1, 3, 8, 32, 100]), tokens=st.integers(0, 150), head_dim=st.sampled_from([1, 5, 8, 12]),
       sink=st.integers(0, 6), residual=st.integers(0, 10), start=st.sampled_from([0, 2, 100]),
       scale=st.floats(-10, 6), classes=st.sampled_from([1, 4]), seed=st.integers(0, 1000))
def test_error_bound_on_random_kv(dtype: str, bits: int, group: int, tokens: int, head_dim: int, sink: int,
                                  residual: int, start: int, scale: float, classes: int, seed: int) -> None:
    kv = make_kv(tokens=tokens, seed=seed, start=start, head_dim=head_dim, dtype="float32")
    spec = kvpack.spec.ModelSpec(**{**kv.spec.__dict__, "dtype": dtype})
    shifted = [(t * 2.0**scale + 5.0 * (torch.arange(head_dim) % 3 - 1)).to(spec.torch_dtype) for t in kv.keys]
    kv = KVCache.from_layers(spec=spec, keys=shifted, values=[(t * 2.0**scale).to(spec.torch_dtype) for t in kv.values],
                 positions=kv.positions)
    _, _, n_sink, n_res = check_bound(kv, bits=bits, group=group, sink=sink, residual=residual, classes=classes)
    assert n_sink == max(0, min(sink - start, tokens))
    assert n_res == min(residual, tokens - n_sink)


def test_sinks_follow_absolute_positions() -> None:
    """Only the chunk holding positions below `sink` keeps them; ratios grow with bits going down."""
    kv = make_kv(tokens=64, head_dim=16)
    first, later = kv[:32], kv.chunks(32)[1]
    assert check_bound(first, sink=4)[2] == 4
    assert check_bound(later, sink=4)[2] == 0
    sizes = [len(get("kivi", bits=b).encode(kv)) for b in (2, 3, 4)]
    assert sizes[0] < sizes[1] < sizes[2] < kv.fp16_bytes / 2


def test_constant_groups_and_outlier_channel() -> None:
    kv = make_kv(tokens=40, head_dim=8, dtype="bfloat16")
    keys = [k.clone() for k in kv.keys]
    keys[0][:, :, 0] = 1.5  # constant channel: step 0, exact
    keys[1][:, :, 1] = 300.0 * torch.randn(2, 40).to(torch.bfloat16)
    values = [v.clone() for v in kv.values]
    values[2][:, 5, :] = -0.25  # constant token
    kv = KVCache.from_layers(spec=kv.spec, keys=keys, values=values, positions=kv.positions)
    out = check_bound(kv, bits=2, sink=0)[0]
    assert bool((out.keys[0][:, :, 0] == 1.5).all()) and bool((out.values[2][:, 5, :] == -0.25).all())


def test_bad_parameters_and_unencodable_caches() -> None:
    for params in ({"bits": 1}, {"bits": 8}, {"group": 0}, {"sink": -1}, {"residual": -2}, {"classes": 3}):
        with pytest.raises(CodecError):
            get("kivi", **params)
    kv = make_kv(tokens=10)
    refuses(get("kivi"), kv, 0, (1, 4, 3), 1e6)
    for bad in (float("nan"), float("-inf")):  # in an exact (sink) token, which is stored as it is
        keys = [k.clone() for k in kv.keys]
        keys[1][0, 2, 5] = bad
        with pytest.raises(CodecError, match="NaN or infinite"):
            get("kivi").encode(KVCache.from_layers(spec=kv.spec, keys=keys, values=kv.values, positions=kv.positions))


def test_nan_steps_are_format_errors() -> None:
    """Section lengths and meta are checked for every codec (test_forged.py); here, well-formed parameters that
    decode to a NaN step."""
    kv = make_kv(tokens=45)
    data = get("kivi", residual=5).encode(kv)
    sections = {k: bytes(v) for k, v in read_container(data).sections.items()}
    # a step coded as NaN: exponent 31 with a nonzero mantissa in every row of the key parameters
    rows = len(sections["key_params.rows"]) * 8 // 9
    nan_rows = bytes([31] * rows) + sections["key_params.rows"][rows:]
    with pytest.raises(FormatError, match=r"finite|corrupted"):
        kvpack.decode(with_sections(data, {"key_params.rows": lambda b: nan_rows}))


@pytest.mark.model
def test_real_kv_bound_and_ratio(smollm: Any) -> None:
    kv = real_cache(smollm, 128)
    for bits, least in ((2, 4.0), (4, 2.5)):
        _, data, n_sink, _ = check_bound(kv, bits=bits)
        assert n_sink == 4 and kv.fp16_bytes / len(data) > least


def test_group_parameters_widen_every_float16_exactly() -> None:
    """The decoder's compiled float16 -> float32 widening of the stored minima and steps equals numpy's cast for all
    65,536 bit patterns (subnormals and -0 included), in both layouts, and flags any infinity or NaN."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(1, 2, 2, 128, 128)
    ref = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref)
    for keys in (False, True):
        want = ref.transpose(0, 1, 2, 4, 3) if keys else ref
        ok = finite.transpose(0, 1, 2, 4, 3) if keys else finite
        minima, steps, all_finite = kivi._widen_params(bits, keys)
        assert not all_finite
        for got, j in ((minima, 0), (steps, 1)):
            np.testing.assert_array_equal(got.view(np.uint32)[ok[:, j]], want[:, j].view(np.uint32)[ok[:, j]])
        assert kivi._widen_params(np.where(finite, bits, 0).astype(np.uint16), keys)[2]


def test_group_grid_is_float16_to_each_side() -> None:
    """The minima are the float16 at or below the group minimum, the steps the float16 at or above the range over
    the levels (numpy's cast plus one step, bit for bit), including groups near zero and float16's limits."""
    rng = np.random.default_rng(12)
    lo = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-8, 4, 4000), [0.0, -0.0, -65504.0, 1e-8]])
    hi = lo + np.concatenate([rng.random(4000) * 10.0 ** rng.integers(-8, 3, 4000), [0.0, 1e-9, 100.0, 0.0]])
    for levels in (3, 7, 15):
        m16, s16, m64, s64, finite = kivi._grid(lo.reshape(4, -1), hi.reshape(4, -1), levels)
        want_m = fp16_toward(lo, False)
        want_s = fp16_toward((hi - want_m.astype(np.float64)) / levels, True)
        assert finite
        np.testing.assert_array_equal(m16.reshape(-1), want_m.view(np.uint16))
        np.testing.assert_array_equal(s16.reshape(-1), want_s.view(np.uint16))
        np.testing.assert_array_equal(m64.reshape(-1), want_m.astype(np.float64))
        np.testing.assert_array_equal(s64.reshape(-1), want_s.astype(np.float64))
    assert not kivi._grid(np.array([-1e6]), np.array([0.0]), 3)[4]
