"""`kvpack bench capacity`: what compression buys in capacity — hit rate and TTFT under a store budget.

A serving workload on the real model: ``contexts`` distinct contexts of ``tokens`` tokens (consecutive token windows
of the eval corpora, :func:`contexts`), each followed by the same short question, requested in an order drawn with
Zipf popularity (:func:`zipf_trace`, exponent ``alpha``) from a store of fixed budget: ``memory:256MiB`` is a
``MemoryStore`` of that many bytes, ``memory:256MiB+disk:1GiB`` a ``TieredStore`` of memory in front of a
``DiskStore`` (:func:`parse_budget`); both evict least recently used entries.

Protocol (a *replay*; every step on the store and codec path runs for real, model compute is measured once):

1. **Compute, once per context** (:func:`compute_contexts`). The model prefills each prompt in chunks of
   ``chunk_tokens`` on one growing cache, then the question on top, every step timed; the context's KV is kept in a
   safetensors file under ``--workdir`` (200 x 2K tokens of bf16 KV is ~9.4 GB: on disk, not in RAM). Compute runs
   in the faster of bfloat16 and float32 on this machine (:func:`compute_dtypes` times one prompt in both, as
   BENCHMARKS.md asks of every recompute baseline): a float32 copy of the bf16 model computes, and its KV is rounded
   to bfloat16, the dtype a bf16 serving model stores.
2. **Replay, per (codec, budget, alpha)** (:class:`Replay`): a fresh bounded store; for each request, the chunk
   lookup (``exists_many``), fetch and decode of the stored leading chunks into one buffer run for real through
   :class:`~kvpack.prefix.PrefixStore` and :class:`~kvpack.loader.Loader` and are timed (``--loader load``, the
   default: ``compute_front=False``, so a load never runs the model; ``--loader adaptive``: the loader may prefill
   leading chunks itself while it fetches and decodes the others, Cake's overlap, and that compute runs for real
   inside the timed load); the model compute that request still needs is *charged* from step 1's measurement
   for that context (the chunks after the stored run plus the question; on a full hit only the question), not
   re-run. TTFT = load wall time + charged compute. Then, as ContextCache's writer thread does after the first
   token, the chunks that were not stored are encoded and put for real (timed as ``write_s``, not part of TTFT),
   from the KV file of step 1; a tiered store's background writes are flushed before the next request.
3. **End-to-end check** (:func:`validate`): a handful of real :class:`~kvpack.context.ContextCache` requests (misses
   on the compute model, hits per codec on the bf16 model) against the replay's TTFT for the same context and
   store, so the page can state how closely the replay's accounting matches what ContextCache measures.

Per arm: the fraction of requests that reused their whole context (``hit_rate``) and part of it
(``partial_hit_rate``), the bytes the store holds at the end, mean and p95 TTFT, and mean load / charged compute /
write seconds. Each codec's quality cost is quoted beside it from the committed ``docs/results/codecs.json`` (or
the ``kvpack bench codecs`` documents ``--quality`` names; :func:`quality_of`), not re-measured.

    kvpack bench capacity --contexts 200 --tokens 2048 --requests 1000 --alphas 0.8,1.2 \\
        --budgets memory:256MiB,memory:1GiB,memory:256MiB+disk:1GiB --json capacity.json
    kvpack bench capacity --render capacity.json --markdown capacity.md --plot capacity.png
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from kvpack.bench.rows import fmt, profile_tag
from kvpack.codecs.calibrated import CalibratedCodec
from kvpack.store import DiskStore, MemoryStore, Store, TieredStore

QUESTION = "\n\nQuestion: what is the text above about? Answer:"
DEFAULT_SETTINGS = ("raw", "lossless", "fp8", "kivi:bits=4", "kivi:bits=2")
DEFAULT_BUDGETS = "memory:256MiB,memory:1GiB,memory:256MiB+disk:1GiB"
CODECS_RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results" / "codecs.json"
MANIFEST = "contexts.json"
#: How a replayed hit loads: every stored chunk, or the adaptive loader that may compute leading chunks (Cake).
LOADERS = ("load", "adaptive")
#: What the rows of the adaptive loader add to the codec's label.
ADAPTIVE = ", adaptive loader"
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
    """What one request did: TTFT, context tokens reused of those storable, and where the time went (seconds):
    ``load_s`` lookup + fetch + decode (measured), ``compute_s`` prefill charged, ``write_s`` encode + put after the
    first token (measured, or the encode charged by :class:`EncodeMemo`; not part of TTFT)."""

    ttft_s: float
    tokens_hit: int
    context_tokens: int
    load_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0


def replay(trace: Sequence[int], serve: Callable[[int], Served]) -> dict[str, float]:
    """Serve every request of ``trace`` in order; hit rates (whole context / part of it) and time statistics."""
    if not trace:
        raise ValueError("an empty trace has no hit rate")
    served = [serve(i) for i in trace]
    full = sum(s.tokens_hit >= s.context_tokens for s in served)
    partial = sum(0 < s.tokens_hit < s.context_tokens for s in served)
    return {"requests": len(served), "hit_rate": full / len(served), "partial_hit_rate": partial / len(served),
            **summarize([s.ttft_s for s in served]),
            "load_mean_s": statistics.fmean(s.load_s for s in served),
            "compute_mean_s": statistics.fmean(s.compute_s for s in served),
            "write_mean_s": statistics.fmean(s.write_s for s in served)}


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


def quality_of(codec_id: str, results: Sequence[Path]) -> dict[str, Any] | None:
    """The quality cost of codec setting ``codec_id`` in committed ``kvpack bench codecs`` results (the rows of every
    file of ``results``; a row of this exact setting and profile in any file comes first): ``ppl_increase_pct``,
    ``kl_mean`` and ``same_profile`` (``False`` when only a row of the same codec and parameters calibrated on
    another profile exists); ``None`` if it was not measured."""
    rows: list[dict[str, Any]] = []
    for path in results:
        try:
            rows += json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue

    def setting(cid: str) -> Any:
        try:
            parsed = json.loads(cid)
            return parsed.get("name"), parsed.get("params"), parsed.get("version")
        except (ValueError, AttributeError):
            return None

    exact = [r for r in rows if r.get("codec_id") == codec_id]
    wanted = setting(codec_id)
    similar = [r for r in rows if wanted is not None and setting(str(r.get("codec_id"))) == wanted]
    row = (exact or similar or [{}])[0]
    if row.get("ppl_increase_pct") is None:
        return None
    return {"ppl_increase_pct": float(row["ppl_increase_pct"]),
            "kl_mean": None if row.get("kl_mean") is None else float(row["kl_mean"]), "same_profile": bool(exact)}


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


# ------------------------------------------------------------------------------------------- step 1: compute once
@dataclass(frozen=True)
class Prefilled:
    """One prompt's prefill, computed and timed once: ``chunk_s[j]`` seconds to prefill chunk ``j`` on top of
    chunks ``[0, j)``, ``question_s`` for the rest of the prompt on top of all of them, ``one_shot_s`` from the call
    to the first token's logits of ``model.generate`` on the whole prompt (what ContextCache runs on a miss); the KV
    of the chunks ``[layers, 2, kv_heads, len(chunk_s) * chunk_tokens, head_dim]`` is in the safetensors file
    ``path``."""

    chunk_s: tuple[float, ...]
    question_s: float
    one_shot_s: float
    path: str
    ids_hash: str

    def compute_s(self, chunks_stored: int) -> float:
        """Prefill a request needs when its first ``chunks_stored`` chunks are loaded: a miss is charged the one-shot
        prefill, a full hit the question's; a partial hit the one-shot time times the share of the chunked prefill
        left to do (an estimate: ContextCache computes the rest in one call, which is not timed per split)."""
        if chunks_stored <= 0:
            return self.one_shot_s
        if chunks_stored >= len(self.chunk_s):
            return self.question_s
        left = sum(self.chunk_s[chunks_stored:]) + self.question_s
        return max(self.question_s, self.one_shot_s * left / (sum(self.chunk_s) + self.question_s))


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.blake2b(ids.numpy().astype("<i8").tobytes(), digest_size=12).hexdigest()


def time_prefill(model: Any, ids: torch.Tensor, chunks: int, chunk_tokens: int) -> tuple[list[float], float, Any]:
    """Prefill ``ids`` chunk by chunk (``chunks`` chunks, then the rest) on one cache; seconds per step and the
    cache."""
    from kvpack.inference import forward, new_cache

    cache = new_cache(model)
    steps = []
    for j in range(chunks):
        t0 = time.perf_counter()
        forward(model, ids[j * chunk_tokens : (j + 1) * chunk_tokens], cache)
        steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    forward(model, ids[chunks * chunk_tokens :], cache)
    return steps, time.perf_counter() - t0, cache


def storable_chunks(prompt_tokens: int, chunk_tokens: int) -> int:
    """Chunks of a prompt that ContextCache loads and stores: full chunks of all but its last token."""
    return (prompt_tokens - 1) // chunk_tokens


def compute_contexts(compute_model: Any, spec: Any, prompts: Sequence[torch.Tensor], chunk_tokens: int,
                     workdir: Path, log: Callable[[str], None] = print) -> list[Prefilled]:
    """Step 1 for every prompt (see the module docstring); resumes from ``workdir``'s manifest.

    ``spec`` is the *stored* model's spec (bf16): the KV is rounded to its dtype before it is written.
    """
    from safetensors.torch import save_file

    from kvpack.kv import KVCache
    from kvpack.prefix import spec_for

    workdir.mkdir(parents=True, exist_ok=True)
    manifest_path = workdir / MANIFEST
    key = f"{spec.fingerprint}|{compute_model.dtype}|{chunk_tokens}"
    try:
        manifest = json.loads(manifest_path.read_text())
        done = manifest["entries"] if manifest.get("key") == key else {}
    except (OSError, ValueError, KeyError):
        done = {}
    compute_spec = spec_for(compute_model)
    out = []
    for i, ids in enumerate(prompts):
        h = ids_hash(ids)
        entry = done.get(h)
        if entry is not None and Path(entry["path"]).exists():
            if "one_shot_s" not in entry:  # a manifest written before misses were charged the one-shot prefill
                entry["one_shot_s"] = recompute_ttft(compute_model, ids)
                manifest_path.write_text(json.dumps({"key": key, "entries": done}))
                log(f"context {i + 1}/{len(prompts)}: one-shot prefill {entry['one_shot_s']:.2f} s")
            out.append(Prefilled(**(entry | {"chunk_s": tuple(entry["chunk_s"])})))
            continue
        n = storable_chunks(len(ids), chunk_tokens)
        steps, question_s, cache = time_prefill(compute_model, ids, n, chunk_tokens)
        kv = KVCache.from_hf(cache, compute_spec, span=(0, n * chunk_tokens))
        path = workdir / f"{h}.safetensors"
        save_file({"kv": kv.data.to(spec.torch_dtype).contiguous()}, str(path))
        item = Prefilled(tuple(steps), question_s, recompute_ttft(compute_model, ids), str(path), h)
        done[h] = asdict(item)
        manifest_path.write_text(json.dumps({"key": key, "entries": done}))
        out.append(item)
        log(f"context {i + 1}/{len(prompts)}: prefill {sum(steps) + question_s:.2f} s chunked, "
            f"{item.one_shot_s:.2f} s one-shot")
    return out


def load_kv(item: Prefilled, spec: Any, ids: torch.Tensor) -> Any:
    """The stored-dtype KV of ``item``'s chunks as a :class:`~kvpack.kv.KVCache` (positions from 0)."""
    from safetensors.torch import load_file

    from kvpack.kv import KVCache

    data = load_file(item.path)["kv"]
    tokens = data.shape[3]
    return KVCache(spec=spec, data=data, positions=torch.arange(tokens, dtype=torch.int64),
                   token_ids=ids[:tokens].clone())


