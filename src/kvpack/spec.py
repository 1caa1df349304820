"""`ModelSpec`: everything that gives a KV cache its meaning.

A spec names the cache layout (layers, KV heads, head dim, dtype), the rotary position embedding that was applied
to the keys (type and parameters, partial rotary factor; one per layer where the model has one per layer type, as
Gemma 3 does), per-layer sliding windows, and a fingerprint over the model's config, weights and tokenizer
vocabulary. Two caches can be exchanged only when their fingerprints match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvpack.errors import FormatError, UnsupportedModelError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "none")
_WEIGHTS_DIGEST_ATTR = "_kvpack_weights_digest"


def dtype_name(dtype: torch.dtype) -> str:
    """The name kvpack uses for a supported KV dtype (``float32``, ``float16`` or ``bfloat16``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; kvpack handles {sorted(DTYPES)}")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding applied to keys (Su et al., RoFormer, arXiv 2104.09864), as transformers parameterizes it.

    ``params`` holds the scaling parameters of the type (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``attention_factor``, ...).
    """

    type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unknown RoPE type {self.type!r}; expected one of {ROPE_TYPES}")
        if not self.theta > 0:
            raise ValueError(f"RoPE theta must be positive, got {self.theta}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")


@dataclass(frozen=True)
class ModelSpec:
    """Layout and identity of a model's KV cache.

    Keys and values of layer ``i`` have shape ``[num_kv_heads, tokens, head_dim]`` and dtype ``dtype``.
    ``sliding_windows[i]`` is the window of layer ``i`` or ``None`` for full attention.
    ``fingerprint`` is a hex SHA-256 over config, weights digest, dtype and tokenizer vocabulary.
    ``layer_ropes``: empty when every layer's keys carry ``rope``; else the RoPE of each layer (models with one RoPE
    per layer type: ``rope`` is then the full-attention layers' one). :meth:`rope_of` reads either.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope: RopeSpec
    sliding_windows: tuple[int | None, ...]
    fingerprint: str
    name: str = ""
    layer_ropes: tuple[RopeSpec, ...] = ()

    def __post_init__(self) -> None:
        for attr in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, attr)
            if not isinstance(value, int) or not 0 < value <= 1 << 16:
                raise ValueError(f"ModelSpec.{attr} must be a positive int <= 65536, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelSpec.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")
        if self.layer_ropes and len(self.layer_ropes) != self.num_layers:
            raise ValueError("layer_ropes needs one entry per layer (or none)")

    def rope_of(self, layer: int) -> RopeSpec:
        """The RoPE applied to layer ``layer``'s keys."""
        return self.layer_ropes[layer] if self.layer_ropes else self.rope

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elements_per_token(self) -> int:
        """Number of K and V elements one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def buffer_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a :class:`~kvpack.kv.KVCache` buffer: ``[num_layers, 2, num_kv_heads, tokens, head_dim]``."""
        return (self.num_layers, 2, self.num_kv_heads, num_tokens, self.head_dim)

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.sliding_windows) if w is not None]

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; inverse of :meth:`from_json` (``layer_ropes`` only where the model has them, so the
        headers of every other model are what they were before the field existed)."""
        out = asdict(self)
        if not self.layer_ropes:
            del out["layer_ropes"]
        return out

    @classmethod
    def from_json(cls, obj: Any) -> ModelSpec:
        """Rebuild a spec from :meth:`to_json` output; malformed input raises :class:`FormatError`."""
        try:
            rope = RopeSpec(**obj["rope"])
            layer_ropes = tuple(RopeSpec(**r) for r in obj.get("layer_ropes", ()))
            fields = {k: obj[k] for k in ("num_layers", "num_kv_heads", "head_dim", "dtype", "fingerprint")}
            return cls(rope=rope, sliding_windows=tuple(obj["sliding_windows"]), name=str(obj.get("name", "")),
                       layer_ropes=layer_ropes, **fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"invalid model spec in header: {exc}") from None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None) -> ModelSpec:
        """Read the spec of a transformers causal LM (and its tokenizer, which enters the fingerprint)."""
        config = model.config
        dtype = next(model.parameters()).dtype
        fingerprint = hashlib.sha256()
        for part in (config_digest(config), weights_digest(model), dtype_name(dtype), _vocab_digest(tokenizer)):
            fingerprint.update(part.encode())
        return cls.from_config(config, dtype, fingerprint.hexdigest())

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype, fingerprint: str) -> ModelSpec:
        """The spec of a model with this transformers ``config`` whose KV is kept in ``dtype``, under a fingerprint
        the caller computed (for engines that hold the weights in their own layout, e.g. vLLM)."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        _refuse_unsupported(text_config)
        num_heads = int(text_config.num_attention_heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads)
        num_kv_heads = int(getattr(text_config, "num_key_value_heads", None) or num_heads)
        num_layers = int(text_config.num_hidden_layers)
        rope, layer_ropes = _ropes(text_config, num_layers)
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype_name(dtype),
            rope=rope,
            sliding_windows=_sliding_windows(text_config, num_layers),
            fingerprint=fingerprint,
            name=str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "")),
            layer_ropes=layer_ropes,
        )


