"""RoPE rotate / unrotate / rerotate against transformers' own rotary embeddings (fp32, 1e-6)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, PhiConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

from kvpack.errors import UnsupportedModelError
from kvpack.rope import inverse_frequencies, rerotate, rotate, unrotate
from kvpack.spec import RopeSpec, _rope_spec

HEAD_DIM = 64
CASES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
                    "original_max_position_embeddings": 4096},
}


def _llama(params: dict[str, Any]) -> tuple[LlamaRotaryEmbedding, RopeSpec]:
    config = LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_parameters=dict(params))
    return LlamaRotaryEmbedding(config), _rope_spec(config)


def _keys(tokens: int, dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, tokens, dim, generator=gen)
    positions = torch.cat([torch.arange(0, tokens - 4), torch.tensor([1000, 5000, 9999, 31000])]).to(torch.int64)
    return keys, positions


@pytest.mark.parametrize("case", sorted(CASES))
def test_rotate_matches_transformers(case: str) -> None:
    emb, rope = _llama(CASES[case])
    assert rope.type == CASES[case]["rope_type"]
    keys, positions = _keys(40)
    cos, sin = emb(keys, positions[None])
    _, expected = apply_rotary_pos_emb(keys[None], keys[None], cos, sin)
    ours = rotate(keys, positions, rope, HEAD_DIM)
    torch.testing.assert_close(ours, expected[0], rtol=0, atol=1e-6)
    inv_freq, factor = inverse_frequencies(rope, HEAD_DIM)
    torch.testing.assert_close(inv_freq, emb.inv_freq, rtol=0, atol=0)
    assert factor == pytest.approx(emb.attention_scaling, abs=1e-12)
    torch.testing.assert_close(unrotate(ours, positions, rope, HEAD_DIM), keys, rtol=0, atol=1e-5)


def test_partial_rotary_matches_phi() -> None:
    config = PhiConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, num_key_value_heads=4,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    emb, rope = PhiRotaryEmbedding(config), _rope_spec(config)
    assert rope.partial_rotary_factor == 0.5
    keys, positions = _keys(24)
    cos, sin = emb(keys, positions[None])
    rot = cos.shape[-1]
    _, turned = apply_rotary_pos_emb(keys[None, ..., :rot], keys[None, ..., :rot], cos, sin)
    expected = torch.cat([turned[0], keys[..., rot:]], dim=-1)
    ours = rotate(keys, positions, rope, HEAD_DIM)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(unrotate(ours, positions, rope, HEAD_DIM), keys, rtol=0, atol=1e-5)


def test_rerotate_moves_keys() -> None:
    _, rope = _llama(CASES["llama3"])
    keys, positions = _keys(16)
    moved = rerotate(rotate(keys, positions, rope, HEAD_DIM), positions, positions + 777, rope, HEAD_DIM)
    torch.testing.assert_close(moved, rotate(keys, positions + 777, rope, HEAD_DIM), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "none"])
def test_unsupported_types_refused(kind: str) -> None:
    rope = RopeSpec(type=kind, params={"factor": 2.0})
    with pytest.raises(UnsupportedModelError, match=kind):
        inverse_frequencies(rope, HEAD_DIM)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="keys must be"):
        rotate(torch.zeros(2, 5, 32), torch.arange(5), RopeSpec(), HEAD_DIM)
