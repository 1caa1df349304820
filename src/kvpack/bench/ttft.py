"""`kvpack bench ttft`: time to first token with and without kvpack, per context length, strategy, codec and transport.

For each context length (tokens of CPython stdlib source) the context's KV cache is computed once, encoded with
every codec setting and put, chunk by chunk under its chain keys, into each transport: a memory store, a disk store,
and Redis behind links of 0.1, 1, 10 and 25 Gbps with a 0.5 ms delay per request. The links are real where the
machine permits it (:class:`~kvpack.bench.links.ShapedLink`: a ``redis-server`` in a network namespace behind a veth
pair shaped by ``tc tbf`` in both directions, TCP through the kernel's shaper; the delay is added by the client,
:class:`RelayStore`, since this kernel has no netem); elsewhere they are *emulated*, and labelled so in every row,
table and page: a memory store that sleeps the delay and ``bytes * 8 / bandwidth`` for each read
(:class:`LinkStore`). Then a prompt made of the context plus a short question is answered through
:class:`~kvpack.context.ContextCache` with one new token; TTFT is measured from the call to the first token's logits.

Strategies, per context length and transport:

- ``recompute``: plain ``model.generate`` on the whole prompt, timed in bfloat16 and in float32 (a float32 copy of
  the model loaded the same way), because which one is faster depends on the CPU (bf16 compute is ~4x slower than
  fp32 on AVX2-only CPUs, fast on AVX-512/AMX ones); the faster is the baseline, both are recorded.
- ``load``: each codec, every chunk loaded (``LoaderConfig(compute_front=False)``).
- ``adaptive``: each codec, the loader free to compute from the front while it loads from the back
  (``LoaderConfig(compute_front=True)``, :mod:`kvpack.loader`); it decides from its estimates, whose prefill rate is
  seeded with this prompt's measured bfloat16 recompute and whose fetch and decode rates the warm-up run measures.

Plus the drop scenario: a link at 10 Gbps that falls to 1 Gbps once a quarter of the chunks have arrived (counted as
entries come out of the store, the rate changed by ``tc qdisc change``, or the emulated rate lowered), reported per
run; at one context length (``drop_length``) the *levels* arm runs there ``drop_runs`` times: one loader over every
codec as quality levels (best first; a progressive transform adds its layer prefixes), with a TTFT target of
``slo_factor`` times what the adaptive loader of the best codec achieved on the steady 10 Gbps link, each run
reporting its TTFT, the levels it loaded, its re-plans and the KL divergence of its first-token distribution from the
one the original cache gives (the levels arm's reported TTFT is the lower median of its runs). Every other arm follows
one protocol (:func:`timed`): one untimed warm-up run (numba's first-call compile, the page cache, torch's first-call
set-up, the loader's first estimates), then ``repeats`` timed runs, of which the lower median is reported. Loader
estimates are kept in memory per arm (``estimates_path=""``), so arms do not leak into each other. Each row records
what the loader did (chunks per level, loaded and computed, fetch/decode/compute seconds, the throughput the link
gave) from :class:`~kvpack.prefix.RequestStats`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from rich.console import Console
from rich.table import Table

from kvpack.bench.links import MAX_GBPS, LinkShape, ShapedLink, links_available
from kvpack.codecs.base import Codec
from kvpack.context import ContextCache, _FirstTokenClock
from kvpack.errors import StoreError
from kvpack.eval.corpora import documents
from kvpack.eval.quality import machine
from kvpack.inference import as_batch, prefill
from kvpack.keys import KeySpace
from kvpack.kv import KVCache
from kvpack.loader import LoaderConfig, Progressive, codec_label, levels_of
from kvpack.prefix import RequestStats
from kvpack.store import DiskStore, MemoryStore, Store

QUESTION = "\n# Question: which function above is the most complex, and why?\n"
LINKS_GBPS = (0.1, 1.0, 10.0, 25.0)
#: The drop scenario: (Gbps before, Gbps after) the first quarter of the chunks has arrived.
DROP_GBPS = (10.0, 1.0)
STRATEGIES = ("recompute", "load", "adaptive")
#: Codec settings loaded by default, as (codec name, parameters); those not installed are skipped.
DEFAULT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("raw", {}), ("lossless", {}), ("fp8", {}), ("kivi", {"bits": 4}),
)
#: The compute dtypes of the recompute baseline, by the names the JSON and the tables use.
RECOMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: Seconds added before every request over a link (a round-trip delay: this kernel has no netem to add it in tc).
LINK_DELAY_S = 0.5e-3
#: Seconds a Redis read over a shaped link may take (a 25 MB chunk at 0.1 Gbps takes 2 s).
LINK_SOCKET_TIMEOUT_S = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class TtftConfig:
    """What `kvpack bench ttft` measures.

    Attributes:
        lengths: context lengths in tokens.
        links_gbps: link rates in Gbit/s (each a transport besides memory and disk).
        strategies: of :data:`STRATEGIES`; ``adaptive`` needs ``recompute`` (its prefill estimate is seeded with
            the measured bfloat16 recompute).
        repeats: timed runs per arm after the warm-up run (the lower median is reported).
        drop: also measure the drop scenario (:data:`DROP_GBPS`).
        emulate_links: use emulated links even where shaped links work.
        drop_runs: timed runs of the levels arm under a TTFT target in the drop scenario (after one warm-up).
        drop_length: the context length of that arm (default: 4096 if measured, else the longest length).
        slo_factor: its target, as a multiple of the best codec's adaptive TTFT on the steady 10 Gbps link.
    """

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    links_gbps: tuple[float, ...] = LINKS_GBPS
    strategies: tuple[str, ...] = STRATEGIES
    repeats: int = 3
    drop: bool = True
    emulate_links: bool = False
    drop_runs: int = 20
    drop_length: int | None = None
    slo_factor: float = 1.2

    def __post_init__(self) -> None:
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths!r}")
        for gbps in self.links_gbps:
            if not (isinstance(gbps, int | float) and math.isfinite(gbps) and 0 < gbps <= MAX_GBPS):
                raise ValueError(f"link rates must be in (0, {MAX_GBPS:g}] Gbit/s, got {gbps!r}")
        unknown = set(self.strategies) - set(STRATEGIES)
        if not self.strategies or unknown:
            raise ValueError(f"strategies are some of {', '.join(STRATEGIES)}, got {', '.join(self.strategies)}")
        if "adaptive" in self.strategies and "recompute" not in self.strategies:
            raise ValueError("the adaptive strategy needs recompute too: its prefill estimate is seeded with the "
                             "measured bfloat16 recompute; add recompute to the strategies")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats!r}")
        if not isinstance(self.drop_runs, int) or self.drop_runs < 1:
            raise ValueError(f"drop_runs must be at least 1, got {self.drop_runs!r}")
        if self.drop_length is not None and self.drop_length not in self.lengths:
            raise ValueError(f"drop_length must be one of the lengths {self.lengths}, got {self.drop_length}")
        if not (isinstance(self.slo_factor, int | float) and self.slo_factor > 0):
            raise ValueError(f"slo_factor must be positive, got {self.slo_factor!r}")

    @property
    def slo_length(self) -> int:
        """The context length of the levels arm in the drop scenario."""
        if self.drop_length is not None:
            return self.drop_length
        return 4096 if 4096 in self.lengths else max(self.lengths)

    @property
    def loads(self) -> tuple[str, ...]:
        """The loading strategies asked for, in order."""
        return tuple(s for s in self.strategies if s != "recompute")


class RelayStore(Store):
    """A store that passes every raw operation on to ``inner``, waits ``delay_s`` before each request (a round-trip
    delay added in the transport, as this kernel has no netem) and calls ``on_read(entries)`` after each read (a
    range read counts as its entry arriving when it starts at byte 0).

    ``inner``'s backend failures stay failures here (re-raised as :class:`StoreError`: degraded and counted).
    """

    _transient_errors: ClassVar[tuple[type[Exception], ...]] = (StoreError,)

    def __init__(self, inner: Store, on_read: Callable[[list[bytes | None]], None] | None = None,
                 delay_s: float = 0.0) -> None:
        super().__init__()
        self.inner, self.on_read, self.delay_s = inner, on_read, delay_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def _relay(self, op: Callable[..., T], *args: Any) -> T:
        try:
            return op(*args)
        except self.inner._transient_errors as exc:
            raise StoreError(f"{self.inner!r} failed: {exc}") from exc

    def _wait(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        self._wait()
        found = self._relay(self.inner._read_many, keys)
        self._arrived(found)
        return found

    def _read_range(self, key: str, start: int, stop: int) -> bytes | None:
        self._wait()
        data = self._relay(self.inner._read_range, key, start, stop)
        self._arrived([data], count=start == 0)
        return data

    def _arrived(self, entries: list[bytes | None], count: bool = True) -> None:
        """What happens as a read's entries arrive: ``on_read`` is told (if ``count``)."""
        if self.on_read is not None and count:
            self.on_read(entries)

    def _exists_many(self, keys: list[str]) -> list[bool]:
        self._wait()
        return self._relay(self.inner._exists_many, keys)

    def _write(self, key: str, data: bytes) -> bool:
        return self._relay(self.inner._write, key, data)

    def _exists(self, key: str) -> bool:
        return self._relay(self.inner._exists, key)

    def _remove(self, key: str) -> bool:
        return self._relay(self.inner._remove, key)

    def _usage(self) -> tuple[int, int] | None:
        return self._relay(self.inner._usage)

    def _close(self) -> None:
        self.inner.close()


