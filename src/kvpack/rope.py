"""Rotary position embedding (RoPE) of cached keys: apply, undo, and move keys to other positions.

RoPE (Su et al., RoFormer, arXiv 2104.09864) rotates each pair of channels ``(i, i + dim/2)`` of a key at position
``p`` by the angle ``p * inv_freq[i]``, in the "rotate half" layout transformers uses for Llama, Qwen, Mistral and
Gemma. With a partial rotary factor only the first ``dim = int(head_dim * factor)`` channels are rotated; the rest pass
through. Scaled variants change ``inv_freq`` (``linear``: position interpolation, Chen et al. arXiv 2306.15595;
``llama3``: wavelength-dependent interpolation; ``yarn``: Peng et al. arXiv 2309.00071, which also multiplies cos and
sin by an ``attention_factor``). ``dynamic`` NTK scaling (and ``longrope``) change the frequencies with the total
sequence length, so a stored key cannot be un-rotated without knowing that length: they are refused.

Angles are computed in float32 exactly as transformers computes them (``position.float() * inv_freq``), so undoing
the rotation of a key the model produced is exact up to the key's own rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvpack.errors import UnsupportedModelError
from kvpack.spec import ModelSpec, RopeSpec

SUPPORTED = ("default", "linear", "llama3", "yarn")


def rotary_dim(rope: RopeSpec, head_dim: int) -> int:
    """Number of leading channels of a head that RoPE rotates (even; ``head_dim`` unless partial rotary)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    if dim % 2 or dim <= 0:
        raise UnsupportedModelError(f"rotary dimension {dim} (head_dim {head_dim} x partial_rotary_factor "
                                    f"{rope.partial_rotary_factor}) must be positive and even")
    return dim


def _param(rope: RopeSpec, name: str, default: float | None = None) -> float:
    value = rope.params.get(name, default)
    if value is None:
        raise UnsupportedModelError(f"RoPE type {rope.type!r} needs parameter {name!r}, which the model spec lacks")
    return float(value)


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq float32 [rotary_dim / 2], attention_factor)`` of ``rope`` for heads of ``head_dim`` channels.

    Raises :class:`UnsupportedModelError` for ``dynamic``, ``longrope`` and ``none``.
    """
    if rope.type not in SUPPORTED:
        hint = (" (dynamic NTK scaling recomputes the frequencies from the total sequence length, so a stored key "
                "cannot be un-rotated or moved)" if rope.type in ("dynamic", "longrope") else "")
        raise UnsupportedModelError(f"RoPE type {rope.type!r} is not supported{hint}; kvpack handles {SUPPORTED}")
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    powers = rope.theta ** exponents
    inv_freq = 1.0 / powers
    if rope.type == "linear":
        return inv_freq / _param(rope, "factor"), 1.0
    if rope.type == "llama3":
        return _llama3(rope, inv_freq), 1.0
    if rope.type == "yarn":
        return _yarn(rope, powers, dim)
    return inv_freq, 1.0


def _llama3(rope: RopeSpec, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a linear blend in between."""
    factor = _param(rope, "factor")
    low, high = _param(rope, "low_freq_factor"), _param(rope, "high_freq_factor")
    context = _param(rope, "original_max_position_embeddings")
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    middle = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(middle, blended, scaled)


