"""The vLLM connector's engine-free parts: page layouts against an element-by-element reference, the chunk planner's
hit and block arithmetic over a real store, request fingerprints, and the connector's settings. No vLLM needed
(tests/test_vllm.py runs the connector inside vLLM)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_kv, make_spec
from kvpack import codecs
from kvpack.errors import ModelMismatchError, UnsupportedModelError
from kvpack.integrations.chunk_plan import (
    ChunkPlanner,
    failed_blocks,
    loadable_chunks,
    request_fingerprint,
)
from kvpack.integrations.identity import check_profile, checkpoint_fingerprint, spec_for_vllm
from kvpack.integrations.pages import PageLayout
from kvpack.integrations.settings import ConnectorConfig
from kvpack.keys import KeySpace
from kvpack.store import MemoryStore

SECRET = bytes(range(32))


def reference_vec_write(pages: torch.Tensor, block_ids: list[int], start: int, kv: torch.Tensor) -> None:
    """The ``vec`` layout written out element by element from its definition: in each (block, head) slab of
    ``block_size * 2 * head_dim`` elements, K[t, d] at ``d * block_size + t``, then V[t, d] at
    ``block_size * head_dim + t * head_dim + d``."""
    _, heads, block_size, twice = pages.shape
    dim = twice // 2
    flat = pages.view(pages.shape[0], heads, -1)
    for t in range(kv.shape[2]):
        pos = start + t
        block, slot = block_ids[pos // block_size], pos % block_size
        for h in range(heads):
            for d in range(dim):
                flat[block, h, d * block_size + slot] = kv[0, h, t, d]
                flat[block, h, block_size * dim + slot * dim + d] = kv[1, h, t, d]


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 3), dim=st.sampled_from([2, 4, 8]), block_size=st.sampled_from([2, 4, 8]),
       start_block=st.integers(0, 2), tokens=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_vec_layout_matches_the_reference_both_ways(heads: int, dim: int, block_size: int, start_block: int,
                                                    tokens: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 8
    needed = (start_block * block_size + tokens + block_size - 1) // block_size
    block_ids = torch.randperm(num_blocks, generator=gen)[:needed]  # needed <= 7 < num_blocks
    layout = PageLayout("vec", heads, dim, block_size)
    start = start_block * block_size
    kv = torch.randn(1, 2, heads, tokens, dim, generator=gen).to(torch.bfloat16)
    ours = torch.zeros(layout.page_shape(num_blocks), dtype=torch.bfloat16)
    ref = torch.zeros_like(ours)
    layout.scatter([ours], block_ids, start, kv)
    reference_vec_write(ref, block_ids.tolist(), start, kv[0])
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))
    back = torch.empty_like(kv)
    layout.gather([ref], block_ids, start, start + tokens, back)
    assert torch.equal(back.view(torch.int16), kv.view(torch.int16))


def test_gather_and_scatter_cover_every_layer_and_leave_other_blocks_alone() -> None:
    kv = make_kv(tokens=12, layers=3, heads=2, head_dim=8)
    layout = PageLayout("vec", 2, 8, 4)
    layers = [torch.full(layout.page_shape(6), 7.0, dtype=torch.bfloat16) for _ in range(3)]
    blocks = torch.tensor([5, 0, 3])
    layout.scatter(layers, blocks, 0, kv.data)
    out = torch.empty_like(kv.data)
    layout.gather(layers, blocks, 0, 12, out)
    assert torch.equal(out.view(torch.int16), kv.data.view(torch.int16))
    for pages in layers:
        assert bool((pages[[1, 2, 4]] == 7.0).all())
    with pytest.raises(ValueError, match="outside"):
        layout.gather(layers, blocks, 0, 13, torch.empty(3, 2, 2, 13, 8, dtype=torch.bfloat16))


def test_unsupported_layouts_are_refused_with_what_to_do() -> None:
    with pytest.raises(UnsupportedModelError, match="amx"):
        PageLayout("amx", 2, 64, 128)
    layout = PageLayout("vec", 2, 8, 4)
    with pytest.raises(UnsupportedModelError, match="lays its cache out differently"):
        layout.check(torch.zeros(2, 4, 4, 2, 8))  # a GPU-style [2, blocks, block_size, heads, dim] layout
    with pytest.raises(ValueError):
        PageLayout("vec", 0, 8, 4)


# ------------------------------------------------------------------------------------------------ chunk planner
def planner(store: MemoryStore, chunk: int = 8, block: int = 4) -> ChunkPlanner:
    return ChunkPlanner(store, namespace="t", codec_id="raw", chunk_tokens=chunk, block_size=block, secret=SECRET)


def put_chunks(store: MemoryStore, keys: list[str]) -> None:
    blob = codecs.get("raw").encode(make_kv(tokens=1))
    for key in keys:
        store.put(key, blob)


def test_keys_are_kvpacks_chained_chunk_keys() -> None:
    p = planner(MemoryStore())
    ids = list(range(100, 125))
    space = KeySpace(namespace="t", model_fingerprint="fp", codec_id="raw", chunk_tokens=8, secret=SECRET)
    assert p.keys("fp", ids) == space.keys(ids)
    assert len(p.keys("fp", ids)) == 3


@pytest.mark.parametrize(("prompt", "expected"), [(0, 0), (1, 0), (8, 0), (9, 1), (16, 1), (17, 2)])
def test_loadable_chunks_never_include_the_last_prompt_token(prompt: int, expected: int) -> None:
    assert loadable_chunks(prompt, 8) == expected


def test_lookup_counts_the_leading_stored_run_once_and_minus_what_vllm_computed() -> None:
    store = MemoryStore()
    p = planner(store)
    ids = list(range(40))  # 5 chunks of 8; the 5th ends at the last token so it is never loadable
    keys = p.keys("fp", ids)
    put_chunks(store, [keys[0], keys[1], keys[3], keys[4]])  # a gap after chunk 1
    queries = store.stats()
    assert p.lookup("r", ids, "fp", computed=0) == 16
    assert p.lookup("r", ids, "fp", computed=8) == 8  # vLLM's prefix cache had the first 2 blocks
    assert p.lookup("r", ids, "fp", computed=16) == 0
    assert p.lookup("r", ids, "fp", computed=24) == 0  # never negative
    assert p.lookup("r", ids, "other-fp", computed=0) == 0  # another fingerprint, other keys
    put_chunks(store, [keys[2]])
    assert p.lookup("r", ids, "fp", computed=0) == 32  # all 4 loadable chunks; chunk 5 holds the last token
    assert store.stats().hits == queries.hits  # lookups only ask whether entries exist


def test_a_step_loads_the_hit_chunks_into_the_blocks_and_saves_what_prefill_completed() -> None:
    store = MemoryStore()
    p = planner(store)
    ids = list(range(30))
    keys = p.keys("fp", ids)
    put_chunks(store, keys[:2])
    external = p.lookup("r", ids, "fp", computed=4)  # vLLM had block 0
    assert external == 12
    p.allocated("r", external)
    blocks = [10, 11, 12, 13, 14, 15, 16, 17]
    work = p.scheduled("r", computed=16, scheduled=14, block_ids=blocks, replace_blocks=True)
    assert work is not None
    assert [(x.key, x.chunk_start, x.start, x.stop) for x in work.loads] == [
        (keys[0], 0, 4, 8), (keys[1], 8, 8, 16)]
    assert [(x.key, x.start, x.token_ids) for x in work.saves] == [(keys[2], 16, tuple(range(16, 24)))]
    assert failed_blocks(work, work.loads[0], 4) == {11}
    assert failed_blocks(work, work.loads[1], 4) == {12, 13}
    # decoding: nothing more to save (24..30 is not a full chunk), nothing to load
    assert p.scheduled("r", computed=30, scheduled=1, block_ids=None, replace_blocks=False) is None
    p.finished("r")
    assert p.scheduled("r", computed=31, scheduled=1, block_ids=None, replace_blocks=False) is None


def test_chunked_prefill_saves_each_chunk_once_and_a_resumed_request_uses_its_new_blocks() -> None:
    p = planner(MemoryStore())
    ids = list(range(33))
    keys = p.keys("fp", ids)
    assert p.lookup("r", ids, "fp", computed=0) == 0
    p.allocated("r", 0)
    saved = []
    work = p.scheduled("r", computed=0, scheduled=12, block_ids=[0, 1, 2], replace_blocks=True)
    assert work is not None
    saved += [s.key for s in work.saves]
    work = p.scheduled("r", computed=12, scheduled=12, block_ids=[3, 4, 5], replace_blocks=False)
    assert work is not None and work.block_ids == [0, 1, 2, 3, 4, 5]
    saved += [s.key for s in work.saves]
    # preempted, then resumed with a new block table: the remaining chunk is saved from the new blocks
    work = p.scheduled("r", computed=0, scheduled=33, block_ids=[9, 8, 7, 6, 5, 4, 3, 2, 1], replace_blocks=True)
    assert work is not None and work.block_ids[0] == 9
    saved += [s.key for s in work.saves]
    assert saved == keys  # 4 full chunks, each once


def test_chunks_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple"):
        planner(MemoryStore(), chunk=256, block=96)


def test_request_fingerprint_covers_lora_salt_and_multimodal_inputs() -> None:
    base = "m" * 64
    assert request_fingerprint(base) == base
    variants = [
        request_fingerprint(base, lora="a\0/p"),
        request_fingerprint(base, lora="b\0/p"),
        request_fingerprint(base, cache_salt="s"),
        request_fingerprint(base, cache_salt=""),
        request_fingerprint(base, mm_hashes=["h1"]),
        request_fingerprint(base, mm_hashes=["h1", "h2"]),
        request_fingerprint(base, mm_hashes=["h2", "h1"]),
        request_fingerprint(base, lora="a\0/p", cache_salt="s", mm_hashes=["h1"]),
    ]
    assert len(set(variants)) == len(variants) and base not in variants
    assert request_fingerprint(base, cache_salt="s") == request_fingerprint(base, cache_salt="s")


def test_connector_config_from_extra() -> None:
    config = ConnectorConfig.from_extra({"store": "file:///tmp/x", "codec": "lossless", "chunk_tokens": 512})
    assert (config.store, config.codec, config.chunk_tokens, config.namespace) == ("file:///tmp/x", "lossless", 512,
                                                                                  "default")
    assert ConnectorConfig.from_extra(None) == ConnectorConfig()
    with pytest.raises(ValueError, match="no setting"):
        ConnectorConfig.from_extra({"stor": "file:///tmp/x"})
    with pytest.raises(ValueError, match="chunk_tokens"):
        ConnectorConfig.from_extra({"chunk_tokens": 0})
    with pytest.raises(ValueError, match="codec_params"):
        ConnectorConfig.from_extra({"codec_params": ["bits=4"]})


def _checkpoint(path: Path, weights: bytes = b"w" * 100, **config: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "num_hidden_layers": 2, **config}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_checkpoint_fingerprint_covers_config_dtype_quantization_and_weight_contents(tmp_path: Path) -> None:
    from transformers import AutoConfig

    base = _checkpoint(tmp_path / "a")
    config = AutoConfig.from_pretrained(base)
    fp = checkpoint_fingerprint(config, "float32", None, str(base))
    assert fp == checkpoint_fingerprint(config, "float32", None, str(_checkpoint(tmp_path / "copy")))  # not the path
    other_weights = _checkpoint(tmp_path / "b", weights=b"v" * 100)
    other_config = AutoConfig.from_pretrained(_checkpoint(tmp_path / "c", num_hidden_layers=3))
    assert len({fp, checkpoint_fingerprint(config, "bfloat16", None, str(base)),
                checkpoint_fingerprint(config, "float32", "awq", str(base)),
                checkpoint_fingerprint(config, "float32", None, str(other_weights)),
                checkpoint_fingerprint(other_config, "float32", None, str(base)),
                checkpoint_fingerprint(config, "float32", None, "org/model", "main")}) == 6


def test_spec_for_vllm_binds_the_spec_to_the_checkpoint_or_says_why_not(tmp_path: Path) -> None:
    from transformers import AutoConfig

    base = _checkpoint(tmp_path / "a")
    spec = make_spec()
    bound = spec_for_vllm(spec, str(base), "bfloat16")
    assert bound.fingerprint == checkpoint_fingerprint(AutoConfig.from_pretrained(base), "bfloat16", None, str(base))
    assert dataclasses.replace(bound, fingerprint=spec.fingerprint) == spec  # nothing else changes
    with pytest.raises(ValueError, match="checkpoint directory"):
        spec_for_vllm(spec, "smollm2-135m", "float32")
    with pytest.raises(ValueError, match="float32"):
        spec_for_vllm(spec, str(base), "fp8")
    quantized = _checkpoint(tmp_path / "q", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(UnsupportedModelError, match="quantized"):
        spec_for_vllm(spec, str(quantized), "float32")


def test_a_profile_of_another_model_refuses_to_start_the_connector(tmp_path: Path) -> None:
    from forged import build_profiles, sample_cache

    profile = build_profiles(tmp_path)["cachegen"]
    codec = codecs.get("cachegen", profile=profile)
    spec = sample_cache("cachegen", 8).spec  # the model the profile was built on
    check_profile(codec, spec)
    check_profile(codecs.get("lossless"), make_spec())  # nothing to check
    with pytest.raises(ModelMismatchError, match="--for-vllm bfloat16"):
        check_profile(codec, dataclasses.replace(spec, fingerprint="e" * 64))