class LinkStore(RelayStore):
    """A store behind an *emulated* link of ``gbps``: each batched read sleeps for its bytes' transfer time."""

    def __init__(self, inner: Store, gbps: float, on_read: Callable[[list[bytes | None]], None] | None = None,
                 delay_s: float = 0.0) -> None:
        super().__init__(inner, on_read, delay_s)
        self.gbps = gbps

    def __repr__(self) -> str:
        return f"LinkStore({self.inner!r}, {self.gbps} Gbps)"

    def set_rate(self, gbps: float) -> None:
        """Emulate ``gbps`` from the next read on."""
        self.gbps = gbps

    def _arrived(self, entries: list[bytes | None], count: bool = True) -> None:
        """The entries arrive after their transfer time at the current rate."""
        time.sleep(sum(len(e) for e in entries if e is not None) * 8 / (self.gbps * 1e9))
        super()._arrived(entries, count)


class RateDrop:
    """The drop scenario on one link: inside ``with drop.armed(after):``, the link runs at ``high`` Gbps until
    ``after`` entries have arrived through the store (:meth:`arrived`, a :class:`RelayStore` ``on_read``), then at
    ``low``; back at ``high`` on exit. :attr:`dropped` says whether the rate fell during the last run."""

    def __init__(self, set_rate: Callable[[float], None], high: float, low: float) -> None:
        self.set_rate, self.high, self.low = set_rate, high, low
        self._lock = threading.Lock()
        self._left: int | None = None
        self.dropped = False

    def arrived(self, entries: list[bytes | None]) -> None:
        """Count the entries of one read; the one that completes the quarter lowers the rate (in the I/O thread)."""
        with self._lock:
            if self._left is None:
                return
            self._left -= sum(e is not None for e in entries)
            if self._left > 0:
                return
            self._left, self.dropped = None, True
        self.set_rate(self.low)

    @contextmanager
    def armed(self, after: int) -> Iterator[RateDrop]:
        with self._lock:
            self._left, self.dropped = after, False
        try:
            yield self
        finally:
            with self._lock:
                self._left = None
            if self.dropped:
                self.set_rate(self.high)