def float32_copy(model: Any) -> Any:
    """The same weights computing in float32 (a copy; ``model`` is untouched)."""
    return copy.deepcopy(model).to(torch.float32).eval()


def recompute_ttft(model: Any, ids: torch.Tensor) -> float:
    """Seconds from the call to the first token's logits of plain ``model.generate`` on ``ids``."""
    from kvpack.bench.ttft import _recompute_ttft

    return _recompute_ttft(model, ids)


def compute_dtypes(models: dict[str, Any], prompt: torch.Tensor) -> dict[str, float]:
    """One-shot prefill seconds of ``prompt`` per dtype name (one untimed run of a short prompt first, then one
    timed run; the faster dtype computes every context)."""
    out = {}
    for name, model in models.items():
        recompute_ttft(model, prompt[:64])
        out[name] = recompute_ttft(model, prompt)
    return out


# ------------------------------------------------------------------------------------------------- step 2: replay
class EncodeMemo:
    """A codec whose ``encode`` runs once per chunk (by token ids, position and length): a chunk encoded again (its
    context was evicted, then missed) gets the bytes of its first encode, and the seconds that encode took are added
    to ``charged_s``. Exact because the codecs are deterministic (tests/test_codec_golden.py pins their bytes); it
    saves re-running hundreds of identical encodes, off the TTFT path, in a long replay. Every other attribute is the
    codec's."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.blobs: dict[tuple[str, int, int], tuple[bytes, float]] = {}
        self.charged_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.codec, name)

    def encode(self, kv: Any) -> bytes:
        key = (ids_hash(kv.token_ids), int(kv.positions[0]), kv.num_tokens)
        if key in self.blobs:
            blob, seconds = self.blobs[key]
            self.charged_s += seconds
            return blob
        t0 = time.perf_counter()
        blob = self.codec.encode(kv)
        self.blobs[key] = (blob, time.perf_counter() - t0)
        return blob


class Replay:
    """Serves requests (index ``i``: ``prompts[i]``) against ``store`` with ``codec`` as described in the module
    docstring; callable as the ``serve`` of :func:`replay`."""

    def __init__(self, model: Any, spec: Any, store: Store, codec: Any, chunk_tokens: int,
                 prompts: Sequence[torch.Tensor], prefilled: Sequence[Prefilled],
                 memo: EncodeMemo | None = None, compute_front: bool = False) -> None:
        from kvpack.loader import LoaderConfig
        from kvpack.prefix import PrefixStore

        self.store, self.spec, self.prompts, self.prefilled = store, spec, prompts, prefilled
        self.prefixes = PrefixStore(store, model, spec, codec, chunk_tokens,
                                    loader_config=LoaderConfig(compute_front=compute_front, estimates_path=""))
        if compute_front:  # the prefill rate the planner starts from, as ContextCache's first miss would teach it
            self.prefixes.loader.observe_prefill(len(prompts[0]), prefilled[0].one_shot_s)
        self.memo = memo
        if memo is not None:  # the writes' encoder (the loader decodes with the codec itself)
            self.prefixes.codecs = (cast(Any, memo),)
        self.bytes_put = 0
        self.chunks_put = 0

    def __call__(self, i: int) -> Served:
        from kvpack.prefix import RequestStats

        ids, item = self.prompts[i], self.prefilled[i]
        c = self.prefixes.chunk_tokens
        n = len(item.chunk_s)
        stats = RequestStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        self.prefixes.load(ids[:-1], stats)  # lookup, fetch, decode: real
        load_s = time.perf_counter() - t0
        compute_s = item.compute_s(stats.tokens_hit // c)  # a plan to recompute reads nothing: all charged
        t1 = time.perf_counter()
        spans = [(j * c, (j + 1) * c) for j in stats.failed_chunks]
        if stats.chunks_hit < n:
            spans.append((stats.chunks_hit * c, n * c))
        if spans:
            kv = load_kv(item, self.spec, ids)
            read_s = time.perf_counter() - t1  # the KV file stands in for the prefill's output: not the store's time
            charged = self.memo.charged_s if self.memo is not None else 0.0
            for a, b in spans:
                before = self.store.stats().bytes_written
                self.chunks_put += self.prefixes.save(kv[a:b], ids)
                self.bytes_put += self.store.stats().bytes_written - before
            if isinstance(self.store, TieredStore):
                self.store.flush()
            write_s = time.perf_counter() - t1 - read_s
            if self.memo is not None:
                write_s += self.memo.charged_s - charged
        else:
            write_s = 0.0
        return Served(load_s + compute_s, stats.tokens_hit, n * c, load_s, compute_s, write_s)


def stored_bytes(store: Store) -> int:
    """Bytes a store holds now (a tiered store: summed over its tiers)."""
    st = store.stats()
    tiers = getattr(st, "tiers", ())
    return sum(t.stats.bytes_stored or 0 for t in tiers) if tiers else st.bytes_stored or 0


# ------------------------------------------------------------------------------------- step 3: end-to-end check
def validate(model: Any, tokenizer: Any, spec: Any, compute_model: Any, codecs_: Sequence[Any],
             prompt: torch.Tensor, item: Prefilled, chunk_tokens: int, repeats: int = 3,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Real ContextCache requests against the replay's accounting for one prompt.

    Miss: ContextCache on the compute model with an empty store vs the replay's charge for a miss (``item``'s
    one-shot prefill, measured in step 1). Hits, per codec: the context stored with the codec, then ``repeats``
    ContextCache requests on the bf16 model and ``repeats`` replayed requests on the same store, whose charged
    compute is the question's prefill measured here on the bf16 model (so both sides compute in the same dtype).
    """
    from kvpack.context import ContextCache
    from kvpack.inference import forward
    from kvpack.loader import LoaderConfig

    config = LoaderConfig(compute_front=False, estimates_path="")
    n = len(item.chunk_s)
    misses = []
    for _ in range(repeats):
        with ContextCache(compute_model, tokenizer, store=MemoryStore(), loader=config) as cc:
            misses.append(cc.generate(prompt, max_new_tokens=1, do_sample=False).stats.ttft_s)
    out: dict[str, Any] = {"miss": {"contextcache_s": misses, "replay_s": item.compute_s(0)}, "hits": []}
    log(f"check: miss {statistics.median(misses):.2f} s end to end, {item.compute_s(0):.2f} s charged")
    kv = load_kv(item, spec, prompt)
    question_bf16 = []
    for _ in range(repeats):
        cache = kv.to_hf()
        t0 = time.perf_counter()
        forward(model, prompt[n * chunk_tokens :], cache)
        question_bf16.append(time.perf_counter() - t0)
    bf16_item = replace(item, question_s=statistics.median(question_bf16))
    for codec in codecs_:
        store = MemoryStore(max_bytes=1 << 34)
        served = Replay(model, spec, store, codec, chunk_tokens, [prompt], [bf16_item])
        served(0)  # a replayed miss: stores the context with this codec
        served(0)  # untimed warm-up of both sides (numba's first-call compile, first calls)
        replayed, real = [], []
        with ContextCache(model, tokenizer, store=store, codec=codec, chunk_tokens=chunk_tokens, loader=config) as cc:
            cc.generate(prompt, max_new_tokens=1, do_sample=False)
            for _ in range(repeats):  # alternating, so both sides see the same load
                replayed.append(served(0).ttft_s)
                stats = cc.generate(prompt, max_new_tokens=1, do_sample=False).stats
                assert stats.chunks_hit == n, "the end-to-end check must hit"
                real.append(stats.ttft_s)
        out["hits"].append({"codec_id": codec.codec_id, "contextcache_s": real, "replay_s": replayed,
                            "question_bf16_s": question_bf16, "warmed_up": True})
        log(f"check: {codec.name} hit {statistics.median(real):.3f} s end to end, "
            f"{statistics.median(replayed):.3f} s replayed")
        store.close()
    return out


