"""Every standard cache layout, on tiny random models of each family transformers ships.

For each family: the cache of a prompt longer than the sliding window goes ``from_hf -> encode -> decode -> to_hf``
with ``raw`` and ``lossless`` and the model continues with bit-identical logits; the windowed form
(``to_hf(keep_history=False)``) equals transformers' own default cache bit for bit; and ContextCache gives the same
greedy tokens as plain transformers with the same split point. Architectures whose cache is not a K/V pair per layer are
refused by name.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf
from transformers import DynamicCache

from kvpack import decode, encode
from kvpack.context import ContextCache
from kvpack.errors import UnsupportedModelError
from kvpack.inference import forward, new_cache
from kvpack.kv import KVCache
from kvpack.loader import LoaderConfig
from kvpack.spec import ModelSpec
from kvpack.store import MemoryStore

WINDOW = 8
PROMPT = 40  # > WINDOW: sliding layers have dropped tokens in transformers' own cache
CHUNK = 16
#: Load every stored chunk (no compute from the front), so outputs can be compared with a plain split prefill.
EXACT = LoaderConfig(compute_front=False, estimates_path="")
BASE: dict[str, Any] = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
ALTERNATING = ["sliding_attention", "full_attention"] * 2
FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama-mha": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama-mqa": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 1}),
    "qwen2-sliding": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
                      {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"sliding_window": WINDOW}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"sliding_window": WINDOW, "layer_types": ALTERNATING}),
    "phi3-partial-rotary": (tf.Phi3Config, tf.Phi3ForCausalLM, {"partial_rotary_factor": 0.5}),
    "gpt-oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny(family: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**BASE, **extra})).to(dtype).eval()


def prompt() -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, Any, ModelSpec]:
    model = tiny(request.param)
    return request.param, model, ModelSpec.from_model(model)


def test_spec_reads_the_layout(family: tuple[str, Any, ModelSpec]) -> None:
    name, model, spec = family
    config = model.config
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (4, config.num_key_value_heads, 16)
    expected = [None if t == "full_attention" else WINDOW for t in getattr(config, "layer_types", None)
                or ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * 4]
    assert list(spec.sliding_windows) == expected
    if name.startswith("phi3"):
        assert spec.rope.partial_rotary_factor == 0.5


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_round_trip_continues_with_bit_identical_logits(family: tuple[str, Any, ModelSpec], codec: str) -> None:
    _, model, spec = family
    ids = prompt()
    with torch.no_grad():
        cache = new_cache(model)
        forward(model, ids[:32], cache)
        kv = KVCache.from_hf(cache, spec, token_ids=ids[:32])
        restored = decode(encode(kv, codec), spec, token_ids=ids[:32])
        assert restored.equal(kv)
        reference = forward(model, ids[32:], cache)
        assert torch.equal(forward(model, ids[32:], restored.to_hf()), reference)


def test_restored_cache_equals_transformers_default(family: tuple[str, Any, ModelSpec]) -> None:
    _, model, spec = family
    ids = prompt()
    with torch.no_grad():
        default = DynamicCache(config=model.config)  # transformers' own: sliding layers keep window - 1 tokens
        forward(model, ids[:32], default)
        recorded = new_cache(model)
        forward(model, ids[:32], recorded)
        kv = KVCache.from_hf(recorded, spec)
        windowed = kv.to_hf(keep_history=False)
        for ours, theirs in zip(windowed.layers, default.layers, strict=True):
            assert type(ours) is type(theirs) and torch.equal(ours.keys, theirs.keys)
            assert torch.equal(ours.values, theirs.values)
        reference = forward(model, ids[32:], default)
        assert torch.equal(forward(model, ids[32:], windowed), reference)
        assert torch.equal(forward(model, ids[32:], kv.to_hf()), reference)  # history kept, same window shown


def test_context_cache_matches_plain_split_generate(family: tuple[str, Any, ModelSpec]) -> None:
    _, model, spec = family
    ids = prompt()
    gen = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones(1, PROMPT, dtype=torch.int64)}
    with ContextCache(model, None, store=MemoryStore(), codec="lossless", chunk_tokens=CHUNK, spec=spec,
                      loader=EXACT) as cc:
        assert cc.prefill(ids[:32]).chunks_written == 2
        cc.flush()
        result = cc.generate(ids, **gen)
    assert (result.stats.tokens_hit, result.stats.prompt_tokens) == (32, PROMPT)
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        forward(model, ids[:32], plain)
        expected = model.generate(ids[None], cache=plain, **gen)
    assert torch.equal(result.sequences, expected)


def test_non_kv_architectures_are_refused_by_name() -> None:
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(UnsupportedModelError, match="recurrent"):
        ModelSpec.from_model(mamba)
    mla = tf.DeepseekV3Config(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                              n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    with pytest.raises(UnsupportedModelError, match="latent"):
        ModelSpec.from_model(tf.DeepseekV3ForCausalLM(mla))
    hybrid = tf.Qwen3NextConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=32, linear_num_key_heads=2,
                                linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        ModelSpec.from_model(tf.Qwen3NextForCausalLM(hybrid))
