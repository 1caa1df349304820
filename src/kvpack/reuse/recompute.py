"""Selective recompute: new K/V for chosen tokens of an assembled cache, every other token's K/V kept as loaded.

This is the repair step CacheBlend (Yao et al., arXiv 2405.16444, §4) and EPIC (Hu et al., arXiv 2410.15332) build
on: a cache assembled from separately encoded segments has the right K/V for nothing after the first segment, and
recomputing a few tokens lets them attend across the segment boundaries. Running the model over the whole
concatenated sequence would recompute everything; instead the chosen tokens alone go through the model as queries,
at their own positions, on top of a transformers cache that holds the *other* tokens' loaded K/V:

- the cache gets one ``DynamicLayer`` per layer with the loaded K/V of the unchosen tokens (in position order);
- the chosen tokens' ids go in with ``position_ids`` = their positions, so the model rotates their queries and keys
  for exactly those positions;
- a 4-D attention mask lets chosen token ``r`` see key ``j`` iff ``pos_j <= pos_r`` (and, on a sliding layer of
  window ``W``, ``pos_r - pos_j < W``), over ``[unchosen..., chosen...]`` in the cache's order.

At every layer a chosen token therefore attends to the loaded K/V of the unchosen tokens before it and to the fresh
K/V of the chosen tokens before it (and itself), computed at that same layer in the same pass: exactly "recompute
these tokens, load the rest". With every token after an exact prefix chosen it is a plain prefill (tested against
one); with a contiguous tail chosen it equals a plain prefill of that tail on top of the loaded head (tested).
The floating-point summation order differs from a causal prefill (masked attention over another key order), so
results agree to rounding, not bit for bit.

Needs the ``sdpa`` or ``eager`` attention implementation (a boolean or an additive mask); models whose layers mix
several sliding windows or use chunked attention are refused (:class:`UnsupportedModelError`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from kvpack.errors import UnsupportedModelError
from kvpack.inference import as_batch, cache_arg
from kvpack.kv import KVCache, hf_cache

#: Attention implementations whose masks this module builds: boolean (``sdpa``) or additive (``eager``).
ATTENTION = ("sdpa", "eager")


class _Stop(Exception):
    """Raised by a forward hook to end this thread's pass early (nothing after that layer is needed)."""


#: ``narrow(layer, tokens, fresh)``: given the sorted token indices ``[m]`` recomputed at ``layer`` and their fresh
#: K/V there ``[2, kv_heads, m, head_dim]``, the sorted subset of ``tokens`` to recompute at the next layer.
Narrow = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_tokens(kv: KVCache, selected: torch.Tensor) -> torch.Tensor:
    """``kv``'s token ids ``[tokens]``, once ``selected`` is checked to be sorted, distinct indices into them."""
    if kv.token_ids is None:
        raise ValueError("recompute needs the cache's token_ids (the assembled prompt's tokens)")
    if selected.dim() != 1 or (selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= kv.num_tokens)):
        raise ValueError(f"selected must be 1-D token indices in [0, {kv.num_tokens})")
    if selected.numel() > 1 and not bool((selected[1:] > selected[:-1]).all()):
        raise ValueError("selected token indices must be sorted and distinct")
    return kv.token_ids


def _others(kv: KVCache, selected: torch.Tensor) -> torch.Tensor:
    """The token indices of ``kv`` not in ``selected`` (sorted): the ones whose loaded K/V the recomputed attend to."""
    keep = torch.ones(kv.num_tokens, dtype=torch.bool)
    keep[selected] = False
    return keep.nonzero().reshape(-1)


