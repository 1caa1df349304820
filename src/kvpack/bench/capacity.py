"""`python -m kvpack.bench.capacity`: what compression buys in capacity — hit rate and TTFT under a store budget.

A serving workload on the real model: ``contexts`` distinct contexts of ``tokens`` tokens (consecutive token windows
of the eval corpora, :func:`contexts`), each asked about with a short question, requested in an order drawn with
Zipf popularity (:func:`zipf_trace`, exponent ``alpha``). Every request goes through
:class:`~kvpack.context.ContextCache` (``generate`` with one new token): it loads the stored prefix, prefills the
rest, and writes the new chunks back (flushed before the next request, so runs are deterministic). The store is
fresh per (codec, budget, alpha) arm and bounded: ``memory:256MiB`` is a ``MemoryStore`` of that many bytes,
``memory:256MiB+disk:1GiB`` a ``TieredStore`` of memory in front of a ``DiskStore`` (:func:`parse_budget`).

Per arm: the fraction of requests that reused their whole context (``hit_rate``) and any of it
(``partial_hit_rate``), the bytes the store holds at the end, and mean and p95 TTFT. Each codec's quality cost is
quoted beside it from the committed ``docs/results/codecs.json`` (the same setting label), not re-measured.

    python -m kvpack.bench.capacity --contexts 200 --tokens 2048 --requests 1000 --alphas 0.8,1.2 \\
        --budgets memory:256MiB,memory:1GiB,memory:256MiB+disk:1GiB --json capacity.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvpack.store import DiskStore, MemoryStore, Store, TieredStore

QUESTION = "\n\nQuestion: what is the text above about? Answer:"
DEFAULT_SETTINGS = ("raw", "lossless", "fp8", "kivi:bits=2")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.I)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """``256MiB`` -> 268435456 (B, KiB/MiB/GiB, KB/MB/GB; a bare number is bytes); :class:`ValueError` if not."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 256MiB, 1GiB, 500MB)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size < 1:
        raise ValueError(f"a budget must be at least one byte, got {text!r}")
    return size


@dataclass(frozen=True)
class Budget:
    """A store budget: ``memory_bytes`` in a ``MemoryStore``, then optionally ``disk_bytes`` in a ``DiskStore``."""

    memory_bytes: int
    disk_bytes: int | None = None

    @property
    def label(self) -> str:
        memory = f"memory:{self.memory_bytes / (1 << 20):g}MiB"
        return memory if self.disk_bytes is None else f"{memory}+disk:{self.disk_bytes / (1 << 20):g}MiB"

    def open(self, workdir: Path) -> Store:
        """A fresh, empty store of this budget (disk files under ``workdir``)."""
        memory = MemoryStore(max_bytes=self.memory_bytes)
        if self.disk_bytes is None:
            return memory
        return TieredStore([memory, DiskStore(workdir, max_bytes=self.disk_bytes, fsync=False)])


def parse_budget(text: str) -> Budget:
    """``memory:256MiB`` or ``memory:256MiB+disk:1GiB``; :class:`ValueError` for anything else."""
    parts = dict(part.split(":", 1) for part in text.split("+") if ":" in part)
    if not parts or "memory" not in parts or set(parts) - {"memory", "disk"} or len(parts) != text.count("+") + 1:
        raise ValueError(f"a budget is memory:SIZE or memory:SIZE+disk:SIZE, got {text!r}")
    disk = parts.get("disk")
    return Budget(parse_size(parts["memory"]), None if disk is None else parse_size(disk))


def zipf_trace(n_items: int, n_requests: int, alpha: float, seed: int = 0) -> list[int]:
    """``n_requests`` item indices in ``[0, n_items)``: P(rank r) ∝ 1 / r**alpha, ranks assigned to items by a
    seeded permutation (so the most popular context is not always the first). Deterministic for a seed."""
    if n_items < 1 or n_requests < 0:
        raise ValueError(f"need n_items >= 1 and n_requests >= 0, got {n_items}, {n_requests}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** alpha
    ranks = rng.choice(n_items, size=n_requests, p=weights / weights.sum())
    return [int(i) for i in rng.permutation(n_items)[ranks]]


def summarize(ttft_s: Sequence[float]) -> dict[str, float]:
    """Mean and p95 (nearest rank) of TTFTs in seconds."""
    ordered = sorted(ttft_s)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"ttft_mean_s": statistics.fmean(ordered), "ttft_p95_s": p95}


@dataclass(frozen=True)
class Served:
    """What one request did: TTFT, context tokens reused, context tokens in the prompt."""

    ttft_s: float
    tokens_hit: int
    context_tokens: int