@dataclass
class Transport:
    """One column of the table: a store, and for links their kind (``"tbf"`` or ``"emulated"``) and rate."""

    name: str
    store: Store
    link: str | None = None
    gbps: float | None = None
    drop: RateDrop | None = None
    note: str | None = None


def _link_name(gbps: float, drop_to: float | None, emulated: bool) -> str:
    rate = f"{gbps:g}" if drop_to is None else f"{gbps:g}→{drop_to:g}"
    return f"link {rate} Gbps" + (" (emulated)" if emulated else "")


@contextmanager
def transports(workdir: Path, console: Console, config: TtftConfig) -> Iterator[list[Transport]]:
    """The stores to measure: memory, disk, and a link per rate (and the drop scenario's), real where possible."""
    with ExitStack() as stack:
        out = [Transport("memory", MemoryStore(max_bytes=1 << 34)), Transport("disk", DiskStore(workdir / "disk"))]
        real, why = (False, "emulated links were asked for") if config.emulate_links else links_available()
        redis_store: Any = None
        if real:
            try:
                from kvpack.store.redis import RedisStore as redis_store
            except StoreError as exc:
                real, why = False, str(exc)
        if not real:
            console.print(f"[yellow]links are emulated (sleep the delay + bytes*8/rate for each read): {why}[/yellow]")
        rates = [(g, None) for g in config.links_gbps] + ([DROP_GBPS] if config.drop else [])
        for gbps, low in rates:
            name = _link_name(gbps, low, emulated=not real)
            drop: RateDrop | None = None
            if real:
                link = stack.enter_context(ShapedLink(gbps, LinkShape()))
                inner = redis_store(link.url, socket_timeout=LINK_SOCKET_TIMEOUT_S)
                if low is not None:
                    drop = RateDrop(link.set_rate, gbps, low)
                store: Store = RelayStore(inner, drop.arrived if drop else None, LINK_DELAY_S)
            else:
                emulated = LinkStore(MemoryStore(max_bytes=1 << 34), gbps, delay_s=LINK_DELAY_S)
                if low is not None:
                    drop = RateDrop(emulated.set_rate, gbps, low)
                    emulated.on_read = drop.arrived
                store = emulated
            out.append(Transport(name, store, "tbf" if real else "emulated", gbps, drop, None if real else why))
        try:
            yield out
        finally:
            for transport in out:
                transport.store.close()


def context_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    """``tokens`` token ids of stdlib source (eval documents joined)."""
    text = "\n".join(d.text for d in documents(12) if d.kind == "code")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < tokens:
        raise ValueError(f"only {ids.numel()} tokens of context text available, {tokens} asked")
    return ids[:tokens]


