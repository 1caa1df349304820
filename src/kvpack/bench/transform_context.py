"""`kvpack bench transform-context`: would context-conditioned entropy tables raise `transform`? Measured before
anyone builds them (issue 16: "symbol tables conditioned on context ... adapted per chunk where the saving pays").

`transform` codes the levels of its principal components with rANS tables kept in the profile, one per rate class,
pooled over every component at that class (:mod:`kvpack.codecs.transform.codec`; docs/transform.md). This takes the
symbols a chunk's coder codes (:meth:`~kvpack.codecs.transform.Transform.level_symbols`, ``[n, T]``: component
``i``, coded token ``t``) on real caches cut into chunks as the store keeps them, and charges them under richer
models, in bits:

* ``today``: the profile's table of the component's rate class (what the codec spends, up to rANS's rounding);
* ``prev B``: tables per (class, context), the context the same component's symbol in the previous token clipped to
  ``B - 1`` (the first token of a chunk: 0);
* ``neighbour 4``: the symbol of the next more important component (PCA index one lower, same group, same token)
  clipped to 3, or a fifth context where that component is not entropy-coded; a decoder would have to decode the
  lanes of a chunk in component order instead of all at once;
* ``prev 4 x neighbour 4``: both (20 contexts);
* ``per-chunk tables``: tables per class made from the chunk's own counts, charged with their bytes
  (:func:`kvpack.bench.lossless_context.static_bits`: the format with per-chunk tables, as `lossless` has).

The context tables are estimated on other documents than the ones charged (two folds: even and odd documents), from
the counts plus the profile's table of the class with a weight of :data:`PRIOR` symbols, and charged by their
cross-entropy; in a codec they would be calibrated and stored in the profile like today's (48 x contexts x 256
frequencies: 25-250 KB, no bytes in a chunk). ``projected ratio`` is the fp16 bytes over what the codec stores today
(every byte of every chunk container) less the saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from kvpack.bench.lossless_context import static_bits
from kvpack.bench.rows import show_and_save
from kvpack.codecs.transform import Transform
from kvpack.eval.corpora import Document
from kvpack.kv import KVCache

ALPHABET = 256
#: Weight (symbols) of the profile's table in every context table estimated from the other fold's counts.
PRIOR = 64.0
#: Context name -> number of contexts (``per-chunk tables`` and ``today`` have one).
CONTEXTS = {"today": 1, "prev 2": 2, "prev 4": 4, "neighbour 4": 5, "prev 4 x neighbour 4": 20}


def contexts(symbols: np.ndarray, groups: np.ndarray, components: np.ndarray) -> dict[str, np.ndarray]:
    """The contexts of the module docstring for symbols ``[n, T]`` of components ``(groups, components)`` (``[n]``
    each): name -> int64 ``[n, T]``, values below :data:`CONTEXTS` of the name."""
    s = symbols.astype(np.int64)
    prev = np.zeros_like(s)
    prev[:, 1:] = s[:, :-1]
    where = {(int(g), int(c)): i for i, (g, c) in enumerate(zip(groups, components, strict=True))}
    above = np.array([where.get((int(g), int(c) - 1), -1) for g, c in zip(groups, components, strict=True)],
                     np.int64)
    neighbour = np.where((above >= 0)[:, None], np.minimum(s[np.maximum(above, 0)], 3), 4)
    prev4 = np.minimum(prev, 3)
    return {"today": np.zeros_like(s), "prev 2": np.minimum(prev, 1), "prev 4": prev4, "neighbour 4": neighbour,
            "prev 4 x neighbour 4": prev4 * 5 + neighbour}


def _counts(symbols: np.ndarray, classes: np.ndarray, ctx: np.ndarray, n_ctx: int, n_classes: int) -> np.ndarray:
    """int64 ``[n_classes, n_ctx, ALPHABET]`` symbol counts per (rate class, context)."""
    key = ((classes[:, None] * n_ctx + ctx) * ALPHABET + symbols).ravel()
    return np.bincount(key, minlength=n_classes * n_ctx * ALPHABET).reshape(n_classes, n_ctx, ALPHABET)


def _cross_entropy(counts: np.ndarray, probs: np.ndarray) -> float:
    """Bits of coding ``counts`` with probabilities ``probs`` (same shape)."""
    used = counts > 0
    return -float((counts[used] * np.log2(probs[used])).sum())


def measure(codec: Transform, caches: Sequence[KVCache], chunk: int | None) -> list[dict[str, Any]]:
    """One row per model of the module docstring for ``caches`` cut into ``chunk``-token chunks (None: each whole):
    bits of the level symbols summed over every chunk, the saving against ``today`` and the projected ratio."""
    freqs = codec.state().freqs.astype(np.float64)
    n_classes = freqs.shape[0]
    static = freqs / freqs.sum(axis=1, keepdims=True)
    per_doc: list[dict[str, np.ndarray]] = []
    own = [0.0, 0.0]  # per-chunk tables: code, table bytes (bits)
    stored = fp16 = n_symbols = 0
    for kv in caches:
        acc = {name: np.zeros((n_classes, n, ALPHABET), np.int64) for name, n in CONTEXTS.items()}
        for part in kv.chunks(chunk or kv.num_tokens):
            stored += len(codec.encode(part))
            fp16 += part.fp16_bytes
            lv = codec.level_symbols(part)
            if not lv.symbols.size:
                continue
            n_symbols += lv.symbols.size
            chunk_counts = {name: _counts(lv.symbols, lv.classes, ctx, CONTEXTS[name], n_classes)
                            for name, ctx in contexts(lv.symbols, lv.groups, lv.components).items()}
            for name, counts in chunk_counts.items():
                acc[name] += counts
            mine = chunk_counts["today"][:, 0]  # this chunk's counts per class: what per-chunk tables fit
            code, tables = static_bits(mine[mine.sum(axis=1) > 0])
            own[0] += code
            own[1] += tables
        per_doc.append(acc)
    bits: dict[str, float] = {}
    for name in CONTEXTS:
        total = 0.0
        for i, acc in enumerate(per_doc):
            if name == "today":
                total += _cross_entropy(acc[name][:, 0], static)
                continue
            train = sum((d[name] for j, d in enumerate(per_doc) if j % 2 != i % 2), np.zeros_like(acc[name]))
            probs = train + PRIOR * static[:, None, :]
            total += _cross_entropy(acc[name], probs / probs.sum(axis=2, keepdims=True))
        bits[name] = total
    bits["per-chunk tables"] = own[0] + own[1]
    today = bits["today"]
    return [{"chunk_tokens": chunk, "model": name, "contexts": CONTEXTS.get(name, 1),
             "bits_per_symbol": b / max(n_symbols, 1), "table_bits_per_symbol": own[1] / max(n_symbols, 1)
             if name == "per-chunk tables" else 0.0, "saving": 1 - b / today if today else 0.0,
             "ratio_today": fp16 / stored, "projected_ratio": fp16 / (stored - (today - b) / 8),
             "symbols": n_symbols, "stored_bytes": stored, "fp16_bytes": fp16, "documents": len(caches)}
            for name, b in bits.items()]


def run(codec: Transform, entries: Sequence[tuple[Document, KVCache]], chunks: Sequence[int | None] = (256, None),
        json_path: Path | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """:func:`measure` at every chunk size in ``chunks``; print, optionally write JSON (rows name the codec and its
    profile's hash)."""
    if len(entries) < 2:
        raise ValueError("transform-context needs at least 2 documents (context tables are estimated on the others)")
    console = console or Console()
    rows = []
    for chunk in chunks:
        with console.status(f"measuring at {chunk or 'whole-document'} chunks ..."):
            rows += [{**r, "codec": codec.name, "params": codec.params(), "profile": codec.calibration.hash,
                      "document_names": [doc.name for doc, _ in entries]}
                     for r in measure(codec, [kv for _, kv in entries], chunk)]
    show_and_save(rows, f"{codec.name} level symbols under richer entropy models", COLUMNS, _cells, console,
                  json_path, left="model")
    return rows


COLUMNS = ("chunk", "model", "contexts", "bits/symbol", "of which tables", "saving %", "ratio today",
           "projected ratio")


def _cells(r: dict[str, Any]) -> list[str]:
    return [str(r["chunk_tokens"] or "doc"), r["model"], str(r["contexts"]), f"{r['bits_per_symbol']:.4f}",
            f"{r['table_bits_per_symbol']:.4f}", f"{100 * r['saving']:+.2f}", f"{r['ratio_today']:.2f}",
            f"{r['projected_ratio']:.2f}"]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """The results page."""
    first = rows[0]
    lines = ["# `transform` levels under context-conditioned entropy tables", "",
             f"Produced by `{command}` on {first['documents']} real caches of SmolLM2-135M "
             f"({', '.join(first['document_names'])}); {first['codec']} {first['params']}, profile "
             f"{first['profile'][:12]}. What the rows mean: `kvpack.bench.transform_context`'s docstring. `saving` is "
             "of the level symbols' bits against `today` (the profile's table per rate class; a positive saving is "
             "smaller); `projected ratio` is what the codec would store with the model instead, every other byte "
             "unchanged.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