def _loaded_cache(kv: KVCache, selected: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The token indices not in ``selected`` and a transformers cache holding their loaded K/V (sliding layers too:
    the mask applies their window)."""
    kept = _others(kv, selected)
    return kept, hf_cache(kv.data.index_select(3, kept))


def _run(model: Any, kv: KVCache, ids: torch.Tensor, selected: torch.Tensor, kept: torch.Tensor, cache: Any) -> None:
    """The forward pass of tokens ``selected`` as queries at their positions on ``cache`` (the loaded K/V of
    ``kept``), which it extends layer by layer; a hook raising :class:`_Stop` ends it early."""
    q_pos = kv.positions[selected]
    mask = attention_mask(model, kv.spec.sliding_windows, q_pos, torch.cat([kv.positions[kept], q_pos]))
    try:
        with torch.no_grad():
            model(as_batch(ids[selected]), position_ids=q_pos.reshape(1, -1), attention_mask=mask,
                  use_cache=True, **cache_arg(model, cache))
    except _Stop:
        pass


def recompute(model: Any, kv: KVCache, selected: torch.Tensor) -> torch.Tensor:
    """Fresh K/V of tokens ``selected`` of ``kv``, attending to the loaded K/V of every other token of ``kv``.

    ``kv`` is an assembled cache (``data [layers, 2, kv_heads, tokens, head_dim]``, ``positions``, ``token_ids``);
    ``selected`` sorted, distinct int64 token indices ``[m]`` into it. Returns ``[layers, 2, kv_heads, m, head_dim]``
    in the cache's dtype. ``kv`` is not modified.
    """
    spec = kv.spec
    ids = _check_tokens(kv, selected)
    if selected.numel() == 0:
        return kv.data.new_empty((spec.num_layers, 2, spec.num_kv_heads, 0, spec.head_dim))
    kept, cache = _loaded_cache(kv, selected)
    _run(model, kv, ids, selected, kept, cache)
    out = kv.data.new_empty((spec.num_layers, 2, spec.num_kv_heads, selected.numel(), spec.head_dim))
    for i in range(spec.num_layers):
        out[i, 0].copy_(cache.layers[i].keys[0, :, kept.numel() :])
        out[i, 1].copy_(cache.layers[i].values[0, :, kept.numel() :])
    return out


def recompute_narrowing(model: Any, kv: KVCache, first: torch.Tensor, narrow: Narrow
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fresh K/V of a token set that narrows layer by layer: CacheBlend's gradual filtering (Yao et al., arXiv
    2405.16444, §4.3), in one pass over the model.

    Tokens ``first`` (sorted, distinct int64 indices ``[m0]`` of ``kv``) go through layer 0 as queries, as in
    :func:`recompute`; after each layer ``l``, ``narrow(l, S_l, fresh_l)`` picks ``S_{l+1}``, a sorted subset of
    ``S_l``, and only those go on through layer ``l + 1`` (their hidden states from layer ``l``'s output), attending
    at that layer to the fresh K/V of ``S_{l+1}`` and to the loaded K/V of every other token, including the tokens
    dropped on the way: they keep their fresh K/V in the layers they were recomputed in and their loaded K/V above.
    With ``narrow`` never narrowing it is :func:`recompute` of ``first`` (the same computation). Returns
    ``(tokens, fresh)``: per layer, ``S_l [m_l]`` and its K/V ``[2, kv_heads, m_l, head_dim]`` (empty sets for the
    layers after the set became empty: the pass stops there). ``kv`` is not modified.
    """
    spec = kv.spec
    ids = _check_tokens(kv, first)
    first = first.contiguous()
    sets, fresh = [first], []
    empty = kv.data.new_empty((2, spec.num_kv_heads, 0, spec.head_dim))
    if first.numel() == 0:
        return sets * spec.num_layers, [empty] * spec.num_layers
    kept, cache = _loaded_cache(kv, first)
    owner = threading.get_ident()
    layers = model.get_decoder().layers

    def before(i: int) -> Any:
        def hook(module: Any, args: Any, kwargs: Any) -> Any:
            if threading.get_ident() != owner or sets[i].numel() == first.numel():
                return None  # nothing narrowed yet: the model's own inputs are this layer's
            now, rows = sets[i], torch.searchsorted(first, sets[i])
            others = _others(kv, now)
            cache.layers[i].keys = kv.data[i, 0, :, others].unsqueeze(0)
            cache.layers[i].values = kv.data[i, 1, :, others].unsqueeze(0)
            pos = kv.positions[now]
            kwargs["attention_mask"] = attention_mask(model, spec.sliding_windows[i : i + 1], pos,
                                                      torch.cat([kv.positions[others], pos]))
            kwargs["position_embeddings"] = tuple(t[:, rows] for t in kwargs["position_embeddings"])
            kwargs["position_ids"] = kwargs["position_ids"][:, rows]
            hidden = args[0][:, torch.searchsorted(sets[i - 1], now)]  # the previous layer ran on sets[i - 1]
            return (hidden, *args[1:]), kwargs

        return hook

    def after(i: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if threading.get_ident() != owner:
                return
            m = sets[i].numel()
            fresh.append(torch.stack([cache.layers[i].keys[0, :, -m:], cache.layers[i].values[0, :, -m:]]))
            if i + 1 < spec.num_layers:
                nxt = narrow(i, sets[i], fresh[i])
                unsorted = nxt.numel() > 1 and not bool((nxt[1:] > nxt[:-1]).all())
                if unsorted or not bool(torch.isin(nxt, sets[i]).all()):
                    raise ValueError(f"narrow must return a sorted subset of the layer's tokens (layer {i})")
                sets.append(nxt.contiguous())
                if nxt.numel() == 0:
                    raise _Stop

        return hook

    handles = [h for i, layer in enumerate(layers[: spec.num_layers])
               for h in (layer.register_forward_pre_hook(before(i), with_kwargs=True),
                         layer.register_forward_hook(after(i)))]
    try:
        _run(model, kv, ids, first, kept, cache)
    finally:
        for h in handles:
            h.remove()
    while len(fresh) < spec.num_layers:
        sets.append(first[:0])
        fresh.append(empty)
    return sets[: spec.num_layers], fresh


def attention_mask(model: Any, windows: tuple[int | None, ...], q_pos: torch.Tensor,
                   k_pos: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D mask ``[1, 1, queries, keys]`` letting a query at ``q_pos[r]`` see a key at ``k_pos[j]`` iff
    ``k_pos[j] <= q_pos[r]`` (and ``q_pos[r] - k_pos[j] < W`` on a sliding layer of window ``W``).

    One tensor when every layer has the same window (transformers then uses it for all layers), else a dict by layer
    type (``full_attention``, ``sliding_attention``), which the models that mix them accept. Boolean for ``sdpa``,
    additive (0 or the dtype's minimum) for ``eager``.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ATTENTION:
        raise UnsupportedModelError(f"selective recompute builds attention masks for {ATTENTION}, not {impl!r}; load "
                                    "the model with attn_implementation='sdpa'")
    layer_types = set(getattr(model.config.get_text_config(), "layer_types", None) or [])
    sizes = {w for w in windows if w is not None}
    if "chunked_attention" in layer_types or len(sizes) > 1:
        raise UnsupportedModelError("selective recompute handles full attention and one sliding window; this model "
                                    f"has layer types {sorted(layer_types)} and windows {sorted(sizes)}")
    dtype = next(model.parameters()).dtype

    def build(window: int | None) -> torch.Tensor:
        ok = k_pos.reshape(1, -1) <= q_pos.reshape(-1, 1)
        if window is not None:
            ok &= (q_pos.reshape(-1, 1) - k_pos.reshape(1, -1)) < window
        ok = ok[None, None]
        if impl == "sdpa":
            return ok
        return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)

    if len(set(windows)) == 1:
        return build(windows[0])
    return {"full_attention": build(None), "sliding_attention": build(next(iter(sizes)))}