# ------------------------------------------------------------------------------------------------------ the run
def label(codec: Any) -> str:
    """A row's codec as the page names it: name, bits or preset, and the calibration profile (settings of one codec
    under two profiles differ only there)."""
    profile = {"hash": codec.calibration.hash} if isinstance(codec, CalibratedCodec) else None
    return codec.name + "".join(f" {k}={v}" for k, v in codec.params().items()
                                if v is not None and k in ("bits", "preset")) + profile_tag({"profile": profile})


def run(model: Any, tokenizer: Any, settings: Sequence[str], budgets: Sequence[Budget], alphas: Sequence[float],
        n_contexts: int, tokens: int, n_requests: int, seed: int, workdir: Path, chunk_tokens: int = 256,
        compute_dtype: str = "auto", check_repeats: int = 3, loader: str = "load",
        results: Sequence[Path] = (CODECS_RESULTS,),
        log: Callable[[str], None] = print, on_row: Callable[[dict[str, Any]], None] | None = None,
        compute_only: bool = False) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; the JSON document (rows, check, compute, config).

    Arms run budget by budget (the smallest first), then alpha, then codec; ``on_row(doc)`` is called with the
    document so far after each arm. ``compute_only`` stops after step 1. ``loader``: ``load`` or ``adaptive`` (see
    the module docstring; adaptive computes with the stored model, so its rows are only comparable where that is the
    compute dtype).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    from kvpack import codecs
    from kvpack.eval.quality import machine
    from kvpack.prefix import spec_for

    instances = []
    for setting in settings:
        name, params = parse_setting(setting)
        instances.append((setting, codecs.get(name, **params)))
    spec = spec_for(model, tokenizer)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    prompts = [torch.tensor(w + question, dtype=torch.int64) for w in contexts(tokenizer, n_contexts, tokens)]
    models = {"bfloat16": model, "float32": float32_copy(model)} if model.dtype == torch.bfloat16 else \
        {str(model.dtype).removeprefix("torch."): model}
    one_shot = compute_dtypes(models, prompts[0]) if compute_dtype == "auto" else {}
    chosen = min(one_shot, key=one_shot.__getitem__) if one_shot else compute_dtype
    compute_model = models[chosen]
    log(f"one-shot prefill of one prompt: {one_shot}; computing in {chosen}")
    started = time.perf_counter()
    prefilled = compute_contexts(compute_model, spec, prompts, chunk_tokens, workdir, log)
    doc: dict[str, Any] = {
        "rows": [], "check": None,
        "compute": {"dtype": chosen, "one_shot_s": one_shot, "wall_s": time.perf_counter() - started,
                    "prefill_s": [p.compute_s(0) for p in prefilled], "question_s": [p.question_s for p in prefilled]},
        "config": {"contexts": n_contexts, "tokens": tokens, "requests": n_requests, "seed": seed,
                   "chunk_tokens": chunk_tokens, "question_tokens": len(question), "alphas": list(alphas),
                   "budgets": [b.label for b in budgets], "settings": list(settings), "loaders": [loader],
                   "quality_sources": [source_name(p) for p in results]},
        "machine": machine()}
    if compute_only:
        return doc
    doc["check"] = validate(model, tokenizer, spec, compute_model, [c for _, c in instances], prompts[0],
                            prefilled[0], chunk_tokens, check_repeats, log)
    arms = [(setting, codec, budget, alpha) for setting, codec in instances for budget in budgets for alpha in alphas]
    memo_of, memo = None, None
    for setting, codec, budget, alpha in arms:  # codec by codec: one codec's encoded chunks are kept at a time
        if codec is not memo_of:
            memo_of, memo = codec, None if codec.name == "raw" else EncodeMemo(codec)  # raw's encode is a copy
        trace = zipf_trace(n_contexts, n_requests, alpha, seed)
        with tempfile.TemporaryDirectory(prefix="kvpack-capacity-", dir=workdir) as tmp:
            store = budget.open(Path(tmp))
            serve = Replay(model, spec, store, codec, chunk_tokens, prompts, prefilled, memo,
                           compute_front=loader == "adaptive")
            wall = time.perf_counter()
            row = replay(trace, serve)
            wall = time.perf_counter() - wall
            stored = stored_bytes(store)
            store.close()
        per_context = serve.bytes_put / max(serve.chunks_put, 1) * len(prefilled[0].chunk_s)
        doc["rows"].append({
            "setting": setting, "label": label(codec) + (ADAPTIVE if loader == "adaptive" else ""),
            "loader": loader, "codec_id": codec.codec_id, "budget": budget.label,
            "memory_bytes": budget.memory_bytes, "disk_bytes": budget.disk_bytes, "alpha": alpha, **row,
            "bytes_stored": stored, "bytes_per_context": per_context,
            "ratio": 2 * spec.elements_per_token * len(prefilled[0].chunk_s) * chunk_tokens / per_context
            if per_context else None,
            "contexts_in_budget": (budget.memory_bytes + (budget.disk_bytes or 0)) / per_context
            if per_context else None,
            "quality": quality_of(codec.codec_id, results), "replay_wall_s": wall,
            "load_average": list(os.getloadavg())})
        doc["load_average_end"] = list(os.getloadavg())
        log(json.dumps(doc["rows"][-1]))
        if on_row is not None:
            on_row(doc)
    return doc


