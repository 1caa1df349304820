"""The `lossless` codec: bit-exact round trips for every bit pattern in fp32/fp16/bf16, bad input, real-KV ratio."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack
from conftest import make_spec
from kvpack.codecs import get, lossless
from kvpack.codecs.common import as_words
from kvpack.codecs.raw import tensor_bytes
from kvpack.entropy import decode_lanes
from kvpack.errors import CodecError, FormatError
from kvpack.eval.corpora import documents
from kvpack.format import read_container, write_container
from kvpack.inference import prefill
from kvpack.kv import KVCache

#: bit patterns every dtype must survive: ±0, ±inf, NaNs with payloads, the largest and smallest normals and
#: subnormals (as unsigned integers of the dtype's width)
SPECIAL = {
    "bfloat16": [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x7F7F, 0xFF7F, 0x0080, 0x0001, 0x807F],
    "float16": [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x7BFF, 0xFBFF, 0x0400, 0x0001, 0x83FF],
    "float32": [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F7FFFFF,
                0xFF7FFFFF, 0x00800000, 0x00000001, 0x807FFFFF],
}
WIDTH = {"bfloat16": 16, "float16": 16, "float32": 32}


def from_bits(bits: np.ndarray, dtype: str, layers: int, heads: int, tokens: int, head_dim: int) -> KVCache:
    """A cache whose keys and values (layer by layer, K then V) hold the given bit patterns."""
    spec = make_spec(layers=layers, heads=heads, head_dim=head_dim, dtype=dtype)
    ints = torch.from_numpy(bits.astype(np.uint64).astype(np.int64)).to(torch.int32 if WIDTH[dtype] == 32 else
                                                                         torch.int16)
    tensors = ints.view(kvpack.spec.DTYPES[dtype]).reshape(2 * layers, heads, tokens, head_dim)
    return KVCache.from_layers(spec=spec, keys=list(tensors[0::2]), values=list(tensors[1::2]),
                   positions=torch.arange(tokens, dtype=torch.int64))


def with_sections(data: bytes, edits: dict[str, Callable[[bytes], bytes]]) -> bytes:
    """``data`` re-written (valid container checksums) with each named section replaced by ``edit(section)``."""
    container = read_container(data)
    header = {k: v for k, v in container.header.items() if k != "sections"}
    sections = {name: edits[name](bytes(v)) if name in edits else bytes(v) for name, v in container.sections.items()}
    return write_container(header, sections)


_REAL: dict[tuple[int, int], KVCache] = {}


def real_cache(smollm: Any, tokens: int) -> KVCache:
    """The bf16 KV cache SmolLM2 computes for the first ``tokens`` tokens of the first eval code document (computed
    once per session and shared by the codec tests)."""
    model, tokenizer, spec = smollm
    if (id(model), tokens) not in _REAL:
        doc = next(d for d in documents(1) if d.kind == "code")
        ids = tokenizer(doc.text[: 20 * tokens], return_tensors="pt").input_ids[0, :tokens]
        with torch.no_grad():
            _REAL[id(model), tokens] = prefill(model, spec, ids)[0]
    return _REAL[id(model), tokens]


def roundtrip(kv: KVCache, **params: Any) -> tuple[KVCache, bytes]:
    data = get("lossless", **params).encode(kv)
    return kvpack.decode(data, token_ids=kv.token_ids), data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(sorted(WIDTH)), layers=st.integers(1, 2), heads=st.integers(1, 2),
       head_dim=st.sampled_from([1, 3, 8, 12]), tokens=st.integers(0, 40), classes=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**32 - 1), special=st.floats(0.0, 1.0))
def test_random_bit_patterns_round_trip_exactly(dtype: str, layers: int, heads: int, head_dim: int, tokens: int,
                                                classes: int, seed: int, special: float) -> None:
    rng = np.random.default_rng(seed)
    n = 2 * layers * heads * tokens * head_dim
    bits = rng.integers(0, 1 << WIDTH[dtype], n, dtype=np.uint64)
    # mix in KV-like values (narrow exponent range per channel) and the special patterns
    like = torch.from_numpy(rng.normal(0.0, 2.0, n).astype(np.float32)).to(kvpack.spec.DTYPES[dtype])
    like_bits = like.view(torch.int16 if WIDTH[dtype] == 16 else torch.int32).numpy().astype(np.int64)
    pick = rng.random(n)
    bits = np.where(pick < 0.5, like_bits & ((1 << WIDTH[dtype]) - 1), bits)
    bits = np.where(pick > 1.0 - 0.2 * special, rng.choice(SPECIAL[dtype], n), bits)
    kv = from_bits(bits, dtype, layers, heads, tokens, head_dim)
    out, _ = roundtrip(kv, classes=classes)
    assert kv.equal(out)


@pytest.mark.parametrize("dtype", sorted(WIDTH))
def test_merge_redoes_tokens_with_escapes_and_refuses_negative_exponents(dtype: str) -> None:
    """The merge computes a token's elements in one branch-free loop and redoes a token holding an escape or an
    invalid symbol element by element: rows shorter and longer than a block of tokens and than 255, channels in
    whole blocks of 8 and not, escapes inside them, all round-trip; a symbol whose exponent would be negative makes
    it refuse the stream."""
    rng = np.random.default_rng(7)
    for tokens, dim in itertools.product((7, 64, 255, 300), (12, 16)):
        n = 2 * tokens * dim
        like = torch.from_numpy(rng.normal(0.0, 2.0, n).astype(np.float32)).to(kvpack.spec.DTYPES[dtype])
        bits = like.view(torch.int16 if WIDTH[dtype] == 16 else torch.int32).numpy().astype(np.int64)
        bits = np.where(rng.random(n) < 0.1, rng.choice(SPECIAL[dtype], n), bits) & ((1 << WIDTH[dtype]) - 1)
        kv = from_bits(bits, dtype, 1, 1, tokens, dim)
        out, data = roundtrip(kv, classes=2)
        assert kv.equal(out)
        container = read_container(data)
        sections = {name: container.section(name) for name in lossless.SECTIONS}
        p = lossless.read_bits(sections, (2, 1, tokens, dim), dtype, 2)
        symbols = decode_lanes(p.stream.words, p.stream.word_offsets, p.stream.lane_starts, p.stream.lane_table,
                               p.stream.freqs)
        assert (p.esc_start[-1] > 0) and (symbols == lossless.ESCAPE).any()
        merge = lossless._kernels(dtype, p.shift)[1]
        got = np.zeros(2 * tokens * dim, np.uint32 if WIDTH[dtype] == 32 else np.uint16)
        args = (symbols, as_words(symbols), p.row_offset)
        assert merge(got, tokens * dim, tokens, dim, *args, p.base, p.flip, p.escapes, p.esc_start, p.raw)
        np.testing.assert_array_equal(got, bits.astype(got.dtype))
        low_base = np.zeros_like(p.base)  # every symbol with a nonzero relative exponent becomes invalid
        assert not merge(got, tokens * dim, tokens, dim, *args, low_base, p.flip, p.escapes, p.esc_start, p.raw)


@pytest.mark.parametrize("dtype", sorted(WIDTH))
def test_special_rows_round_trip(dtype: str) -> None:
    """Rows of only specials, only zeros, one NaN among small values (escapes), alternating signs."""
    tokens, head_dim = 37, 16
    rows = [np.array(SPECIAL[dtype] * 4)[:tokens], np.zeros(tokens, np.int64),
            np.r_[SPECIAL[dtype][4], np.full(tokens - 1, SPECIAL[dtype][10])],
            np.where(np.arange(tokens) % 2, SPECIAL[dtype][9], SPECIAL[dtype][9] | (1 << (WIDTH[dtype] - 1)))]
    grid = np.stack([rows[c % len(rows)] for c in range(head_dim)], axis=1)  # [tokens, head_dim]
    bits = np.tile(grid.reshape(-1), 2 * 2 * 1)
    kv = from_bits(bits, dtype, layers=2, heads=1, tokens=tokens, head_dim=head_dim)
    out, data = roundtrip(kv)
    assert kv.equal(out)
    assert len(read_container(data).section("escapes")) > 2  # the NaN rows forced escapes


def test_low_zero_bits_are_not_stored(kv_factory: Any) -> None:
    """A bf16 cache upcast to fp32 has 16 zero mantissa bits per element: they cost nothing."""
    kv = kv_factory(tokens=64, dtype="bfloat16")
    spec = kvpack.spec.ModelSpec(**{**kv.spec.__dict__, "dtype": "float32"})
    wide = KVCache.from_layers(spec=spec, keys=[t.float() for t in kv.keys], values=[t.float() for t in kv.values],
                   positions=kv.positions)
    out, data = roundtrip(wide)
    assert out.equal(wide) and read_container(data).section("mantissa")[0] == 16
    assert len(data) < len(get("lossless").encode(kv)) + 100


def test_decoded_dtype_shapes_and_positions(kv_factory: Any) -> None:
    kv = kv_factory(tokens=20, start=300, dtype="float16")
    out, _ = roundtrip(kv, classes=16)
    assert out.equal(kv) and out.keys[0].dtype == torch.float16 and tuple(out.values[2].shape) == (2, 20, 8)
    assert torch.equal(out.positions, kv.positions)


def test_bad_parameters() -> None:
    for bad in (0, 3, 32, -1):
        with pytest.raises(CodecError, match="classes"):
            get("lossless", classes=bad)


def test_forged_symbols_are_format_errors(kv_factory: Any) -> None:
    """Consistent lengths but impossible content: negative exponents, escapes that do not add up, wrong dtype."""
    kv = kv_factory(tokens=24)
    data = get("lossless").encode(kv)
    n_rows = 2 * 3 * 2 * 8
    # every base exponent 0: the coded symbols now decode to negative exponents
    with pytest.raises(FormatError, match="corrupted"):
        kvpack.decode(with_sections(data, {"rows": lambda b: bytes(n_rows) + b[n_rows:]}))
    # claim one escape value in the first tile that no symbol uses
    with pytest.raises(FormatError):
        kvpack.decode(with_sections(data, {"escapes": lambda b: b"\x01" + b[1:] + b"\x00\x00"}))
    with pytest.raises(FormatError, match="shift"):
        kvpack.decode(with_sections(data, {"mantissa": lambda b: b"\x07" + b[1:]}))
    container = read_container(data)
    header = dict(container.header)
    header["meta"] = {"dtype": "float16"}
    del header["sections"]
    forged = write_container(header, {k: bytes(v) for k, v in container.sections.items()})
    with pytest.raises(FormatError, match="holds 'float16'"):
        kvpack.decode(forged)


@pytest.mark.model
def test_real_kv_beats_zstd19(smollm: Any) -> None:
    """On SmolLM2's own bf16 KV (128 tokens of code), lossless is exact and smaller than zstd -19 of the raw bytes."""
    kv = real_cache(smollm, 128)
    out, data = roundtrip(kv)
    assert kv.equal(out)
    raw = tensor_bytes(kv.data)
    zstd19 = len(zstandard.ZstdCompressor(level=19).compress(raw))
    assert len(data) < zstd19, (len(raw) / len(data), len(raw) / zstd19)


def test_decoder_kernels_come_from_numba_cache_in_a_new_process() -> None:
    """A second process loads the compiled merge kernel from numba's on-disk cache instead of compiling it again
    (a closure over another dispatcher once gave it a new cache key per process: ~6 s on every first load)."""
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import make_kv\n"
        "from kvpack.codecs import get\n"
        "kv = make_kv(tokens=20, layers=2, heads=2, head_dim=8)\n"
        "codec = get('lossless')\n"
        "assert codec.decode(codec.encode(kv), kv.spec).keys[0].equal(kv.keys[0])\n"
    )
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    saved = [line for line in runs[1].stdout.splitlines() if "data saved" in line]
    assert saved == [], f"the second process compiled kernels again: {saved}"