def timed(call: Callable[[], T], seconds: Callable[[T], float], repeats: int) -> T:
    """The protocol of every arm: one untimed warm-up ``call()``, then ``repeats`` timed ones; the lower-median run.

    ``seconds`` reads a run's TTFT from its result.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    call()
    runs = [call() for _ in range(repeats)]
    return sorted(runs, key=seconds)[(len(runs) - 1) // 2]


def _recompute_ttft(model: Any, ids: torch.Tensor) -> float:
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(as_batch(ids), attention_mask=torch.ones(1, len(ids), dtype=torch.int64), max_new_tokens=1,
                       do_sample=False, logits_processor=[clock])
    return (clock.at or time.perf_counter()) - start


def _label(codec: Codec) -> str:
    layers = codec.layers if isinstance(codec, Progressive) and codec.layers > 1 else None
    return codec_label(codec) + (f" layers={layers}" if layers else "")


def _put_context(cc: ContextCache, kv: KVCache, ctx: torch.Tensor) -> tuple[int, int]:
    """Encode the context's full chunks into ``cc``'s store under its keys; ``(tokens, bytes)`` stored."""
    codec, store = cc.prefixes.the_codec, cc.prefixes.backend
    keys = cc.keys.keys(ctx)
    chunks = kv[: len(keys) * cc.chunk_tokens]
    chunks.token_ids = ctx[: chunks.num_tokens]
    stored = 0
    for key, part in zip(keys, chunks.chunks(cc.chunk_tokens), strict=True):
        blob = codec.encode(part)
        store.put(key, blob)
        stored += len(blob)
    return chunks.num_tokens, stored


def _run_record(stats: RequestStats, dropped: bool | None) -> dict[str, Any]:
    record: dict[str, Any] = {"ttft_s": stats.ttft_s, "chunks_loaded": stats.chunks_loaded,
                              "chunks_computed": stats.chunks_computed, "levels": stats.chunks_by_level,
                              "replans": stats.replans}
    if dropped is not None:
        record["dropped"] = dropped
    return record


def _load_arm(cc: ContextCache, prompt: torch.Tensor, transport: Transport, repeats: int,
              seed: tuple[int, float] | None) -> tuple[RequestStats, list[dict[str, Any]]]:
    """One loading arm under :func:`timed`: the lower-median run's stats and a record of every timed run.

    ``seed`` (tokens, seconds) is a measured prefill to start the loader's prefill estimate from.
    """
    if seed is not None:
        cc.prefixes.loader.observe_prefill(*seed)
    drop = transport.drop
    quarter = max(1, math.ceil(cc.lookup(prompt) / cc.chunk_tokens / 4))
    runs: list[dict[str, Any]] = []

    def once() -> RequestStats:
        if drop is None:
            stats = cc.generate(prompt, max_new_tokens=1, do_sample=False).stats
            runs.append(_run_record(stats, None))
        else:
            with drop.armed(quarter):
                stats = cc.generate(prompt, max_new_tokens=1, do_sample=False).stats
            runs.append(_run_record(stats, drop.dropped))
        cc.flush()  # a probe after a recompute plan (docs/loader.md) must not run beside the next timed request
        return stats

    best = timed(once, lambda s: s.ttft_s, repeats)
    return best, runs[1:]  # the first is the warm-up


def _plan(stats: RequestStats) -> dict[str, Any] | None:
    """The plan as JSON (its per-chunk levels as a list)."""
    return None if stats.plan is None else asdict(stats.plan) | {"levels": list(stats.plan.levels)}


def _load_row(length: int, label: str, strategy: str, transport: Transport, stats: RequestStats,
              runs: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
    row: dict[str, Any] = {
        "context_tokens": length, "method": label, "strategy": strategy, "transport": transport.name,
        "link": transport.link, "link_gbps": transport.gbps, "ttft_s": stats.ttft_s, "load_s": stats.load_s,
        "fetch_s": stats.fetch_s, "decode_s": stats.decode_s, "compute_s": stats.compute_s,
        "prefill_s": stats.prefill_s, "tokens_hit": stats.tokens_hit, "chunks_hit": stats.chunks_hit,
        "chunks_loaded": stats.chunks_loaded, "chunks_computed": stats.chunks_computed,
        "failed_chunks": stats.failed_chunks, "bytes_read": stats.bytes_read,
        "fetch_gbps": stats.bytes_read * 8 / stats.fetch_s / 1e9 if stats.fetch_s > 0 else None,
        "ratio": ratio, "plan": _plan(stats), "runs": runs,
        "levels": stats.chunks_by_level, "replans": stats.replans, "overlap_s": stats.overlap_s,
        "estimates": stats.estimates, "load_avg_1m": os.getloadavg()[0],
    }
    if transport.drop is not None:
        row["drop_to_gbps"] = transport.drop.low
    if transport.note is not None:
        row["link_note"] = transport.note
    return row


def level_codecs(codecs: list[Codec]) -> list[Codec]:
    """The codecs of the levels arm, best quality first: the settings in the order given, less ``raw`` when a
    lossless codec is there too (the same cache in more bytes)."""
    if any(c.name == "lossless" for c in codecs):
        return [c for c in codecs if c.name != "raw"]
    return list(codecs)


class _FirstLogProbs:
    """A logits processor that keeps the log-probabilities of the first generated token (float32 ``[vocab]``)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            self.value = torch.log_softmax(scores[0].float(), dim=-1)
        return scores


def _reference_logprobs(model: Any, kv: KVCache, prompt: torch.Tensor) -> torch.Tensor:
    """The first token's log-probabilities when the model continues ``prompt`` from the original cache ``kv``."""
    capture = _FirstLogProbs()
    with torch.no_grad():
        model.generate(as_batch(prompt), cache=kv.to_hf(), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                       max_new_tokens=1, do_sample=False, logits_processor=[capture])
    assert capture.value is not None
    return capture.value


