"""`kvpack bench ttft`: time to first token with and without kvpack, per context length, codec and transport.

For each context length (tokens of CPython stdlib source) the context's KV cache is computed once, encoded with
every codec setting and put, chunk by chunk under its chain keys, into each transport: a memory store, a disk store,
a Redis server (started on a loopback port when ``redis-server`` is installed), and a memory store behind an
emulated network link of 1, 10 or 25 Gbps. The link is emulated in this benchmark's transport: after every batched
read the caller sleeps ``bytes * 8 / bandwidth`` seconds (no latency term; transfer and decode do not overlap).
Then a prompt made of the context plus a short question is answered through :class:`~kvpack.context.ContextCache`
with one new token; TTFT is measured from the call to the first token's logits.

The baseline is full recompute: plain ``model.generate`` on the same prompt, timed in bfloat16 and in float32 (a
float32 copy of the model loaded the same way), because which one is faster depends on the CPU: bf16 compute is
~4x slower than fp32 on AVX2-only CPUs and fast on AVX-512/AMX ones. Both are recorded and printed; the faster is
the ``recompute`` baseline. Every arm, recompute and loading alike, follows one protocol (:func:`timed`): one untimed
warm-up run (numba's first-call compile, the page cache, torch's first-call set-up), then ``repeats`` timed runs, of
which the lower median is reported.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from rich.table import Table

from kvpack.bench.redis_server import RedisServer, redis_server_available
from kvpack.codecs.base import Codec
from kvpack.context import ContextCache, _FirstTokenClock
from kvpack.errors import StoreError
from kvpack.eval.corpora import documents
from kvpack.eval.quality import machine
from kvpack.inference import as_batch, prefill
from kvpack.store import DiskStore, MemoryStore, Store

QUESTION = "\n# Question: which function above is the most complex, and why?\n"
LINKS_GBPS = (1.0, 10.0, 25.0)
#: Codec settings loaded by default, as (codec name, parameters); those not installed are skipped.
DEFAULT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("raw", {}), ("lossless", {}), ("fp8", {}), ("kivi", {"bits": 4}), ("kivi", {"bits": 2}),
)
#: The compute dtypes of the recompute baseline, by the names the JSON and the tables use.
RECOMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
T = TypeVar("T")


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
    """The stores to measure, by name; Redis only when a ``redis-server`` binary and redis-py are installed."""
    with ExitStack() as stack:
        out: dict[str, Store] = {"memory": MemoryStore(max_bytes=1 << 34), "disk": DiskStore(workdir / "disk")}
        try:
            from kvpack.store.redis import RedisStore
        except StoreError as exc:
            console.print(f"[yellow]skipping the Redis transport: {exc}[/yellow]")
        else:
            if redis_server_available():
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


def run(model: Any, tokenizer: Any, spec: Any, codecs: list[Codec], lengths: list[int], repeats: int = 3,
        console: Console | None = None, json_path: Path | None = None, markdown_path: Path | None = None,
        plot_path: Path | None = None, command: str = "kvpack bench ttft", *,
        float32_model: Any) -> list[dict[str, Any]]:
    """Measure TTFT for every (length, method, transport); returns the JSON rows.

    ``model`` is the bfloat16 model whose caches are stored and loaded; ``float32_model`` is the same model loaded
    in float32 (``kvpack.models.load(name, dtype=torch.float32)``), timed for the recompute baseline only.
    """
    recompute_models = {"bfloat16": model, "float32": float32_model}
    for name, lm in recompute_models.items():
        if lm.dtype != RECOMPUTE_DTYPES[name]:
            raise ValueError(f"the {name} recompute model is {lm.dtype}; load it with dtype=torch.{name}")
    console = console or Console()
    question = tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kvpack-ttft-") as tmp, transports(Path(tmp), console) as stores:
        for length in lengths:
            ctx = context_ids(tokenizer, length)
            prompt = torch.cat([ctx, question])
            recompute = {name: timed(partial(_recompute_ttft, lm, prompt), float, repeats)
                         for name, lm in recompute_models.items()}
            fastest = min(recompute, key=recompute.__getitem__)
            rows.append({"context_tokens": length, "method": "recompute", "transport": "-",
                         "ttft_s": recompute[fastest], "dtype": fastest, "recompute_s": recompute,
                         "bytes_read": 0, "ratio": None})
            console.print(f"{length} tokens: recompute done")
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
                        answer = partial(cc.generate, prompt, max_new_tokens=1, do_sample=False)
                        best = timed(answer, lambda g: g.stats.ttft_s, repeats).stats
                        for key in cc.keys.keys(prompt):
                            store.delete(key)
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
    for row in rows:
        if row["method"] == "recompute":
            console.print(f"{row['context_tokens']} tokens: {_recompute_note(row)}")


def _recompute_note(row: dict[str, Any]) -> str:
    """A recompute row in words: the TTFT of each compute dtype and which one is the baseline."""
    times = row.get("recompute_s")
    if times is None:
        return f"recompute {row['ttft_s']:.2f} s (bfloat16 only: the previous protocol)"
    return "recompute " + ", ".join(f"{name} {t:.2f} s" for name, t in times.items()) + f"; baseline {row['dtype']}"


def markdown(rows: list[dict[str, Any]], plot_path: Path | None, command: str = "kvpack bench ttft") -> str:
    """docs/results/ttft.md from the rows."""
    transports_seen, table = _pivot(rows)
    recomputes = [r for r in rows if r["method"] == "recompute"]
    lines = ["# Time to first token", ""]
    if any("recompute_s" not in r for r in recomputes):
        lines += [f"> **Previous protocol: regenerate this page with `{command}`.** Its recompute rows are "
                  "bfloat16 compute only, timed without the loading rows' warm-up run, so they overstate every "
                  "speed-up wherever float32 compute is faster (~4x on AVX2-only CPUs). `kvpack bench ttft` now "
                  "times recompute in bfloat16 and float32 under the loading rows' protocol and takes the faster."
                  + (" Make the profiles it names first with `kvpack calibrate --codec NAME -o PATH`."
                     if "profile=" in command else ""), ""]
        protocol = ("loading rows are the lower median of the timed runs after one untimed warm-up run; recompute "
                    "rows are plain `model.generate` on the whole prompt in bfloat16, the median of `repeats - 1` runs "
                    "without a warm-up run")
    else:
        protocol = ("every row is the lower median of the timed runs after one untimed warm-up run; recompute is "
                    "plain `model.generate` on the whole prompt in bfloat16 or float32 compute, whichever is "
                    "faster on this machine (both are listed below the table)")
    lines += [f"Produced by `{command}` on " + (rows[0]["machine"] if rows else "?") + ".", "",
              f"TTFT in seconds: {protocol}. Links are emulated by sleeping `bytes * 8 / bandwidth` after each "
              "batched read of a memory store (no latency; transfer and decode do not overlap). Ratios count "
              "every stored byte.", ""]
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
    timed_both = [r for r in recomputes if "recompute_s" in r]
    if timed_both:
        lines += ["", "Recompute TTFT by compute dtype (s):", "", "| context | bfloat16 | float32 | baseline |",
                  "|---|---|---|---|"]
        lines += [f"| {r['context_tokens']} | {r['recompute_s']['bfloat16']:.2f} | {r['recompute_s']['float32']:.2f} "
                  f"| {r['dtype']} |" for r in timed_both]
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