def weights_digest(model: torch.nn.Module) -> str:
    """BLAKE2b over every parameter and buffer (name, dtype, shape, bytes); computed once per model object."""
    cached = getattr(model, _WEIGHTS_DIGEST_ATTR, None)
    if isinstance(cached, str):
        return cached
    digest = hashlib.blake2b(digest_size=32)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    value = digest.hexdigest()
    setattr(model, _WEIGHTS_DIGEST_ATTR, value)
    return value


def config_digest(config: Any) -> str:
    """SHA-256 of a transformers config's JSON, without the fields that name where or how it was loaded."""
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _vocab_digest(tokenizer: Any) -> str:
    if tokenizer is None:
        return "no-tokenizer"
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def _ropes(config: Any, num_layers: int) -> tuple[RopeSpec, tuple[RopeSpec, ...]]:
    """``(rope, layer_ropes)`` of a transformers config: one RoPE for every layer, or, where ``rope_parameters`` is
    keyed by layer type (Gemma 3: local and global theta), the full-attention one and one per layer."""
    params = getattr(config, "rope_parameters", None)
    if not (isinstance(params, dict) and params and set(params) <= set(KV_LAYER_TYPES)):
        return _rope_spec(config), ()
    by_type = {kind: _rope_spec(config, dict(p)) for kind, p in params.items()}
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != num_layers or not set(types) <= set(by_type):
        raise UnsupportedModelError(f"{getattr(config, 'model_type', 'this model')} has RoPE parameters per layer "
                                    f"type {sorted(by_type)} but layer types {types}")
    return by_type.get("full_attention", by_type[types[0]]), tuple(by_type[t] for t in types)


def _rope_spec(config: Any, params: dict[str, Any] | None = None) -> RopeSpec:
    """RoPE settings from a transformers config (v5 ``rope_parameters`` or the older ``rope_scaling``), or from
    ``params``, one layer type's entry of them."""
    if params is None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        scaling = getattr(config, "rope_scaling", None)
        if isinstance(scaling, dict):
            params = {**scaling, **params}
    theta = float(params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0)
    rope_type = str(params.pop("rope_type", None) or params.pop("type", None) or "default")
    params.pop("type", None)
    partial = float(params.pop("partial_rotary_factor", None) or getattr(config, "partial_rotary_factor", 1.0) or 1.0)
    clean = {k: v for k, v in params.items() if isinstance(v, int | float | str | bool | None | list)}
    scaled = rope_type in ("linear", "llama3", "yarn", "dynamic", "longrope")
    if scaled and "original_max_position_embeddings" not in clean:
        clean["original_max_position_embeddings"] = getattr(config, "max_position_embeddings", None)
    return RopeSpec(type=rope_type, theta=theta, partial_rotary_factor=partial, params=clean)


#: Cache layer types kvpack stores: a K/V pair per token (transformers' ``layer_types`` vocabulary).
KV_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def _refuse_unsupported(config: Any) -> None:
    """:class:`UnsupportedModelError` for caches that are not one K/V pair per token per layer, naming what differs."""
    name = getattr(config, "model_type", "this model")
    layer_types = list(getattr(config, "layer_types", None) or [])
    other = sorted({t for t in layer_types if t not in KV_LAYER_TYPES})
    if other:
        raise UnsupportedModelError(
            f"{name} has cache layers of type {', '.join(other)} (recurrent/linear-attention state or shared KV), "
            f"besides {', '.join(sorted(set(layer_types) & set(KV_LAYER_TYPES))) or 'none'}; kvpack stores one K/V "
            "pair per token per layer. Supporting it needs a codec section for that state and exact restore rules.")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "kv_sharing_modes", None):
        raise UnsupportedModelError(
            f"{name} caches multi-head latent attention (MLA) latents or shares KV between layers; kvpack stores one "
            "K/V pair of equal head dims per layer. Supporting it needs a latent-cache layout in ModelSpec.")
    for attr in ("state_size", "mamba_d_state", "ssm_state_size", "linear_num_key_heads"):
        if getattr(config, attr, None):
            raise UnsupportedModelError(
                f"{name} has recurrent (Mamba/linear-attention) layers ({attr}); their state is not a per-token "
                "K/V pair, which is what kvpack stores")
    per_layer = getattr(config, "per_layer_config", None) or []
    dims = {(getattr(c, "num_key_value_heads", None), getattr(c, "head_dim", None)) for c in per_layer}
    if len(dims) > 1:
        raise UnsupportedModelError(
            f"{name} has layers with different KV heads / head dims {sorted(dims, key=str)}; kvpack keeps one buffer "
            "of uniform layers. Supporting it needs one buffer per layer group.")


def _sliding_windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        return tuple(window if t in ("sliding_attention", "chunked_attention") else None for t in layer_types)
    use_sliding = getattr(config, "use_sliding_window", window is not None)
    return tuple(window if (window and use_sliding) else None for _ in range(num_layers))