def _levels_arm(model: Any, tokenizer: Any, spec: Any, transport: Transport, levels: list[Codec], kv: KVCache,
                prompt: torch.Tensor, slo: float, seed: tuple[int, float], runs: int,
                namespace: str) -> dict[str, Any]:
    """The drop scenario's levels arm: one warm-up run, then ``runs`` runs with a TTFT target of ``slo`` seconds,
    each under the drop, each with the KL divergence of its first-token distribution from the original cache's."""
    assert transport.drop is not None
    reference = _reference_logprobs(model, kv, prompt)
    records: list[dict[str, Any]] = []
    with ContextCache(model, tokenizer, store=transport.store, codec=levels[0], levels=levels[1:], spec=spec,
                      namespace=namespace, loader=LoaderConfig(estimates_path="")) as cc:
        cc.prefixes.loader.observe_prefill(*seed)
        quarter = max(1, math.ceil(cc.lookup(prompt) / cc.chunk_tokens / 4))
        for _ in range(runs + 1):
            capture = _FirstLogProbs()
            with transport.drop.armed(quarter):
                stats = cc.generate(prompt, ttft_slo=slo, max_new_tokens=1, do_sample=False,
                                    logits_processor=[capture]).stats
            cc.flush()  # as in the loop above: no probe beside the next request
            assert capture.value is not None
            kl = float((reference.exp() * (reference - capture.value)).sum())
            records.append(_run_record(stats, transport.drop.dropped) | {
                "kl": max(kl, 0.0), "levels": stats.chunks_by_level, "replans": stats.replans,
                "predicted_ttft_s": stats.plan.predicted_ttft_s if stats.plan else None,
                "bytes_read": stats.bytes_read})
    timed_runs = records[1:]  # the first is the warm-up
    median = sorted(timed_runs, key=lambda r: r["ttft_s"])[(len(timed_runs) - 1) // 2]
    return {"context_tokens": int(kv.num_tokens), "method": " > ".join(_label(c) for c in levels), "strategy": "slo",
            "transport": transport.name, "link": transport.link, "link_gbps": transport.gbps,
            "drop_to_gbps": transport.drop.low, "slo_s": slo, "ttft_s": median["ttft_s"],
            "within_1_1x": sum(r["ttft_s"] <= 1.1 * slo for r in timed_runs), "runs": timed_runs,
            "chunks_loaded": median["chunks_loaded"], "chunks_computed": median["chunks_computed"],
            "bytes_read": median["bytes_read"], "ratio": None, "load_avg_1m": os.getloadavg()[0]}


def run(model: Any, tokenizer: Any, spec: Any, codecs: list[Codec], config: TtftConfig | None = None,
        console: Console | None = None, json_path: Path | None = None, markdown_path: Path | None = None,
        plot_path: Path | None = None, command: str = "kvpack bench ttft", *,
        float32_model: Any) -> list[dict[str, Any]]:
    """Measure TTFT for every (length, strategy, codec, transport); returns the JSON rows.

    ``model`` is the bfloat16 model whose caches are stored and loaded; ``float32_model`` is the same model loaded
    in float32 (``kvpack.models.load(name, dtype=torch.float32)``), timed for the recompute baseline only.
    """
    config = config or TtftConfig()
    recompute_models = {"bfloat16": model, "float32": float32_model}
    for name, lm in recompute_models.items():
        if lm.dtype != RECOMPUTE_DTYPES[name]:
            raise ValueError(f"the {name} recompute model is {lm.dtype}; load it with dtype=torch.{name}")
    console = console or Console()
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvpack-ttft-") as tmp, \
            transports(Path(tmp), console, config) as stores:
        for length in config.lengths:
            ctx = context_ids(tokenizer, length)
            prompt = torch.cat([ctx, question])
            seed: tuple[int, float] | None = None
            if "recompute" in config.strategies:
                recompute = {name: timed(partial(_recompute_ttft, lm, prompt), float, config.repeats)
                             for name, lm in recompute_models.items()}
                fastest = min(recompute, key=recompute.__getitem__)
                rows.append({"context_tokens": length, "method": "recompute", "strategy": "recompute",
                             "transport": "-", "ttft_s": recompute[fastest], "dtype": fastest,
                             "recompute_s": recompute, "bytes_read": 0, "ratio": None,
                             "load_avg_1m": os.getloadavg()[0]})
                seed = (len(prompt), recompute["bfloat16"])
                console.print(f"{length} tokens: recompute done")
            if not config.loads:
                continue
            kv, _ = prefill(model, spec, ctx)
            for transport in stores:
                ratios: dict[str, float] = {}
                for codec in codecs:
                    label = _label(codec)
                    for strategy in config.loads:
                        loader = LoaderConfig(compute_front=strategy == "adaptive", estimates_path="")
                        with ContextCache(model, tokenizer, store=transport.store, codec=codec, spec=spec,
                                          namespace=f"bench-{length}", loader=loader) as cc:
                            if label not in ratios:
                                tokens, nbytes = _put_context(cc, kv, ctx)
                                ratios[label] = 2 * tokens * spec.elements_per_token / max(nbytes, 1)
                            stats, runs = _load_arm(cc, prompt, transport, config.repeats,
                                                    seed if strategy == "adaptive" else None)
                            rows.append(_load_row(length, label, strategy, transport, stats, runs, ratios[label])
                                        | {"best_level": levels_of([codec])[0].name})
                    console.print(f"{length} tokens: {label} over {transport.name} done")
                levels = level_codecs(codecs)
                if transport.drop is not None and length == config.slo_length and "adaptive" in config.loads \
                        and seed is not None and len(levels_of(levels)) > 1:
                    steady = [r for r in rows if r["context_tokens"] == length and r["strategy"] == "adaptive"
                              and r["method"] == _label(levels[0]) and r.get("link_gbps") == DROP_GBPS[0]]
                    slo = config.slo_factor * (steady[0] if steady else rows[-1])["ttft_s"]
                    rows.append(_levels_arm(model, tokenizer, spec, transport, levels, kv, prompt, slo, seed,
                                            config.drop_runs, f"bench-{length}"))
                    console.print(f"{length} tokens: levels under a {slo:.3f} s target over {transport.name} done")
                for codec in codecs:
                    for key in KeySpace(namespace=f"bench-{length}", model_fingerprint=spec.fingerprint,
                                        codec_id=codec.codec_id).keys(prompt):
                        transport.store.delete(key)
            if json_path:  # what is measured so far, in case a later length fails
                json_path.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))
    for row in rows:
        row["machine"] = machine()
        row["command"] = command  # what a page rendered later from the JSON names as its source
    _print(console, rows)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    if markdown_path:
        markdown_path.write_text(markdown(rows, plot_path, command))
    if plot_path:
        plot(rows, plot_path)
    return rows


