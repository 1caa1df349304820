"""`kvpack bench ttft`: time to first token with and without kvpack, per context length, codec and transport.

For each context length (tokens of CPython stdlib source) the context's KV cache is computed once, encoded with
every codec setting and put, chunk by chunk under its chain keys, into each transport: a memory store, a disk store,
a Redis server (started on a loopback port when ``redis-server`` is installed), and a memory store behind an
emulated network link of 1, 10 or 25 Gbps. The link is emulated in this benchmark's transport: after every batched
read the caller sleeps ``bytes * 8 / bandwidth`` seconds (no latency term; transfer and decode do not overlap).
Then a prompt made of the context plus a short question is answered through :class:`~kvpack.context.ContextCache`
with one new token; TTFT is measured from the call to the first token's logits (lower median of ``repeats`` runs,
after one untimed warm-up run per codec and transport that pays numba's first-call compile and warms the page cache).
The baseline is full recompute: plain ``model.generate`` on the same prompt.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvpack.codecs.base import Codec
from kvpack.context import ContextCache, _FirstTokenClock
from kvpack.eval.corpora import documents
from kvpack.eval.quality import machine
from kvpack.inference import as_batch, prefill
from kvpack.store import DiskStore, MemoryStore, Store
from kvpack.store.redis_server import RedisServer, redis_server_available

QUESTION = "\n# Question: which function above is the most complex, and why?\n"
LINKS_GBPS = (1.0, 10.0, 25.0)
#: Codec settings loaded by default, as (codec name, parameters); those not installed are skipped.
DEFAULT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("raw", {}), ("lossless", {}), ("fp8", {}), ("kivi", {"bits": 4}), ("kivi", {"bits": 2}),
)


class LinkStore(Store):
    """A store behind an emulated link of ``gbps``: each batched read sleeps for its bytes' transfer time."""

    def __init__(self, inner: Store, gbps: float) -> None:
        super().__init__()
        self.inner, self.gbps = inner, gbps

    def __repr__(self) -> str:
        return f"LinkStore({self.inner!r}, {self.gbps} Gbps)"

    def _read_many(self, keys: list[str]) -> list[bytes | None]:
        found = self.inner._read_many(keys)
        time.sleep(sum(len(d) for d in found if d is not None) * 8 / (self.gbps * 1e9))
        return found

    def _write(self, key: str, data: bytes) -> bool:
        return self.inner._write(key, data)

    def _exists(self, key: str) -> bool:
        return self.inner._exists(key)

    def _remove(self, key: str) -> bool:
        return self.inner._remove(key)

    def _usage(self) -> tuple[int, int] | None:
        return self.inner._usage()

    def _close(self) -> None:
        self.inner.close()


@contextmanager
def transports(workdir: Path, console: Console) -> Iterator[dict[str, Store]]:
    """The stores to measure, by name; Redis only when a ``redis-server`` binary is installed."""
    with ExitStack() as stack:
        out: dict[str, Store] = {"memory": MemoryStore(max_bytes=1 << 34), "disk": DiskStore(workdir / "disk")}
        if redis_server_available():
            from kvpack.store import RedisStore

            server = stack.enter_context(RedisServer(workdir / "redis"))
            out["redis"] = RedisStore(server.url)
        else:
            console.print("[yellow]redis-server not installed: skipping the Redis transport[/yellow]")
        for gbps in LINKS_GBPS:
            out[f"link {gbps:g} Gbps"] = LinkStore(MemoryStore(max_bytes=1 << 34), gbps)
        try:
            yield out
        finally:
            for store in out.values():
                store.close()


def context_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    """``tokens`` token ids of stdlib source (eval documents joined)."""
    text = "\n".join(d.text for d in documents(12) if d.kind == "code")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < tokens:
        raise ValueError(f"only {ids.numel()} tokens of context text available, {tokens} asked")
    return ids[:tokens]


def _recompute_ttft(model: Any, ids: torch.Tensor) -> float:
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(as_batch(ids), attention_mask=torch.ones(1, len(ids), dtype=torch.int64), max_new_tokens=1,
                       do_sample=False, logits_processor=[clock])
    return (clock.at or time.perf_counter()) - start


