"""`kvpack bench lossless-context`: would context modelling raise `lossless`? Its symbol's conditional entropies.

`lossless` codes one symbol per element (row max exponent minus exponent, sign xor the row's majority sign, top
mantissa bit; :mod:`kvpack.codecs.lossless`) with rANS tables per ``(layer, K/V, class of rows)``, and stores the
other mantissa bits raw. This measures, on real caches cut into chunks as the store keeps them, what coding the same
symbols under a richer context would cost, before anyone builds it. A context is a small integer computed from
symbols a decoder already has; the contexts (:func:`contexts`, symbols ``[groups, heads, dim, tokens]``):

* ``today``: none beyond the codec's own ``(layer, K/V, class)``;
* ``prev rel B``: the previous token's exponent offset in the same row, clipped to ``B - 1`` (escapes count as the
  largest; the first token counts as 1);
* ``prev rel 3 x prev sign``: that, times the previous token's (flipped) sign;
* ``neighbour rel 3``: the exponent offset of channel ``c - 1`` in the same token (channel 0 counts as 1);
* ``rope partner rel 3``: keys only, channels ``c >= dim / 2`` by their RoPE partner ``c - dim / 2`` in the same
  token (1 + clipped offset; other channels and values: 0);
* ``prev rel 3 x rope partner``: both;
* ``prev symbol``: the previous token's whole symbol (offset clipped to 15), 65 contexts.

Each is charged two ways, per chunk, tables per ``(layer, K/V, class, context)`` with the codec's classes:

* ``static``: the coded size under rANS tables quantized from the chunk's own counts (``code``, what the lane coder
  would spend) plus those tables as :func:`kvpack.entropy.pack_tables` writes them (``tables``): the codec's format
  with per-symbol table switching; ``code`` alone is the size if tables were free (a lower bound that overfits as
  contexts multiply);
* ``adaptive``: the code length of an adaptive model, counts per context starting from ``ALPHA`` per symbol and
  updated after every symbol (a sequential Dirichlet estimate; it needs no tables, and its length does not depend on
  the order of symbols within a context).

``projected`` adds the difference to ``today``'s static cost to the bits per element the codec writes today
(``actual``, every section of :func:`kvpack.codecs.lossless.encode_bits`, no container header), and ``ratio`` is
16 over it. The ``mantissa bit b`` rows give the empirical entropy of raw mantissa bit ``b`` (6 bits lie below the
top one in bf16: ``b`` = 5 is the highest) given ``(layer, K/V, exponent offset clipped to 7)``, against the 1 bit
it costs raw. bf16 caches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from kvpack.bench.rows import show_and_save
from kvpack.codecs.clusters import RowCounts, assign_classes
from kvpack.codecs.lossless import LosslessCodec, encode_bits, split_bits
from kvpack.entropy import PROB_SCALE, pack_tables, quantize_freqs
from kvpack.eval.corpora import Document
from kvpack.kv import KVCache, int_view

#: Prior count of every symbol in the adaptive model (the best of 1/64, 1/16, 1/4 on SmolLM2's caches).
ALPHA = 1 / 64
ALPHABET = 256
#: Raw mantissa bits whose conditional entropy is reported (bf16: bit 5 is the highest raw one).
MANTISSA_BITS = (5, 4)


def chunk_symbols(bits: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbols and classes of one chunk of bf16 bits ``[groups, heads, tokens, dim]``.

    Returns:
        ``(symbols, table)``: int64 ``[groups, heads, dim, tokens]`` as the codec makes them, and int64 ``[groups,
        heads, dim, 1]``, the ``group * classes + class`` table each row gets (:func:`assign_classes`).
    """
    groups, heads, tokens, dim = bits.shape
    symbols = split_bits(bits, "bfloat16").symbols  # [groups, heads * dim, tokens]
    cls = assign_classes(RowCounts.of(symbols, ALPHABET), classes)[0].astype(np.int64)
    rows = symbols.astype(np.int64)
    table = np.arange(groups, dtype=np.int64)[:, None] * classes + cls
    return rows.reshape(groups, heads, dim, tokens), table.reshape(groups, heads, dim, 1)


def _before(a: np.ndarray, axis: int, first: int) -> np.ndarray:
    """``a`` shifted by one along ``axis`` (element ``i`` gets ``a[i - 1]``), ``first`` at index 0."""
    head = np.full_like(np.take(a, [0], axis=axis), first)
    return np.concatenate([head, np.delete(a, -1, axis=axis)], axis=axis)