def render(rows: list[dict[str, Any]], markdown_path: Path | None, plot_path: Path | None, command: str) -> None:
    """Write the page and the plot from rows measured earlier (``kvpack bench ttft --render JSON``); rows without
    a machine (a partial file) get this one's."""
    for row in rows:
        row.setdefault("machine", machine())
    measured = next((r["command"] for r in rows if "command" in r), None)
    if markdown_path:
        markdown_path.write_text(markdown(rows, plot_path, measured or command,
                                          rendered_by=command if measured else None))
    if plot_path:
        plot(rows, plot_path)


# ------------------------------------------------------------------------------------------------------ the tables
Section = tuple[str, list[str], list[list[str]]]
_TEXT_COLUMNS = ("strategy", "method", "transport", "best fixed", "best adaptive")


def _strategy(row: dict[str, Any]) -> str:
    """A row's strategy; rows from before the loader have none (they loaded every chunk)."""
    return str(row.get("strategy") or ("recompute" if row["method"] == "recompute" else "load"))


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["transport"] for r in rows if r["method"] != "recompute"))


def _grid(rows: list[dict[str, Any]], strategies: tuple[str, ...]) -> dict[tuple[int, str, str], dict[str, Any]]:
    """Rows of the given strategies by (context, strategy, method), then by transport."""
    grid: dict[tuple[int, str, str], dict[str, Any]] = {}
    for r in rows:
        if _strategy(r) in strategies:
            grid.setdefault((r["context_tokens"], _strategy(r), r["method"]), {})[r["transport"]] = r
    return grid


def _ttft_section(rows: list[dict[str, Any]]) -> Section:
    columns = _columns(rows)
    body = []
    for (length, strategy, method), cells in _grid(rows, STRATEGIES).items():
        if strategy == "recompute":
            body.append([str(length), strategy, method, "-", *[f"{cells['-']['ttft_s']:.2f}"] * len(columns)])
        else:
            ratio = next((f"{r['ratio']:.1f}x" for r in cells.values() if r.get("ratio")), "-")
            body.append([str(length), strategy, method, ratio,
                         *[f"{cells[t]['ttft_s']:.3f}" if t in cells else "-" for t in columns]])
    return "TTFT (s)", ["context", "strategy", "method", "ratio", *columns], body


def _decisions_section(rows: list[dict[str, Any]]) -> Section:
    columns = _columns(rows)
    body = [[str(length), method, *[f"{cells[t]['chunks_loaded']}/{cells[t]['chunks_computed']}" if t in cells
                                    else "-" for t in columns]]
            for (length, _, method), cells in _grid(rows, ("adaptive",)).items()]
    return ("What the adaptive loader did: chunks loaded / computed (of the reported run)", ["context", "method",
                                                                                             *columns], body)


def _throughput_section(rows: list[dict[str, Any]]) -> Section:
    links = [t for t in _columns(rows) if t.startswith("link")]
    body = [[str(length), method, *[f"{cells[t]['fetch_gbps']:.2f}" if t in cells and cells[t].get("fetch_gbps")
                                    else "-" for t in links]]
            for (length, _, method), cells in _grid(rows, ("load",)).items() if method.startswith("raw")]
    return "Throughput the links gave to the raw loads: bytes read / fetch seconds (Gbit/s)", \
        ["context", "method", *links], body


def _versus_section(rows: list[dict[str, Any]]) -> Section:
    """Per (context, transport): the best fixed strategy (recompute included), the best adaptive, their ratio."""
    body = []
    for length in dict.fromkeys(r["context_tokens"] for r in rows):
        recompute = [r for r in rows if r["context_tokens"] == length and _strategy(r) == "recompute"]
        for transport in _columns(rows):
            cell = [r for r in rows if r["context_tokens"] == length and r["transport"] == transport]
            adaptive = [r for r in cell if _strategy(r) == "adaptive"]
            fixed = [r for r in cell if _strategy(r) == "load"] + recompute
            if not adaptive or not fixed:
                continue
            best, ours = min(fixed, key=lambda r: r["ttft_s"]), min(adaptive, key=lambda r: r["ttft_s"])
            raw = next((r for r in cell if _strategy(r) == "load" and r["method"] == "raw"), None)
            fixed_name = "recompute" if _strategy(best) == "recompute" else f"load {best['method']}"
            body.append([str(length), transport, fixed_name, f"{best['ttft_s']:.3f}",
                         ours["method"], f"{ours['ttft_s']:.3f}", f"{best['ttft_s'] / ours['ttft_s']:.2f}x",
                         f"{raw['ttft_s'] / ours['ttft_s']:.2f}x" if raw else "-"])
    return ("Adaptive against the best fixed strategy of each cell", ["context", "transport", "best fixed", "s",
                                                                      "best adaptive", "s", "fixed / adaptive",
                                                                      "raw load / adaptive"], body)