def replay(trace: Sequence[int], serve: Callable[[int], Served]) -> dict[str, float]:
    """Serve every request of ``trace`` in order; hit rates and TTFT statistics."""
    if not trace:
        raise ValueError("an empty trace has no hit rate")
    served = [serve(i) for i in trace]
    full = sum(s.tokens_hit >= s.context_tokens for s in served)
    partial = sum(s.tokens_hit > 0 for s in served)
    return {"requests": len(served), "hit_rate": full / len(served), "partial_hit_rate": partial / len(served),
            **summarize([s.ttft_s for s in served])}


def contexts(tokenizer: Any, n: int, tokens: int) -> list[list[int]]:
    """``n`` distinct contexts of ``tokens`` tokens: consecutive windows of the eval corpora's documents."""
    from kvpack.eval.corpora import code_documents, prose_documents

    out: list[list[int]] = []
    for doc in code_documents() + prose_documents():
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        out.extend(ids[s : s + tokens] for s in range(0, len(ids) - tokens + 1, tokens))
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"the corpora hold only {len(out)} windows of {tokens} tokens, {n} asked")


def quality_of(codec_id: str, results: Path) -> float | None:
    """Δppl % of the codec setting ``codec_id`` in the committed codecs results, ``None`` if it was not measured."""
    try:
        rows = json.loads(results.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return None
    value = next((row.get("ppl_increase_pct") for row in rows if row.get("codec_id") == codec_id), None)
    return None if value is None else float(value)


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    """``kivi:bits=2,group=32`` -> ``("kivi", {"bits": 2, "group": 32})`` (integers where they parse)."""
    name, _, raw = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, raw.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"a setting is NAME or NAME:k=v,k=v, got {text!r}")
        params[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, params


def run(model: Any, tokenizer: Any, settings: Sequence[str], budgets: Sequence[Budget], alphas: Sequence[float],
        n_contexts: int, tokens: int, n_requests: int, seed: int, results: Path) -> list[dict[str, Any]]:
    """One row per (codec setting, budget, alpha); see the module docstring."""
    import torch

    from kvpack import codecs
    from kvpack.context import ContextCache

    windows = contexts(tokenizer, n_contexts, tokens)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    prompts = [torch.tensor(w + question) for w in windows]
    rows = []
    for setting in settings:
        name, params = parse_setting(setting)
        codec = codecs.get(name, **params)
        with ContextCache(model, tokenizer, store=MemoryStore(), codec=codec) as warm:  # untimed: compiles, caches
            for _ in range(2):  # a miss, then a hit
                warm.generate(prompts[0], max_new_tokens=1, do_sample=False)
                warm.flush()
        for budget in budgets:
            for alpha in alphas:
                trace = zipf_trace(n_contexts, n_requests, alpha, seed)
                with tempfile.TemporaryDirectory(prefix="kvpack-capacity-") as tmp:
                    store = budget.open(Path(tmp))
                    cache = ContextCache(model, tokenizer, store=store, codec=codec)

                    def serve(i: int, cache: ContextCache = cache) -> Served:
                        stats = cache.generate(prompts[i], max_new_tokens=1, do_sample=False).stats
                        cache.flush()
                        return Served(stats.ttft_s, min(stats.tokens_hit, tokens), tokens // cache.chunk_tokens
                                      * cache.chunk_tokens)

                    row = replay(trace, serve)
                    st = store.stats()
                    tiers = getattr(st, "tiers", ())
                    stored = sum(t.stats.bytes_stored or 0 for t in tiers) if tiers else st.bytes_stored
                    cache.close()
                    store.close()
                rows.append({"setting": setting, "codec_id": codec.codec_id, "budget": budget.label, "alpha": alpha,
                             **row, "bytes_stored": stored, "contexts": n_contexts, "tokens": tokens,
                             "ppl_increase_pct": quality_of(codec.codec_id, results)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--settings", default=";".join(DEFAULT_SETTINGS),
                        help="codec settings separated by ';' (NAME or NAME:k=v,k=v), e.g. transform:profile=P")
    parser.add_argument("--budgets", default="memory:256MiB,memory:1GiB,memory:256MiB+disk:1GiB")
    parser.add_argument("--alphas", default="0.8,1.2")
    parser.add_argument("--contexts", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled model)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    from kvpack import models

    model, tokenizer = models.load(args.model) if args.model else models.load()
    rows = run(model, tokenizer, [s for s in args.settings.split(";") if s],
               [parse_budget(b) for b in args.budgets.split(",")], [float(a) for a in args.alphas.split(",")],
               args.contexts, args.tokens, args.requests, args.seed,
               Path(__file__).resolve().parents[3] / "docs" / "results" / "codecs.json")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "config": vars(args) | {"json": str(args.json)}}, indent=1,
                                        default=str))


if __name__ == "__main__":
    main()