# ---------------------------------------------------------------------------------------------------- the page
def _quality(q: dict[str, Any] | None) -> str:
    if q is None:
        return "not measured"
    text = f"{q['ppl_increase_pct']:+.2f}% / {fmt(q.get('kl_mean'), '.4f')}"
    return text if q.get("same_profile", True) else text + " (other profile)"


def target(doc: dict[str, Any], budget: str, codec: str = "transform", baseline: str = "raw") -> list[dict[str, Any]]:
    """Per loader and alpha at ``budget``: ``codec``'s hit rate and mean TTFT against ``baseline``'s with the same
    loader (the issue's target is hit rate >= 3x and mean TTFT >= 2x lower)."""
    out = []
    rows = [r for r in doc["rows"] if r["budget"] == budget]
    for loader, alpha in sorted({(r.get("loader", "load"), r["alpha"]) for r in rows}):
        arm = [r for r in rows if r["alpha"] == alpha and r.get("loader", "load") == loader]
        a = next((r for r in arm if r["setting"].split(":")[0] == codec), None)
        b = next((r for r in arm if r["setting"].split(":")[0] == baseline), None)
        if a is None or b is None:
            continue
        hit = a["hit_rate"] / b["hit_rate"] if b["hit_rate"] else math.inf
        ttft = b["ttft_mean_s"] / a["ttft_mean_s"]
        out.append({"loader": loader, "alpha": alpha, "hit_rate": (a["hit_rate"], b["hit_rate"]), "hit_ratio": hit,
                    "ttft_mean_s": (a["ttft_mean_s"], b["ttft_mean_s"]), "ttft_speedup": ttft,
                    "met": hit >= 3 and ttft >= 2})
    return out