def contexts(symbols: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """The contexts of the module docstring for symbols ``[groups, heads, dim, tokens]`` (groups alternate K, V):
    name -> (int64 context, broadcastable to the symbols, values ``< n``; ``n``)."""
    groups, _, dim, _ = symbols.shape
    rel = symbols >> 2  # escapes (255) give 63
    sign = (symbols >> 1) & 1
    prev = {b: _before(np.minimum(rel, b - 1), 3, 1) for b in (2, 3, 4)}
    half = dim // 2
    keys_upper = (np.arange(groups) % 2 == 0)[:, None, None, None] & (np.arange(dim) >= half)[None, None, :, None]
    partner = np.where(keys_upper, 1 + np.roll(np.minimum(rel, 2), half, axis=2), 0)
    prev_symbol = _before((np.minimum(rel, 15) << 2) | (symbols & 3), 3, 64)
    return {
        "today": (np.zeros(1, np.int64), 1),
        **{f"prev rel {b}": (prev[b], b) for b in (2, 3, 4)},
        "prev rel 3 x prev sign": (prev[3] * 2 + _before(sign, 3, 0), 6),
        "neighbour rel 3": (_before(np.minimum(rel, 2), 2, 1), 3),
        "rope partner rel 3": (partner, 4),
        "prev rel 3 x rope partner": (prev[3] * 4 + partner, 12),
        "prev symbol": (prev_symbol, 65),
    }


def _counts(symbols: np.ndarray, table: np.ndarray, ctx: np.ndarray, n_ctx: int, n_tables: int) -> np.ndarray:
    """int64 ``[n_tables * n_ctx, ALPHABET]`` symbol counts per (table, context)."""
    key = ((table * n_ctx + ctx) * ALPHABET + symbols).ravel()
    return np.bincount(key, minlength=n_tables * n_ctx * ALPHABET).reshape(-1, ALPHABET)


def static_bits(counts: np.ndarray) -> tuple[float, float]:
    """``(code, tables)`` bits of coding ``counts [tables, ALPHABET]`` with rANS tables quantized from them."""
    freqs = quantize_freqs(counts)
    used = counts > 0
    code = -float((counts[used] * np.log2(freqs[used] / PROB_SCALE)).sum())
    return code, 8.0 * len(pack_tables(freqs))


def adaptive_bits(counts: np.ndarray, alpha: float = ALPHA) -> float:
    """Code length (bits) of the symbols counted in ``counts [contexts, ALPHABET]`` under an adaptive model per
    context that starts every symbol at ``alpha`` and counts as it goes (a Dirichlet-multinomial sequence)."""
    c = torch.from_numpy(counts[counts > 0].astype(np.float64))
    n = torch.from_numpy(counts.sum(axis=1).astype(np.float64))
    a = torch.tensor(alpha, dtype=torch.float64)
    nats = (torch.lgamma(n + ALPHABET * a) - torch.lgamma(ALPHABET * a)).sum() - (torch.lgamma(c + a)
                                                                                 - torch.lgamma(a)).sum()
    return float(nats) / float(np.log(2))


def _mantissa_bits(bits: np.ndarray, symbols: np.ndarray) -> dict[int, float]:
    """Empirical entropy (bits, summed) of each raw mantissa bit of :data:`MANTISSA_BITS` given (group, clipped
    exponent offset), for bits ``[groups, heads, tokens, dim]`` and their symbols ``[groups, heads, dim, tokens]``."""
    groups = bits.shape[0]
    ctx = np.arange(groups)[:, None, None, None] * 8 + np.minimum(symbols >> 2, 7)
    out = {}
    for b in MANTISSA_BITS:
        bit = (bits.transpose(0, 1, 3, 2).astype(np.int64) >> b) & 1
        n = np.bincount((ctx * 2 + bit).ravel(), minlength=groups * 16).reshape(-1, 2).astype(np.float64)
        p = n / np.maximum(n.sum(axis=1, keepdims=True), 1.0)
        out[b] = -float((n[n > 0] * np.log2(p[n > 0])).sum())
    return out


def measure(caches: Sequence[KVCache], chunk: int | None, classes: int = LosslessCodec.classes) -> list[dict[str, Any]]:
    """Rows (one per context, then one per mantissa bit) for bf16 ``caches`` cut into ``chunk``-token chunks (None:
    each whole); bits are summed over every chunk and divided by the elements."""
    total: dict[str, list[float]] = {}
    mantissa = dict.fromkeys(MANTISSA_BITS, 0.0)
    actual = elements = 0
    for kv in caches:
        if kv.spec.dtype != "bfloat16":
            raise ValueError(f"lossless-context measures bf16 caches, got {kv.spec.dtype}")
        spec = kv.spec
        for part in kv.chunks(chunk or kv.num_tokens):
            bits = int_view(part.tiles()).numpy().view(np.uint16).reshape(
                2 * spec.num_layers, spec.num_kv_heads, part.num_tokens, spec.head_dim)
            actual += 8 * sum(len(s) for s in encode_bits(bits, "bfloat16", classes).values())
            symbols, table = chunk_symbols(bits, classes)
            elements += symbols.size
            n_tables = bits.shape[0] * classes
            for name, (ctx, n_ctx) in contexts(symbols).items():
                counts = _counts(symbols, table, ctx, n_ctx, n_tables)
                acc = total.setdefault(name, [0.0, 0.0, 0.0])
                for i, v in enumerate((*static_bits(counts), adaptive_bits(counts))):
                    acc[i] += v
            for b, h in _mantissa_bits(bits, symbols).items():
                mantissa[b] += h
    today = (total["today"][0] + total["today"][1]) / elements
    actual_bpe = actual / elements
    rows: list[dict[str, Any]] = []
    for name, (code, tables, adaptive) in total.items():
        static = (code + tables) / elements
        best = min(static, adaptive / elements)
        rows.append({"chunk_tokens": chunk, "context": name, "code": code / elements, "tables": tables / elements,
                     "static": static, "adaptive": adaptive / elements, "actual": actual_bpe,
                     "projected": actual_bpe + best - today, "ratio": 16 / (actual_bpe + best - today),
                     "elements": elements})
    for b, h in mantissa.items():
        rows.append({"chunk_tokens": chunk, "context": f"mantissa bit {b}", "entropy": h / elements,
                     "saving": 1 - h / elements, "elements": elements})
    return rows


def run(entries: Sequence[tuple[Document, KVCache]], chunks: Sequence[int | None] = (256, None),
        json_path: Path | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """:func:`measure` at every chunk size in ``chunks`` on the caches of ``entries``; print, optionally write JSON."""
    console = console or Console()
    rows = []
    for chunk in chunks:
        with console.status(f"measuring at {chunk or 'whole-document'} chunks ..."):
            rows += [{**r, "documents": [doc.name for doc, _ in entries]}
                     for r in measure([kv for _, kv in entries], chunk)]
    show_and_save(rows, "lossless symbol under richer contexts (bits per element)", COLUMNS, _cells, console,
                  json_path, left="context")
    return rows


COLUMNS = ("chunk", "context", "code", "tables", "static", "adaptive", "projected bits/el", "ratio")


def _cells(r: dict[str, Any]) -> list[str]:
    chunk = str(r["chunk_tokens"] or "doc")
    if "entropy" in r:
        return [chunk, r["context"], f"{r['entropy']:.4f}", "-", "-", "-", f"-{r['saving']:.4f}", "-"]
    return [chunk, r["context"], f"{r['code']:.4f}", f"{r['tables']:.4f}", f"{r['static']:.4f}",
            f"{r['adaptive']:.4f}", f"{r['projected']:.3f}", f"{r['ratio']:.3f}"]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """docs/results/lossless-context.md from the rows."""
    first = rows[0]
    today = "; ".join(f"{r['actual']:.3f} at {r['chunk_tokens'] or 'whole-document'} chunks" for r in rows
                      if r["context"] == "today")
    lines = ["# `lossless` under richer contexts: conditional entropies of its symbol", "",
             f"Produced by `{command}` on {len(first['documents'])} real bf16 caches of SmolLM2-135M "
             f"({', '.join(first['documents'])}); {first['elements']} elements per chunking. What the columns mean: "
             "`kvpack.bench.lossless_context`'s docstring. In short: `code` is the symbol's coded size under rANS "
             "tables per (layer, K/V, class, context) quantized from each chunk's counts, `tables` what storing "
             "those tables costs, `static` their sum, `adaptive` the code length of a table-free adaptive model "
             "per context, all in bits per element; `projected` is what `lossless` would write with the cheaper of "
             f"the two (today it writes {today}), `ratio` 16 over it. The `mantissa "
             "bit` rows give that raw bit's entropy given (layer, K/V, exponent offset) in `code`, and the saving "
             "against storing it raw in `projected`.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = ["ALPHA", "adaptive_bits", "chunk_symbols", "contexts", "markdown", "measure", "run", "static_bits"]