def _drop_section(rows: list[dict[str, Any]]) -> Section:
    body = [[str(r["context_tokens"]), _strategy(r), r["method"], r["transport"],
             " ".join(f"{run['ttft_s']:.3f}" for run in r["runs"]),
             f"{sum(run['dropped'] for run in r['runs'])}/{len(r['runs'])}",
             " ".join(str(run["chunks_computed"]) for run in r["runs"]), f"{r['ttft_s']:.3f}"]
            for r in rows if r.get("drop_to_gbps") is not None]
    return ("Drop scenario: TTFT of every timed run", ["context", "strategy", "method", "transport", "runs (s)",
                                                       "runs with the drop", "chunks computed per run",
                                                       "reported (s)"], body)


def _slo_section(rows: list[dict[str, Any]]) -> Section:
    body = []
    for r in rows:
        if _strategy(r) != "slo":
            continue
        for k, run in enumerate(r["runs"]):
            levels = ", ".join(f"{name} {n}" for name, n in sorted(run["levels"].items()))
            body.append([str(r["context_tokens"]), str(k + 1), f"{r['slo_s']:.3f}", f"{run['ttft_s']:.3f}",
                         f"{run['ttft_s'] / r['slo_s']:.2f}", "yes" if run["dropped"] else "no", levels,
                         str(run["replans"]), f"{run['kl']:.4f}"])
    return ("Drop scenario under a TTFT target (levels arm): every timed run", ["context", "run", "target (s)",
                                                                              "TTFT (s)", "TTFT / target", "dropped",
                                                                              "chunks per level", "re-plans",
                                                                              "KL first token"], body)


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The issue's targets, checked on the rows: (target, what was measured, met / missed)."""
    out = []
    versus = _versus_section(rows)[2]
    if versus:
        ratios = [float(line[6].rstrip("x")) for line in versus]
        worst = min(ratios)
        within = sum(x >= 1 / 1.05 for x in ratios)
        out.append(("adaptive <= 1.05x the best fixed strategy in every cell",
                    f"{within}/{len(ratios)} cells; worst adaptive / best fixed {1 / worst:.2f}x",
                    "met" if within == len(ratios) else "missed"))
        close = []
        for length, transport, *_ in versus:
            n = int(length)
            cell = [r for r in rows if r["context_tokens"] == n and r["transport"] == transport]
            loads = [r["ttft_s"] for r in cell if _strategy(r) == "load"]
            rec = [r["ttft_s"] for r in rows if r["context_tokens"] == n and _strategy(r) == "recompute"]
            if loads and rec and max(min(loads), rec[0]) <= 3 * min(min(loads), rec[0]):
                line = next(v for v in versus if v[0] == length and v[1] == transport)
                close.append(float(line[6].rstrip("x")))
        if close:
            out.append(("where best load and recompute are within 3x: adaptive >= 1.3x faster than the best fixed",
                        f"{sum(x >= 1.3 for x in close)}/{len(close)} cells; speed-ups "
                        + " ".join(f"{x:.2f}x" for x in close), "met" if all(x >= 1.3 for x in close) else "missed"))
        for gbps, want in ((0.1, 5.0), (1.0, 2.0)):
            name = f"link {gbps:g} Gbps"
            got = [float(line[7].rstrip("x")) for line in versus if line[1].startswith(name) and line[7] != "-"]
            if got:
                out.append((f"adaptive >= {want:g}x faster than loading raw at {gbps:g} Gbps",
                            " ".join(f"{x:.2f}x" for x in got), "met" if min(got) >= want else "missed"))
    for r in rows:
        if _strategy(r) == "slo":
            n = len(r["runs"])
            kls = [run["kl"] for run in r["runs"]]
            out.append((f"drop scenario ({r['context_tokens']} tokens): TTFT within 1.1x the target in >= 90% of "
                        "the runs", f"{r['within_1_1x']}/{n} runs (target {r['slo_s']:.3f} s); KL first token "
                        f"{min(kls):.4f}-{max(kls):.4f}", "met" if r["within_1_1x"] >= 0.9 * n else "missed"))
    adaptive = [r for r in rows if _strategy(r) == "adaptive" and r.get("levels")]
    if adaptive:
        own = [r for r in adaptive if set(r["levels"]) <= {r.get("best_level"), "computed", "recomputed"}]
        out.append(("with no target, adaptive loads the best stored level (quality of the fixed codec)",
                    f"{len(own)}/{len(adaptive)} adaptive rows loaded only their codec's best level",
                    "met" if len(own) == len(adaptive) else "missed"))
    return out


def _targets_section(rows: list[dict[str, Any]]) -> Section:
    return "Targets of issue 11", ["target", "measured", "verdict"], [list(t) for t in targets(rows)]


def _recompute_section(rows: list[dict[str, Any]]) -> Section:
    body = [[str(r["context_tokens"]), *[f"{r['recompute_s'][d]:.2f}" for d in RECOMPUTE_DTYPES], r["dtype"]]
            for r in rows if "recompute_s" in r]
    return "Recompute TTFT by compute dtype (s)", ["context", *RECOMPUTE_DTYPES, "baseline"], body


