from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import PROSE, make_kv, make_spec
from kvpack import decode, encode
from kvpack.errors import UnsupportedModelError
from kvpack.inference import new_cache
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec, RopeSpec


def test_slice_and_concat_round_trip() -> None:
    kv = make_kv(tokens=20, start=5)
    parts = kv.chunks(8)
    assert [p.num_tokens for p in parts] == [8, 8, 4]
    assert parts[1].positions.tolist() == list(range(13, 21))
    assert KVCache.concat(parts).equal(kv)
    assert not kv[0:19].equal(kv)


def test_equal_sees_one_flipped_bit() -> None:
    kv = make_kv(tokens=4)
    other = KVCache.concat([kv])
    bits = other.values[1].view(torch.int16)
    bits[0, 0, 0] ^= 1
    assert not kv.equal(other)


def test_validation_rejects_wrong_shapes() -> None:
    kv = make_kv(tokens=4)
    with pytest.raises(ValueError, match="layer 0"):
        KVCache.from_layers(spec=kv.spec, keys=[k[:, :3] for k in kv.keys], values=kv.values, positions=kv.positions)
    with pytest.raises(ValueError, match="dtype"):
        KVCache.from_layers(spec=kv.spec, keys=[k.float() for k in kv.keys], values=kv.values, positions=kv.positions)


def test_spec_json_round_trip() -> None:
    spec = make_spec()
    assert ModelSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError):
        RopeSpec(type="bogus")


def test_per_layer_ropes_round_trip_and_headers_are_checked() -> None:
    from dataclasses import replace

    from kvpack.codecs.validate import header_spec
    from kvpack.errors import FormatError

    base = make_spec()
    assert "layer_ropes" not in base.to_json()  # headers of one-RoPE models are what they always were
    ropes = tuple(RopeSpec(theta=1e4 if i % 2 else 1e6) for i in range(base.num_layers))
    spec = replace(base, layer_ropes=ropes)
    header = json.loads(json.dumps(spec.to_json()))  # as a container header holds it
    assert ModelSpec.from_json(spec.to_json()) == spec == header_spec(header)
    assert [spec.rope_of(i).theta for i in range(2)] == [1e6, 1e4] and base.rope_of(1) == base.rope
    with pytest.raises(ValueError, match="one entry per layer"):
        replace(base, layer_ropes=ropes[:1])
    from kvpack.codecs.validate import check_layout

    check_layout(spec, spec)
    with pytest.raises(FormatError, match="RoPE per layer"):  # written before the spec held per-layer RoPEs
        check_layout(base, spec)
    for bad in (ropes[:1], [{"type": "default", "theta": -1.0, "partial_rotary_factor": 1.0, "params": {}}]
                * base.num_layers, "default"):
        obj = header | {"layer_ropes": [r.__dict__ for r in bad] if isinstance(bad, tuple) else bad}
        with pytest.raises(FormatError, match="layer_ropes"):
            header_spec(obj)


def test_buffer_views_slices_and_out_decode() -> None:
    kv = make_kv(tokens=12)
    spec = kv.spec
    assert tuple(kv.data.shape) == (spec.num_layers, 2, spec.num_kv_heads, 12, spec.head_dim)
    assert kv.keys[1].data_ptr() == kv.data[1, 0].data_ptr()  # views, no copies
    part = kv[4:8]
    assert part.data.data_ptr() == kv.data[:, :, :, 4:].data_ptr() and part.positions.tolist() == [4, 5, 6, 7]
    whole = KVCache.empty(spec, 12)
    for chunk in kv.chunks(4):
        start = int(chunk.positions[0])
        decode(encode(chunk, "raw"), spec, out=whole[start : start + 4])
    assert torch.equal(whole.data.view(torch.int16), kv.data.view(torch.int16))
    with pytest.raises(ValueError, match="out="):
        decode(encode(kv[:4], "raw"), spec, out=whole[:5])


def test_to_hf_hands_views_and_sliding_layers_keep_history() -> None:
    spec = dataclasses.replace(make_spec(layers=2), sliding_windows=(4, None))
    kv = make_kv(tokens=10, layers=2)
    kv = KVCache(spec=spec, data=kv.data, positions=kv.positions)
    full = kv.to_hf()
    assert full.layers[0].keys.data_ptr() == kv.data[0, 0].data_ptr() and full.layers[0].keys.shape[2] == 10
    assert KVCache.from_hf(full, spec).equal(kv)
    windowed = kv.to_hf(keep_history=False)
    assert windowed.layers[0].keys.shape[2] == 3 and windowed.layers[1].keys.shape[2] == 10  # transformers keeps W-1
    assert windowed.get_seq_length(0) == 10
    with pytest.raises(UnsupportedModelError, match="sliding-window cache that kept 3 of its 10"):
        KVCache.from_hf(windowed, spec)


@pytest.mark.model
def test_hf_round_trip_gives_bit_identical_logits(smollm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, spec = smollm
    ids = tokenizer(PROSE * 4, return_tensors="pt").input_ids
    prefix, rest = ids[:, :48], ids[:, 48:64]
    with torch.no_grad():
        cache = new_cache(model)
        model(prefix, cache=cache, use_cache=True)
        kv = KVCache.from_hf(cache, spec, token_ids=prefix[0])
        reference = model(rest, cache=cache, use_cache=True).logits
        restored = model(rest, cache=kv.to_hf(), use_cache=True).logits
    assert kv.num_tokens == 48 and kv.keys[0].dtype == torch.bfloat16
    assert torch.equal(reference, restored)


def tiny_llama(seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_fingerprint_separates_dtypes_and_weights() -> None:
    model = tiny_llama()
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (2, 2, 8, "float32")
    assert ModelSpec.from_model(tiny_llama()).fingerprint == spec.fingerprint
    assert ModelSpec.from_model(tiny_llama(seed=1)).fingerprint != spec.fingerprint
    assert ModelSpec.from_model(tiny_llama().to(torch.bfloat16)).fingerprint != spec.fingerprint


@pytest.mark.model
def test_real_model_spec(smollm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer, spec = smollm
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (30, 3, 64, "bfloat16")
    assert spec.rope.type == "default" and spec.rope.theta == 1e5
    assert ModelSpec.from_model(model, tokenizer).fingerprint == spec.fingerprint
    assert ModelSpec.from_model(model, None).fingerprint != spec.fingerprint


def test_a_large_empty_cache_is_an_ordinary_writable_buffer() -> None:
    """KVCache.empty maps large host buffers with huge pages (kv._buffer): same shape, dtype and layout as
    torch.empty, writable, and alive as long as any view of it."""
    import gc

    from kvpack import kv as kv_module

    spec = make_spec(layers=4, heads=2, head_dim=64, dtype="bfloat16")
    tokens = kv_module.HUGE_PAGE_BUFFER_BYTES // spec.elements_per_token // 2 + 1
    big, small = KVCache.empty(spec, tokens), KVCache.empty(spec, 8)
    for cache, n in ((big, tokens), (small, 8)):
        assert cache.data.shape == spec.buffer_shape(n) and cache.data.dtype == torch.bfloat16
        assert cache.data.is_contiguous() and cache.data.device.type == "cpu"
    big.data.fill_(2.5)
    view = big[tokens - 3 :]
    del big
    gc.collect()
    assert bool((view.data == 2.5).all())
    view.data[:, :, :, 0] = -1.0  # still writable
    assert float(view.data[:, :, :, 0].float().mean()) == -1.0
