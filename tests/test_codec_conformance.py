"""Conformance: every registered codec passes the same contract.

Round trip (shape, dtype, positions, token ids; bit-exact for the lossless codecs, a loose sanity bound for the
others, whose own error bounds are tested in their files), determinism (same cache, same bytes, on the one-thread and
the threaded paths; same bytes, same tensors), the per-container bounds, bad input (typed errors only), ``out=``
decoding into a slice of a larger cache, and chunk-key stability (a codec's identity, rebuilt from a header, is the
encoder's, pinned for the default parameters, identical in another process). Codec-specific behaviour stays in
``test_codec_<name>.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack
from forged import PROFILED, build_profiles, codec_params, sample_cache
from kvpack.codecs import Codec, available, get, validate
from kvpack.codecs.common import PARALLEL_MIN_ELEMENTS
from kvpack.errors import CodecError, FormatError, KvpackError, ModelMismatchError, TokenMismatchError
from kvpack.format import read_container
from kvpack.kv import KVCache
from kvpack.spec import DTYPES, ModelSpec

#: Codecs that return exactly the bits they were given.
EXACT = ("lossless", "raw", "zstd")
#: Sanity bound on ||decoded - original|| / ||original|| for the lossy codecs on their sample caches (their
#: documented, much tighter bounds are tested per codec).
LOSSY_REL_ERROR = 0.5
#: A spec with enough elements per token that the threaded path starts at a few hundred tokens (calibrated codecs
#: keep their profile's).
WIDE = {"layers": 4, "heads": 2, "head_dim": 64}
#: ``codec_id`` of each uncalibrated codec at its default parameters: part of every chunk key, so a change here
#: (a renamed or added parameter, a new default) makes every stored chunk unreachable.
PINNED_IDS = {
    "fp8": '{"name":"fp8","params":{"classes":2},"profile":null,"version":1}',
    "kivi": '{"name":"kivi","params":{"bits":2,"classes":4,"group":32,"residual":0,"sink":4},"profile":null,'
            '"version":1}',
    "lossless": '{"name":"lossless","params":{"classes":4},"profile":null,"version":1}',
    "raw": '{"name":"raw","params":{"dtype":null},"profile":null,"version":1}',
    "zstd": '{"name":"zstd","params":{"level":3},"profile":null,"version":1}',
}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_profiles(tmp_path_factory.mktemp("profiles"))


def _codec(name: str, profiles: dict[str, str]) -> Codec:
    return get(name, **codec_params(name, profiles))


def _decode(data: bytes, name: str, profiles: dict[str, str], **kwargs: Any) -> KVCache:
    return kvpack.decode(data, profile=profiles.get(name), **kwargs)


def _rel_error(a: KVCache, b: KVCache) -> float:
    diff = float((a.data.double() - b.data.double()).norm())
    return diff / max(float(b.data.double().norm()), 1e-30)


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_round_trip(profiles: dict[str, str], name: str, tokens: int) -> None:
    """Every KV dtype (calibrated codecs: their profile's), with the spec and token ids checked on the way."""
    for dtype in ("bfloat16",) if name in PROFILED else sorted(DTYPES):
        kv = sample_cache(name, tokens, dtype=dtype)
        data = _codec(name, profiles).encode(kv)
        out = _decode(data, name, profiles, spec=kv.spec, token_ids=kv.token_ids)
        assert out.spec == kv.spec and out.num_tokens == tokens
        assert tuple(out.data.shape) == kv.spec.buffer_shape(tokens) and out.data.dtype == kv.spec.torch_dtype
        assert torch.equal(out.positions, kv.positions)
        assert out.token_ids is not None and kv.token_ids is not None and torch.equal(out.token_ids, kv.token_ids)
        if name in EXACT:
            assert out.equal(kv)
        else:
            assert bool(torch.isfinite(out.data).all())
            assert tokens == 0 or _rel_error(out, kv) < LOSSY_REL_ERROR


@pytest.mark.parametrize("name", available())
def test_round_trip_of_gapped_positions(profiles: dict[str, str], name: str) -> None:
    """Positions that are not contiguous travel in the ``positions`` section and come back as they were."""
    kv = sample_cache(name, 12)
    gapped = KVCache(spec=kv.spec, data=kv.data, positions=torch.arange(0, 36, 3, dtype=torch.int64),
                     token_ids=kv.token_ids)
    data = _codec(name, profiles).encode(gapped)
    assert "positions" in read_container(data).sections
    assert torch.equal(_decode(data, name, profiles).positions, gapped.positions)


@pytest.mark.parametrize("name", available())
def test_determinism(profiles: dict[str, str], name: str) -> None:
    """Same cache, same bytes (two encodes, one of them of a copy, one of the same tokens as a slice of a longer
    cache, as chunks are encoded), below and above the size where the kernels go parallel; and the same bytes decode
    to the same tensors."""
    codec = _codec(name, profiles)
    per_token = sample_cache(name, 1, **WIDE).spec.elements_per_token
    for tokens in (20, -(-PARALLEL_MIN_ELEMENTS // per_token) + 64):
        kv = sample_cache(name, tokens, **WIDE)
        copy = KVCache(spec=kv.spec, data=kv.data.clone(), positions=kv.positions.clone(), token_ids=kv.token_ids)
        longer = torch.zeros(kv.spec.buffer_shape(tokens + 7), dtype=kv.data.dtype)
        longer[:, :, :, 3 : 3 + tokens] = kv.data
        sliced = KVCache(spec=kv.spec, data=longer[:, :, :, 3 : 3 + tokens], positions=kv.positions,
                         token_ids=kv.token_ids)
        data = codec.encode(kv)
        assert data == codec.encode(copy) == codec.encode(sliced)
        assert _decode(data, name, profiles).equal(_decode(data, name, profiles))


@pytest.mark.parametrize("name", available())
def test_bounds(profiles: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding refuses caches above the per-container limits, and decoding refuses headers that claim more."""
    kv = sample_cache(name, 20)
    codec = _codec(name, profiles)
    data = codec.encode(kv)
    for limit, value in (("MAX_TOKENS", 19), ("MAX_ELEMENTS", 20 * kv.spec.elements_per_token - 1)):
        with monkeypatch.context() as patch:
            patch.setattr(validate, limit, value)
            with pytest.raises(CodecError, match="limit"):
                codec.encode(kv)
            with pytest.raises(FormatError):
                _decode(data, name, profiles)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(available()), data=st.data())
def test_bad_input_raises_typed_errors(profiles: dict[str, str], name: str, data: st.DataObject) -> None:
    """Truncated and bit-flipped containers are FormatErrors; another model's spec, other token ids and another
    codec's container are refused with their own errors."""
    kv = sample_cache(name, 16)
    clean = _codec(name, profiles).encode(kv)
    cut = data.draw(st.integers(0, len(clean) - 1), label="cut")
    with pytest.raises(FormatError):
        _decode(clean[:cut], name, profiles)
    flipped = bytearray(clean)
    flipped[data.draw(st.integers(0, len(clean) - 1), label="byte")] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(FormatError):
        _decode(bytes(flipped), name, profiles)
    other_model = ModelSpec(**{**kv.spec.__dict__, "fingerprint": "0" * 64})
    with pytest.raises(ModelMismatchError):
        _decode(clean, name, profiles, spec=other_model)
    assert kv.token_ids is not None
    with pytest.raises(TokenMismatchError):
        _decode(clean, name, profiles, token_ids=kv.token_ids + 1)
    other = next(n for n in available() if n != name and n not in PROFILED)
    with pytest.raises(CodecError):
        get(other).decode(clean)


@pytest.mark.parametrize("name", available())
def test_decode_into_a_slice_of_a_larger_cache(profiles: dict[str, str], name: str) -> None:
    """``out=`` writes the chunk into the given view (and nothing around it) and returns it with the stored
    positions; a view of the wrong size is refused."""
    kv = sample_cache(name, 24)
    data = _codec(name, profiles).encode(kv)
    whole = KVCache.empty(kv.spec, 3 * 24)
    whole.data.fill_(7.0)
    target = whole[24:48]
    out = _decode(data, name, profiles, out=target)
    assert out is target and out.data.data_ptr() == whole.data[:, :, :, 24:].data_ptr()
    assert out.equal(_decode(data, name, profiles))
    assert torch.equal(whole.positions[24:48], kv.positions)
    assert bool((whole.data[:, :, :, :24] == 7.0).all()) and bool((whole.data[:, :, :, 48:] == 7.0).all())
    with pytest.raises((ValueError, KvpackError)):
        _decode(data, name, profiles, out=whole[:23])


IN_PLACE = {"fp8", "kivi", "lossless", "transform"}


@pytest.mark.parametrize("name", sorted(IN_PLACE & set(available())))
def test_decoders_write_the_slice_in_place(profiles: dict[str, str], name: str) -> None:
    """These codecs decode straight into ``out=``'s memory (the loader's buffer) rather than into a tensor of their
    own that the caller then copies; an ``out`` whose tiles are not contiguous is either written correctly (torch
    paths) or left alone for the caller's copy (numba kernels), never written wrongly."""
    kv = sample_cache(name, 24)
    codec = _codec(name, profiles)
    container = read_container(codec.encode(kv))
    whole = KVCache.empty(kv.spec, 3 * 24)
    args = (container.header["meta"], container, kv.spec, 24)
    got = codec.decode_payload(*args, whole.data[:, :, :, 24:48])
    assert got.data_ptr() == whole.data[:, :, :, 24:].data_ptr()
    assert torch.equal(got, codec.decode_payload(*args, None))
    wide = torch.zeros(*kv.spec.buffer_shape(24)[:-1], 2 * kv.spec.head_dim, dtype=kv.spec.torch_dtype)
    strided = wide[..., ::2]  # channels two apart: no kernel writes this in place
    copied = codec.decode_payload(*args, strided)
    assert torch.equal(copied, got) and not wide[..., 1::2].any()
    assert torch.equal(strided, got) if copied.data_ptr() == wide.data_ptr() else not wide.any()


@pytest.mark.parametrize("name", available())
def test_warm_up_runs_on_the_codec_s_model(profiles: dict[str, str], name: str) -> None:
    """``warm_up`` codes synthetic tokens of any spec the codec accepts (calibrated codecs: their profile's), and
    the codec's output does not change after it."""
    kv = sample_cache(name, 20)
    codec = _codec(name, profiles)
    before = codec.encode(kv)
    codec.warm_up(kv.spec, 16)
    assert codec.encode(kv) == before


@pytest.mark.parametrize("name", available())
def test_codec_id_survives_the_header(profiles: dict[str, str], name: str) -> None:
    """The codec ``kvpack.decode`` rebuilds from a header has the encoder's identity (hence its chunk keys)."""
    codec = _codec(name, profiles)
    info = read_container(codec.encode(sample_cache(name, 4))).header["codec"]
    rebuilt = json.dumps(info, sort_keys=True, separators=(",", ":"))
    assert rebuilt == codec.codec_id
    assert _codec(name, profiles).codec_id == codec.codec_id
    if name in PROFILED:
        assert info["profile"] == codec.profile_hash() and isinstance(info["profile"], str)


def test_default_codec_ids_are_pinned_and_process_independent() -> None:
    """Default identities are the pinned strings, in this process and in one with another hash seed."""
    uncalibrated = [n for n in available() if n not in PROFILED]
    assert sorted(PINNED_IDS) == uncalibrated, "pin the codec_id of every new codec here"
    assert {n: get(n).codec_id for n in uncalibrated} == PINNED_IDS
    script = ("import json; from kvpack.codecs import get\n"
              f"print(json.dumps({{n: get(n).codec_id for n in {uncalibrated!r}}}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == PINNED_IDS
