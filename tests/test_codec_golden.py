"""Golden hashes: the bytes each codec writes, and the values it decodes, for fixed inputs are pinned.

The GPU decoders read the bitstreams the CPU codecs write (docs/entropy.md, docs/format.md), so a speed change to a
CPU kernel must leave every byte as it was. Each case encodes a deterministic synthetic cache (numpy's PCG64 with a
fixed seed; channels of different scales and signs, a few exact zeros, like real KV) and compares the SHA-256 of
the container and of the decoded buffer with the values recorded here, on the one-thread path (chunks below
``PARALLEL_MIN_ELEMENTS``) and on the threaded path. A deliberate format change updates these hashes in the same
commit (the assertion message prints the new ones).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import kvpack
from conftest import make_spec
from kvpack.codecs import get
from kvpack.entropy import counts_to_tables, pack
from kvpack.kv import KVCache
from kvpack.spec import DTYPES


def _cache(dtype: str, tokens: int, start: int, layers: int = 2, heads: int = 2, head_dim: int = 64) -> KVCache:
    """A reproducible cache with per-channel scales, signs and offsets, and some exact zeros."""
    spec = make_spec(layers=layers, heads=heads, head_dim=head_dim, dtype=dtype)
    rng = np.random.default_rng(1234)
    shape = spec.buffer_shape(tokens)
    scale = np.exp(rng.normal(0.0, 1.5, (layers, 2, heads, 1, head_dim)))
    offset = rng.normal(0.0, 2.0, (layers, 2, heads, 1, head_dim)) * (rng.random((layers, 2, heads, 1, head_dim)) < .3)
    x = rng.standard_normal(shape) * scale + offset * scale
    x[rng.random(shape) < 0.01] = 0.0
    data = torch.from_numpy(x.astype(np.float32)).to(DTYPES[dtype])
    return KVCache(spec=spec, data=data, positions=torch.arange(start, start + tokens, dtype=torch.int64))


CASES: list[tuple[str, dict[str, int | str], str, int, int]] = [
    ("lossless", {}, "bfloat16", 300, 0),
    ("lossless", {}, "float16", 300, 0),
    ("lossless", {}, "float32", 300, 0),
    ("lossless", {}, "bfloat16", 1100, 0),
    ("fp8", {}, "bfloat16", 300, 0),
    ("fp8", {}, "float16", 300, 0),
    ("fp8", {}, "float32", 1100, 0),
    ("kivi", {"bits": 2}, "bfloat16", 300, 0),
    ("kivi", {"bits": 4, "residual": 16}, "float16", 300, 0),
    ("kivi", {"bits": 3}, "bfloat16", 1100, 256),
]

#: "codec-params-dtype-tokens-start" -> (SHA-256 of the container, of the decoded buffer's bytes), first 16 hex digits.
EXPECTED: dict[str, tuple[str, str]] = {
    'fp8-[]-bfloat16-300-0': ('5d846439e9961f20', '1aa28c9ba7f19051'),
    'fp8-[]-float16-300-0': ('1e205d8ecbb11098', '087aaeb0056ad313'),
    'fp8-[]-float32-1100-0': ('87ac561200aa1e7c', 'a9c266ee2a29ab70'),
    "kivi-[('bits', 2)]-bfloat16-300-0": ('6bdce3c45207a3c3', 'cb9aad638730b836'),
    "kivi-[('bits', 3)]-bfloat16-1100-256": ('c9f1ae2d70b94583', '2abd4d8331ce3484'),
    "kivi-[('bits', 4), ('residual', 16)]-float16-300-0": ('c1378ddcdeeb90d8', '4d81f55852dee0e1'),
    'lossless-[]-bfloat16-1100-0': ('8d67e004315a44c0', '2737b7617d03f704'),
    'lossless-[]-bfloat16-300-0': ('84b33024c85c9eba', '14d308c8eb62f090'),
    'lossless-[]-float16-300-0': ('e627bbcd016738d5', 'fc8505b05c1da3c7'),
    'lossless-[]-float32-300-0': ('e88b1a7a1f3559b5', '8711b6b290948e76'),
}


def _sha(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(bytes(data) if not isinstance(data, np.ndarray) else data.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_codec_bytes_and_values_are_pinned(case: tuple[str, dict[str, int | str], str, int, int]) -> None:
    """1100 tokens x 512 elements run the threaded kernels; 300 tokens the one-thread path."""
    name, params, dtype, tokens, start = case
    kv = _cache(dtype, tokens, start)
    data = get(name, **params).encode(kv)
    out = kvpack.decode(data)
    got = (_sha(data), _sha(out.data.contiguous().view(torch.uint8).numpy()))
    key = f"{name}-{sorted(params.items())}-{dtype}-{tokens}-{start}"
    assert EXPECTED.get(key) == got, f"golden hashes changed: {key!r}: {got!r}"


def test_rans_blob_is_pinned() -> None:
    """The entropy coder alone: per-lane tables, lanes of several lengths (one empty), a skewed alphabet."""
    rng = np.random.default_rng(7)
    lengths = np.array([5000, 0, 1, 4096, 777, 3000, 2, 9000])
    symbols = np.clip(np.round(rng.laplace(8.0, 2.0, lengths.sum())), 0, 15).astype(np.uint8)
    starts = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    freqs = counts_to_tables(symbols, starts, 16)
    blob = pack(symbols, starts, np.arange(lengths.size, dtype=np.int32), freqs)
    assert _sha(blob) == EXPECTED_RANS, f"rANS blob hash changed: {_sha(blob)!r}"


EXPECTED_RANS = "aa8f48d3c84333c9"