def _sections(rows: list[dict[str, Any]]) -> list[Section]:
    sections = [_ttft_section(rows), _decisions_section(rows), _versus_section(rows), _throughput_section(rows),
                _drop_section(rows), _slo_section(rows), _recompute_section(rows), _targets_section(rows)]
    return [s for s in sections if s[2]]


def _print(console: Console, rows: list[dict[str, Any]]) -> None:
    for title, header, body in _sections(rows):
        out = Table(title=f"{title} ({rows[0]['machine']})" if title.startswith("TTFT") else title)
        for column in header:
            out.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
        for line in body:
            out.add_row(*line)
        console.print(out)


def _links_text(rows: list[dict[str, Any]]) -> str:
    """What the page's link columns are: real shaped links, emulated ones (and why), or both."""
    kinds = {r.get("link") for r in rows if str(r["transport"]).startswith("link")}
    text = []
    if "tbf" in kinds:
        shape = LinkShape()
        text.append("Links marked `Gbps` are real: Redis in a network namespace of its own, reached over a veth pair "
                    f"shaped by `tc qdisc ... tbf` in both directions (burst {shape.burst_ms:g} ms at the rate, "
                    f"queue {shape.queue_ms:g} ms), with {LINK_DELAY_S * 1e3:g} ms of delay added by the client "
                    "before every request (this kernel has no netem to add it in tc), so TCP, the "
                    "shaper and Redis are in every number. On 2 shared cores Redis and its client cannot fill "
                    "10 or 25 Gbit/s: the throughput table below says what each link gave.")
    if kinds - {"tbf"}:
        notes = sorted({r["link_note"] for r in rows if r.get("link_note")})
        why = f" ({'; '.join(notes)})" if notes else ""
        text.append(f"Links marked `(emulated)` are **emulated**{why}: a memory store that sleeps "
                    f"{LINK_DELAY_S * 1e3:g} ms + `bytes * 8 / bandwidth` for each read.")
    if any(r.get("drop_to_gbps") is not None for r in rows):
        high, low = DROP_GBPS
        text.append(f"`link {high:g}→{low:g} Gbps` is the drop scenario: {high:g} Gbps until a quarter of the "
                    f"chunks have arrived, then {low:g} Gbps for the rest of the request.")
    return " ".join(text)


def markdown(rows: list[dict[str, Any]], plot_path: Path | None, command: str = "kvpack bench ttft",
             rendered_by: str | None = None) -> str:
    """docs/results/ttft.md from the rows (measured by ``command``; ``rendered_by``: the command that drew this page
    from their JSON)."""
    recomputes = [r for r in rows if r["method"] == "recompute"]
    lines = ["# Time to first token", ""]
    if any("recompute_s" not in r for r in recomputes) or any("strategy" not in r for r in rows):
        lines += [f"> **Previous protocol: regenerate this page with `{command}`.** Its rows predate the loader "
                  "(every chunk loaded, then decoded, then the rest prefilled) and its recompute rows are bfloat16 "
                  "compute only, timed without the loading rows' warm-up run. `kvpack bench ttft` now compares "
                  "recompute (the faster of bfloat16 and float32), loading and the adaptive loader under one "
                  "protocol, over real shaped links where the machine permits."
                  + (" Make the profiles it names first with `kvpack calibrate --codec NAME -o PATH`."
                     if "profile=" in command else ""), ""]
    loads = [r["load_avg_1m"] for r in rows if "load_avg_1m" in r]
    busy = f" (load average over 1 min while the rows were measured: {min(loads):.1f} to {max(loads):.1f})" \
        if loads else ""
    lines += [f"Produced by `{command}` on " + (rows[0]["machine"] if rows else "?") + busy + "."
              + (f" This page is rendered from its JSON by `{rendered_by}`." if rendered_by else ""), "",
              "TTFT in seconds; every row is the lower median of the timed runs after one untimed warm-up run. "
              "`recompute` is plain `model.generate` on the whole prompt in bfloat16 or float32 compute, whichever "
              "is faster on this machine; `load` loads every stored chunk; `adaptive` lets the loader compute "
              "chunks from the front while it loads from the back, deciding from its own estimates (prefill seeded "
              "with the measured bfloat16 recompute, fetch and decode measured by the warm-up run). Ratios count "
              "every stored byte.", ""]
    if links := _links_text(rows):
        lines += [links, ""]
    for title, header, body in _sections(rows):
        lines += [f"{title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        lines.append("")
    if plot_path:
        lines += [f"![TTFT against context length]({plot_path.name})", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TTFT against context length, one panel per transport: recompute, and each codec loaded (solid, circles) and
    loaded adaptively (dashed, squares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(rows)
    ncols = min(3, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "recompute"))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    recompute = sorted((r["context_tokens"], r["ttft_s"]) for r in rows if _strategy(r) == "recompute")
    for ax, transport in zip(axes.flat, columns, strict=False):
        if recompute:
            ax.plot(*zip(*recompute, strict=True), marker="o", color="black", label="recompute")
        for method in methods:
            for strategy, style, marker in (("load", "-", "o"), ("adaptive", "--", "s")):
                pts = sorted((r["context_tokens"], r["ttft_s"]) for r in rows if r["method"] == method
                             and r["transport"] == transport and _strategy(r) == strategy)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, linestyle=style, color=colors[method],
                            label=f"{method} ({strategy})")
        ax.set(title=transport, xlabel="context tokens", ylabel="TTFT (s)", yscale="log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