def source_name(path: Path) -> str:
    """``path`` as the pages name it: relative to the repository when inside it."""
    root = CODECS_RESULTS.parents[2]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def requote(doc: dict[str, Any], results: Sequence[Path]) -> dict[str, Any]:
    """``doc`` with every row's quality looked up again in ``results`` (e.g. a codec whose quality was measured after
    the run, in another ``kvpack bench codecs`` document), and those files named as the quality's sources."""
    return doc | {"rows": [r | {"quality": quality_of(r["codec_id"], results)} for r in doc["rows"]],
                  "config": doc["config"] | {"quality_sources": [source_name(p) for p in results]}}


def markdown(doc: dict[str, Any], command: str, render_command: str, plot_name: str | None = None) -> str:
    """The results page of a run's JSON document."""
    cfg, comp, check = doc["config"], doc["compute"], doc["check"]
    lines = ["# Capacity: hit rate and TTFT under a store budget", "",
             f"Produced by `{command}`; this page and its plot are rendered from the JSON by `{render_command}`. "
             f"Machine: {doc['machine']}; load average at the end {doc.get('load_average_end')} (shared machine: "
             "every timing is indicative).", "",
             *([f"Note on the runs: {doc['note']}.", ""] if doc.get("note") else []),
             f"Workload: {cfg['contexts']} distinct contexts of {cfg['tokens']} tokens (windows of the eval "
             f"corpora) + a {cfg['question_tokens']}-token question, {cfg['requests']} requests per arm with Zipf "
             f"popularity (seed {cfg['seed']}), chunks of {cfg['chunk_tokens']} tokens, SmolLM2-135M storing bf16 "
             "KV. Each arm starts from an empty store (cold start included).", "",
             "**Protocol: a replay (`kvpack/bench/capacity.py`).** Every operation on the store and codec path runs "
             "for real and is timed: chunk lookup, fetch and decode on each request, encode and put of the chunks "
             "not stored (after the first token, as ContextCache's writer thread does). The model compute a request "
             "still needs is **not re-run**: it is charged from prefills of that context measured once, in "
             f"{comp['dtype']} (one-shot prefill of one prompt: "
             + ", ".join(f"{k} {v:.2f} s" for k, v in comp["one_shot_s"].items())
             + "; the faster dtype computes, its KV rounded to bf16): a miss is charged the one-shot prefill of the "
             "whole prompt (what ContextCache runs), a full hit the question's prefill on top of the context, a "
             "partial hit the one-shot time scaled by the share of a chunk-by-chunk prefill left to do. "
             "TTFT = load + charged compute. Loader: `load` rows load every stored chunk (`compute_front=False`); "
             "`adaptive loader` rows let the loader prefill leading chunks itself while it loads the others (Cake), "
             "and that prefill runs for real inside the measured load. Each codec encodes a "
             "chunk once per run: a later write of the same chunk (its context evicted, then missed again) puts "
             "the same bytes (the codecs are deterministic) and is charged that first encode's time.", ""]
    misses = check["miss"]
    lines += ["## End-to-end check", "",
              "Real `ContextCache` requests on one context against the replay's TTFT for it (medians of "
              f"{len(misses['contextcache_s'])}): a miss on the {comp['dtype']} model against the charged one-shot "
              "prefill; hits per codec on the bf16 model against replayed hits on the same "
              "store, charged the question's prefill measured on the bf16 model. The miss's charge is step 1's "
              "measurement of that context, taken at another time than the check, so on a shared machine it also "
              "shows how far a charge drifts with the load.", "",
              "| request | ContextCache TTFT s | replay TTFT s | replay / ContextCache |", "|---|---|---|---|"]
    real = statistics.median(misses["contextcache_s"])
    lines.append(f"| miss | {real:.3f} | {misses['replay_s']:.3f} | {misses['replay_s'] / real:.2f} |")
    names = {r["codec_id"]: r["label"].removesuffix(ADAPTIVE) for r in doc["rows"]}  # the check loads every chunk
    cold = [h for h in check["hits"] if not h.get("warmed_up")]
    for h in check["hits"]:
        replayed = h["replay_s"] if h.get("warmed_up") else h["replay_s"][1:] or h["replay_s"]
        real, rep = statistics.median(h["contextcache_s"]), statistics.median(replayed)
        lines.append(f"| hit, {names.get(h['codec_id'], h['codec_id'])} | {real:.3f} | {rep:.3f} | "
                     f"{rep / real:.2f} |")
    if cold:
        lines += ["", "In this run the replayed hits were not preceded by a warm-up request (the ContextCache side "
                  "was): the first replayed hit of each codec included numba's first-call compile and counts as its "
                  "warm-up, left out of the median above and listed here (s): "
                  + ", ".join(f"{names.get(h['codec_id'], h['codec_id'])} {h['replay_s'][0]:.2f}" for h in cold)
                  + ". `validate` now warms both sides up first and alternates them."]
    lines += ["", "## Results", "",
              "hit: the whole context reused; partial: part of it. TTFT mean and p95 in seconds; load = lookup + "
              "fetch + decode (measured), compute = prefill charged, write = encode (measured or charged) + put "
              "(measured), after the first token. ratio: bf16 bytes / stored bytes per context. Quality: Δppl % / KL "
              "mean of the same setting in "
              + " or ".join(cfg.get("quality_sources", ["docs/results/codecs.json"]))
              + " (`kvpack bench codecs`; not re-measured here).", "",
              "| codec | budget | alpha | hit | partial | TTFT mean | TTFT p95 | load | compute | write | "
              "stored MB | ratio | contexts fit | quality |", "|" + "---|" * 14]
    for r in doc["rows"]:
        lines.append(
            f"| {r['label']} | {r['budget']} | {r['alpha']:g} | {r['hit_rate']:.3f} | {r['partial_hit_rate']:.3f} | "
            f"{r['ttft_mean_s']:.3f} | {r['ttft_p95_s']:.3f} | {r['load_mean_s']:.3f} | {r['compute_mean_s']:.3f} | "
            f"{r['write_mean_s']:.3f} | {r['bytes_stored'] / 1e6:.1f} | {fmt(r['ratio'], '.1f')} | "
            f"{fmt(r['contexts_in_budget'], '.0f')} | {_quality(r['quality'])} |")
    done = {(r["setting"], r["budget"], r["alpha"]) for r in doc["rows"]}
    missing = [f"{s} at {b}, alpha {a:g}" for b in cfg["budgets"] for a in cfg["alphas"] for s in cfg["settings"]
               if (s, b, a) not in done]
    if missing:
        lines += ["", f"Not run (the run was stopped before these arms): {'; '.join(missing)}."]
    budgets = list(dict.fromkeys(r["budget"] for r in doc["rows"]))
    lines += ["", "## Target", "", "At the smallest memory budget, transform against raw: hit rate at least 3x "
              "and mean TTFT at least 2x lower.", ""]
    checks = target(doc, budgets[0]) if budgets else []
    if not checks:
        lines.append("Not measured: the run has no transform and raw rows at that budget.")
    for t in checks:
        lines.append(f"- {budgets[0]}, {t['loader']} loader, alpha {t['alpha']:g}: hit rate {t['hit_rate'][0]:.3f} vs "
                     f"{t['hit_rate'][1]:.3f} ({t['hit_ratio']:.2f}x), mean TTFT {t['ttft_mean_s'][0]:.3f} s vs "
                     f"{t['ttft_mean_s'][1]:.3f} s ({t['ttft_speedup']:.2f}x lower): "
                     f"**{'met' if t['met'] else 'missed'}**.")
    if plot_name:
        lines += ["", f"![hit rate and mean TTFT per codec and budget]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Hit rate (left) and mean TTFT (right) per codec, one group of bars per (budget, alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    arms = list(dict.fromkeys((r["budget"], r["alpha"]) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(labels), 1)
    for k, name in enumerate(labels):
        for ax, key in zip(axes, ("hit_rate", "ttft_mean_s"), strict=True):
            values = [next((r[key] for r in rows if r["label"] == name and (r["budget"], r["alpha"]) == arm),
                           math.nan) for arm in arms]
            ax.bar([i + k * width for i in range(len(arms))], values, width, label=name, color=f"C{k % 10}")
    for ax, title in zip(axes, ("hit rate (whole context)", "mean TTFT (s)"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(arms))])
        ax.set_xticklabels([b.replace("+", "+\n") + f"\nalpha {a:g}" for b, a in arms], fontsize=6)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=min(len(names), 4))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _arm(row: dict[str, Any]) -> tuple[Any, ...]:
    return row.get("setting"), row.get("loader", "load"), row.get("budget"), row.get("alpha")