def _yarn(rope: RopeSpec, powers: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between ``beta_fast`` and ``beta_slow``."""
    factor = _param(rope, "factor")
    context = _param(rope, "original_max_position_embeddings")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.params.get("attention_factor")
    if attention is None:
        m, m_all = rope.params.get("mscale"), rope.params.get("mscale_all_dim")
        attention = mscale(factor, float(m)) / mscale(factor, float(m_all)) if m and m_all else mscale(factor)
    beta_fast = float(rope.params.get("beta_fast") or 32)
    beta_slow = float(rope.params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    inv_freq = (1.0 / (factor * powers)) * (1 - keep) + (1.0 / powers) * keep
    return inv_freq, float(attention)


def _cos_sin(positions: torch.Tensor, rope: RopeSpec, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos, sin [tokens, rotary_dim]`` (attention factor included), as transformers builds them."""
    inv_freq, attention = inverse_frequencies(rope, head_dim)
    angles = positions.reshape(-1, 1).float() * inv_freq
    both = torch.cat((angles, angles), dim=-1)
    return both.cos() * attention, both.sin() * attention


def rotation(positions: torch.Tensor, rope: RopeSpec, head_dim: int, inverse: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(cos, sin) [tokens, rotary_dim]`` that :func:`rotate` (or, ``inverse``, :func:`unrotate`) applies at
    ``positions`` as ``keys * cos + rotate_half(keys) * sin``: one rounding for the product with ``cos``, then one
    fused multiply-add for the ``sin`` term (what torch's ``mul_`` and ``addcmul_`` do; a fused CPU kernel,
    :mod:`kvpack.codecs.transform.features`, reproduces it bit for bit from these tables)."""
    cos, sin = _cos_sin(positions, rope, head_dim)
    if not inverse:
        return cos, sin
    _, attention = inverse_frequencies(rope, head_dim)
    scale = attention * attention
    return cos / scale, -sin / scale


def _turn(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys * cos + rotate_half(keys) * sin`` on the rotary channels, others unchanged: a new float32 tensor."""
    dim = cos.shape[-1]
    half = dim // 2
    cos, sin = cos.to(keys.device), sin.to(keys.device)  # computed on the CPU: the same angles on every device
    out = keys.to(torch.float32, copy=True)
    rot = out[..., :dim]
    rot.mul_(cos)
    rot[..., :half].addcmul_(keys[..., half:dim], sin[..., :half], value=-1)
    rot[..., half:].addcmul_(keys[..., :half], sin[..., half:])
    return out


def _check(keys: torch.Tensor, positions: torch.Tensor, head_dim: int) -> None:
    if keys.dim() < 2 or keys.shape[-1] != head_dim or keys.shape[-2] != positions.numel():
        raise ValueError(f"keys must be [..., tokens={positions.numel()}, head_dim={head_dim}], got "
                         f"{tuple(keys.shape)}")


def rotate(keys: torch.Tensor, positions: torch.Tensor, rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Apply RoPE: pre-RoPE ``keys [..., tokens, head_dim]`` at ``positions [tokens]`` -> post-RoPE (float32)."""
    _check(keys, positions, head_dim)
    return _turn(keys, *rotation(positions, rope, head_dim))


def unrotate(keys: torch.Tensor, positions: torch.Tensor, rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Undo RoPE: post-RoPE ``keys [..., tokens, head_dim]`` -> pre-RoPE (float32).

    The rotation by ``-angle`` is divided by ``attention_factor**2``, so that ``unrotate(rotate(k)) == k`` (yarn's
    factor multiplies cos and sin, i.e. scales the key).
    """
    _check(keys, positions, head_dim)
    return _turn(keys, *rotation(positions, rope, head_dim, inverse=True))


def rerotate(keys: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor, rope: RopeSpec,
             head_dim: int) -> torch.Tensor:
    """Move post-RoPE ``keys [..., tokens, head_dim]`` from ``from_positions`` to ``to_positions`` (float32).

    Values never change with position; only keys need this when a cached chunk is reused at another offset.
    """
    if from_positions.shape != to_positions.shape:
        raise ValueError("from_positions and to_positions must have the same shape")
    return rotate(unrotate(keys, from_positions, rope, head_dim), to_positions, rope, head_dim)


def by_layer(apply: Callable[[torch.Tensor, RopeSpec], torch.Tensor], keys: torch.Tensor,
             spec: ModelSpec) -> torch.Tensor:
    """``apply(keys[group], rope)`` for each group of layers of ``keys [layers, ...]`` that share a RoPE
    (:meth:`~kvpack.spec.ModelSpec.rope_of`; one call where every layer has the spec's), results in layer order
    (float32 ``[layers, ...]``), e.g. ``by_layer(lambda k, r: rerotate(k, a, b, r, head_dim), keys, spec)``."""
    if not spec.layer_ropes:
        return apply(keys, spec.rope)
    groups: list[tuple[RopeSpec, list[int]]] = []
    for layer, rope in enumerate(spec.layer_ropes):
        same = next((g for g in groups if g[0] == rope), None)
        if same is None:
            groups.append((rope, [layer]))
        else:
            same[1].append(layer)
    out = torch.empty(keys.shape, dtype=torch.float32)
    for rope, layers in groups:
        out[layers] = apply(keys[layers], rope)
    return out