def run(model: Any, tokenizer: Any, spec: Any, codecs: list[Codec], lengths: list[int], repeats: int = 3,
        console: Console | None = None, json_path: Path | None = None, markdown_path: Path | None = None,
        plot_path: Path | None = None, command: str = "kvpack bench ttft") -> list[dict[str, Any]]:
    """Measure TTFT for every (length, method, transport); returns the JSON rows."""
    console = console or Console()
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvpack-ttft-") as tmp, transports(Path(tmp), console) as stores:
        for length in lengths:
            ctx = context_ids(tokenizer, length)
            prompt = torch.cat([ctx, question])
            times = [_recompute_ttft(model, prompt) for _ in range(max(1, repeats - 1))]
            rows.append({"context_tokens": length, "method": "recompute", "transport": "-",
                         "ttft_s": statistics.median(times), "bytes_read": 0, "ratio": None})
            console.print(f"{length} tokens: recompute {rows[-1]['ttft_s']:.2f} s")
            kv, _ = prefill(model, spec, ctx)
            for codec in codecs:
                label = codec.name + "".join(f" {k}={v}" for k, v in codec.params().items()
                                             if v is not None and k != "profile")
                for transport, store in stores.items():
                    with ContextCache(model, tokenizer, store=store, codec=codec, spec=spec,
                                      namespace=f"bench-{length}") as cc:
                        keys = cc.keys.keys(ctx)
                        chunks = kv[: len(keys) * cc.chunk_tokens]
                        chunks.token_ids = ctx[: chunks.num_tokens]
                        for key, part in zip(keys, chunks.chunks(cc.chunk_tokens), strict=True):
                            store.put(key, codec.encode(part))
                        cc.generate(prompt, max_new_tokens=1, do_sample=False)  # untimed: numba compile, page cache
                        stats = []
                        for _ in range(repeats):
                            cc.generate(prompt, max_new_tokens=1, do_sample=False)
                            stats.append(cc.last_stats)
                        for key in cc.keys.keys(prompt):
                            store.delete(key)
                    best = sorted(stats, key=lambda s: s.ttft_s)[(len(stats) - 1) // 2]  # lower median
                    rows.append({"context_tokens": length, "method": label, "transport": transport,
                                 "ttft_s": best.ttft_s, "load_s": best.load_s, "decode_s": best.decode_s,
                                 "prefill_s": best.prefill_s, "tokens_hit": best.tokens_hit,
                                 "bytes_read": best.bytes_read,
                                 "ratio": 2 * best.tokens_hit * spec.elements_per_token / max(best.bytes_read, 1)})
                console.print(f"{length} tokens: {label} done")
    for row in rows:
        row["machine"] = machine()
    _print(console, rows)
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    if markdown_path:
        markdown_path.write_text(markdown(rows, plot_path, command))
    if plot_path:
        plot(rows, plot_path)
    return rows


def _pivot(rows: list[dict[str, Any]]) -> tuple[list[str], dict[tuple[int, str], dict[str, float]]]:
    transports_seen = list(dict.fromkeys(r["transport"] for r in rows if r["method"] != "recompute"))
    table: dict[tuple[int, str], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["context_tokens"], r["method"]), {})[r["transport"]] = r["ttft_s"]
    return transports_seen, table


def _print(console: Console, rows: list[dict[str, Any]]) -> None:
    transports_seen, table = _pivot(rows)
    out = Table(title=f"TTFT in seconds ({rows[0]['machine'] if rows else ''})")
    for column in ("context", "method", *transports_seen):
        out.add_column(column, justify="right" if column not in ("method",) else "left")
    for (length, method), cells in table.items():
        if method == "recompute":
            out.add_row(str(length), method, *[f"{cells['-']:.2f}"] * len(transports_seen))
        else:
            out.add_row(str(length), method, *[f"{cells[t]:.3f}" if t in cells else "-" for t in transports_seen])
    console.print(out)


def markdown(rows: list[dict[str, Any]], plot_path: Path | None, command: str = "kvpack bench ttft") -> str:
    """docs/results/ttft.md from the rows."""
    transports_seen, table = _pivot(rows)
    lines = ["# Time to first token", "",
             f"Produced by `{command}` on " + (rows[0]["machine"] if rows else "?") + ".", "",
             "TTFT in seconds (lower median of the timed runs, after one warm-up run); recompute is plain "
             "`model.generate` on the whole prompt. Links are emulated "
             "by sleeping `bytes * 8 / bandwidth` after each batched read of a memory store (no latency; transfer "
             "and decode do not overlap). Ratios count every stored byte.", ""]
    ratios = {(r["context_tokens"], r["method"]): r["ratio"] for r in rows if r["ratio"]}  # same in every transport
    lines.append("| context | method | ratio | " + " | ".join(transports_seen) + " |")
    lines.append("|---|---|---|" + "---|" * len(transports_seen))
    for (length, method), cells in table.items():
        if method == "recompute":
            values = [f"{cells['-']:.2f}"] * len(transports_seen)
            ratio = "-"
        else:
            values = [f"{cells[t]:.3f}" if t in cells else "-" for t in transports_seen]
            ratio = f"{ratios.get((length, method), 0):.1f}x"
        lines.append(f"| {length} | {method} | {ratio} | " + " | ".join(values) + " |")
    if plot_path:
        lines += ["", f"![TTFT against context length]({plot_path.name})"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TTFT against context length: recompute and each method over a 10 Gbps link and from disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, transport in zip(axes, ("link 10 Gbps", "disk"), strict=True):
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for method in methods:
            pts = sorted((r["context_tokens"], r["ttft_s"]) for r in rows if r["method"] == method
                         and (r["transport"] == transport or method == "recompute"))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(title=f"kvpack loads from {transport}", xlabel="context tokens", ylabel="TTFT (s)", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