def merge(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from runs of the same workload (contexts, requests, seed, computed prefills) with different codec
    settings or budgets (e.g. a codec whose profile came later): rows and end-to-end hit checks joined, a later run's
    row replacing an earlier run's of the same arm (setting, loader, budget, alpha: a rerun after a code change);
    :class:`ValueError` if the workloads differ."""
    first = docs[0]
    same = ("contexts", "tokens", "requests", "seed", "chunk_tokens")
    for doc in docs[1:]:
        if any(doc["config"][k] != first["config"][k] for k in same) or \
                doc["compute"]["prefill_s"] != first["compute"]["prefill_s"]:
            raise ValueError("only runs of the same workload on the same computed contexts can be merged")
    if len(docs) == 1:
        return first
    return first | {
        "rows": list({_arm(r): r for d in docs for r in d["rows"]}.values()),
        "check": first["check"] | {"hits": [h for d in docs for h in d["check"]["hits"]],
                                   "misses_by_run": [d["check"]["miss"] for d in docs]},
        "config": first["config"] | {key: list(dict.fromkeys(x for d in docs for x in d["config"][key]))
                                     for key in ("settings", "budgets", "alphas")}
                  | {"loaders": list(dict.fromkeys(x for d in docs for x in d["config"].get("loaders", ["load"])))},
        "command": "` and `".join(d.get("command", "kvpack bench capacity") for d in docs),
        "load_average_end": [d.get("load_average_end") for d in docs]}


def render(doc: dict[str, Any], markdown_path: Path | None, plot_path: Path | None, render_command: str) -> None:
    """Write the page and the plot of a run's JSON document."""
    if plot_path:
        plot(doc, plot_path)
    if markdown_path:
        markdown_path.write_text(markdown(doc, doc.get("command", "kvpack bench capacity"), render_command,
                                          plot_path.name if plot_path else None))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="kvpack bench capacity",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--settings", default=";".join(DEFAULT_SETTINGS),
                        help="codec settings separated by ';' (NAME or NAME:k=v,k=v), e.g. transform:profile=P")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS)
    parser.add_argument("--alphas", default="0.8,1.2")
    parser.add_argument("--contexts", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="dtype of the measured prefills (auto: the faster on this machine)")
    parser.add_argument("--check-repeats", type=int, default=3, help="requests per side of the end-to-end check")
    parser.add_argument("--loader", choices=LOADERS, default="load",
                        help="load: every stored chunk is loaded; adaptive: the loader may compute leading chunks")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kvpack-capacity",
                        help="where the contexts' KV files (and a manifest to resume from) are kept")
    parser.add_argument("--model", default=None, help="model name or path (default: the bundled model)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the JSON document here (with --render: the merged document)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results page here")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot (PNG) here")
    parser.add_argument("--render", type=Path, nargs="+", default=None,
                        help="only render --markdown/--plot from these JSON documents (runs of one workload)")
    parser.add_argument("--compute-only", action="store_true", help="only compute the contexts into --workdir")
    parser.add_argument("--note", default=None,
                        help="with --render: how the runs relate (printed on the page instead of the first run's)")
    parser.add_argument("--quality", type=Path, nargs="+", default=None,
                        help="`kvpack bench codecs` JSON documents to quote each codec's quality from (default: "
                             "docs/results/codecs.json); with --render, the rows' quality is looked up again in them")
    args = parser.parse_args(argv)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        merged = merge([json.loads(path.read_text()) for path in args.render])
        if args.note:
            merged = merged | {"note": args.note}
        if args.quality:
            merged = requote(merged, args.quality)
        if args.json:  # the runs joined in one document, which renders the same page on its own
            args.json.write_text(json.dumps(merged, indent=1))
        render(merged, args.markdown, args.plot, f"kvpack bench capacity {argv_text}")
        return
    from kvpack import models

    model, tokenizer = models.load(args.model) if args.model else models.load()
    command = f"kvpack bench capacity {argv_text}"

    def save(doc: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps(doc | {"command": command}, indent=1))

    doc = run(model, tokenizer, [s for s in args.settings.split(";") if s],
              [parse_budget(b) for b in args.budgets.split(",")], [float(a) for a in args.alphas.split(",")],
              args.contexts, args.tokens, args.requests, args.seed, args.workdir, args.chunk_tokens,
              args.compute_dtype, args.check_repeats, args.loader, results=args.quality or (CODECS_RESULTS,),
              on_row=save, compute_only=args.compute_only)
    doc["command"] = command
    if args.compute_only:
        return
    save(doc)
    render(doc, args.markdown, args.plot, "kvpack bench capacity --render JSON --markdown MD --plot PNG")


if __name__ == "__main__":
    main()
