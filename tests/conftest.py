"""Shared fixtures: a small synthetic spec and caches for fast unit tests, and the real bundled model (session)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvpack.kv import KVCache
from kvpack.spec import ModelSpec, RopeSpec

# The GPU decoders' Triton kernels run on CPU tensors under Triton's interpreter where there is no GPU. Triton reads
# the switch when kvpack.gpu is first imported, so it is set here, before any test module imports anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PROSE = (
    "The quick brown fox jumps over the lazy dog. Caching the keys and values of a long context lets a model "
    "answer without reading the context again. "
)


def make_spec(layers: int = 3, heads: int = 2, head_dim: int = 8, dtype: str = "bfloat16",
              fingerprint: str = "f" * 64) -> ModelSpec:
    return ModelSpec(num_layers=layers, num_kv_heads=heads, head_dim=head_dim, dtype=dtype,
                     rope=RopeSpec(theta=10000.0), sliding_windows=(None,) * layers, fingerprint=fingerprint,
                     name="synthetic")


def make_kv(tokens: int = 16, seed: int = 0, start: int = 0, **spec_kwargs: Any) -> KVCache:
    spec = make_spec(**spec_kwargs)
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.num_kv_heads, tokens, spec.head_dim)
    keys = [(torch.randn(shape, generator=gen) * 3).to(spec.torch_dtype) for _ in range(spec.num_layers)]
    values = [torch.randn(shape, generator=gen).to(spec.torch_dtype) for _ in range(spec.num_layers)]
    ids = torch.randint(0, 50000, (tokens,), generator=gen, dtype=torch.int64)
    return KVCache.from_layers(spec=spec, keys=keys, values=values,
                   positions=torch.arange(start, start + tokens, dtype=torch.int64), token_ids=ids)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep what kvpack writes to its cache directory (loader estimates, default disk store) out of the home dir."""
    os.environ["KVPACK_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvpack-cache"))


@pytest.fixture
def kv_factory() -> Callable[..., KVCache]:
    return make_kv


@pytest.fixture(scope="session")
def smollm() -> tuple[Any, Any, ModelSpec]:
    """The real bundled model (SmolLM2-135M, bf16), its tokenizer and spec; loaded once per test session."""
    from kvpack import models

    torch.manual_seed(0)
    model, tokenizer = models.load()
    return model, tokenizer, ModelSpec.from_model(model, tokenizer)
