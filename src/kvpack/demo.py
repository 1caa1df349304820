"""`kvpack demo` / `make demo`: the main job on the embedded defaults.

A long context (CPython's ``textwrap.py``, about 4.8K tokens) is prefilled once and stored through a
:class:`~kvpack.context.ContextCache` in a disk store (and, beside it, as raw fp16 chunks; and in Redis behind a
1 Gbit/s shaped link where the machine permits one, :class:`~kvpack.bench.links.ShapedLink`). Three questions about
it are then answered without kvpack (the model reads the whole context: a cold start) and with kvpack (the loader
brings the context's KV cache back from the store, computing chunks from the front only where that is predicted to
be faster, and only the question is prefilled: a warm start), next to loading every raw chunk from disk, and over
the link. A second table shows, per question and store, what the loader did with each chunk. The cold start is
timed in bfloat16 (the model kvpack serves, whose answer the warm one is compared with) and in float32, and the
speed-up is against the faster of the two: which is faster depends on the CPU. The demo prints the times to first
token, the bytes stored against fp16, and whether the answers agree. One stored chunk is decoded before the timed
runs, so the warm times do not include numba's one-off compilation of the codec's decoder (cached on disk after the
first run).
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpack.codecs.base import Codec
from kvpack.context import ContextCache, _FirstTokenClock
from kvpack.errors import KvpackError
from kvpack.inference import as_batch, prefill
from kvpack.loader import LoaderConfig
from kvpack.store import DiskStore
from kvpack.store import open as open_store

CONTEXT_FILE = "textwrap.py"
QUESTIONS = (
    "What does the dedent function do?",
    "What is the default width of a TextWrapper?",
    "Which function collapses whitespace and truncates text to fit a width?",
)
ANSWER_TOKENS = 32
#: The rate of the shaped link the demo also loads over, where the machine permits one (root, netns, tc, Redis).
LINK_GBPS = 1.0


def _prompt(tokenizer: Any, source: str, question: str) -> torch.Tensor:
    content = f"Here is a Python module:\n```python\n{source}\n```\nAnswer briefly. {question}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def _uncached(model: Any, ids: torch.Tensor, tokens: int = ANSWER_TOKENS) -> tuple[torch.Tensor, float]:
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(as_batch(ids), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                             max_new_tokens=tokens, do_sample=False, logits_processor=[clock])
    return out[0, len(ids):], (clock.at or time.perf_counter()) - start


def _busy(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                    transient=True)


def chunk_runs(levels: list[str]) -> str:
    """What a load did per chunk, as runs: ``["computed", "computed", "lossless"]`` -> ``"0-1 computed,
    2 lossless"``."""
    out, start = [], 0
    for i in range(1, len(levels) + 1):
        if i == len(levels) or levels[i] != levels[start]:
            span = f"{start}-{i - 1}" if i - 1 > start else f"{start}"
            out.append(f"{span} {levels[start]}")
            start = i
    return ", ".join(out) or "-"


def _link(console: Console) -> Any:
    """A 1 Gbit/s shaped link with Redis behind it (:class:`~kvpack.bench.links.ShapedLink`), or ``None`` with the
    reason printed where this machine cannot make one."""
    try:
        from kvpack.bench.links import ShapedLink, links_available
        from kvpack.store.redis import RedisStore  # noqa: F401  (needs the redis extra)
    except (ImportError, KvpackError) as exc:
        console.print(f"[dim]no shaped link: {exc}[/dim]")
        return None
    ok, why = links_available()
    if not ok:
        console.print(f"[dim]no shaped link here: {why}[/dim]")
        return None
    return ShapedLink(LINK_GBPS)


def run_demo(console: Console, model: str, codec: Codec, store_url: str | None = None) -> None:
    """Run the demo, printing progress and a results table to ``console``."""
    from kvpack import models
    from kvpack.spec import ModelSpec

    with _busy(console) as bar:
        bar.add_task(f"loading model {model}", total=None)
        t0 = time.perf_counter()
        lm, tokenizer = models.load(model)
        lm32, _ = models.load(model, dtype=torch.float32)
        spec = ModelSpec.from_model(lm, tokenizer)
    console.print(f"[bold]model[/bold] {model}: {spec.num_layers} layers x {spec.num_kv_heads} KV heads x "
                  f"{spec.head_dim} dims, {spec.dtype}, loaded in {time.perf_counter() - t0:.1f} s")
    source = (Path(sysconfig.get_paths()["stdlib"]) / CONTEXT_FILE).read_text()
    prompts = [_prompt(tokenizer, source, q) for q in QUESTIONS]
    lists = [p.tolist() for p in prompts]
    shared = next(i for i, col in enumerate(zip(*lists, strict=False)) if len(set(col)) > 1)
    tmp = tempfile.TemporaryDirectory(prefix="kvpack-demo-") if store_url is None else None
    store = DiskStore(tmp.name) if tmp else open_store(store_url or "")
    console.print(f"[bold]context[/bold] {CONTEXT_FILE} from the standard library: {shared} tokens shared by the "
                  f"three prompts; store {tmp.name if tmp else store_url}; codec {codec.name} {codec.params()}")
    with ExitStack() as stack:
        stack.callback(lambda: tmp.cleanup() if tmp is not None else None)
        link = _link(console)
        cc = stack.enter_context(ContextCache(lm, tokenizer, store=store, codec=codec, spec=spec))
        raw = stack.enter_context(ContextCache(lm, tokenizer, store=store, codec="raw", spec=spec,
                                               loader=LoaderConfig(compute_front=False)))
        caches = {"disk": cc}
        if link is not None:
            from kvpack.store.redis import RedisStore

            stack.enter_context(link)
            remote = stack.enter_context(RedisStore(link.url))
            caches[f"{LINK_GBPS:g} Gbps link"] = stack.enter_context(
                ContextCache(lm, tokenizer, store=remote, codec=codec, spec=spec))
        with _busy(console) as bar:
            bar.add_task(f"prefilling the context once ({shared} tokens) and storing its chunks", total=None)
            t0 = time.perf_counter()
            kv, _ = prefill(lm, spec, prompts[0][:shared])
            seconds = time.perf_counter() - t0
            written = [c.prefixes.save(kv, prompts[0]) for c in (*caches.values(), raw)]
        blobs = [store.get(k) or b"" for k in cc.keys.keys(prompts[0][:shared])]
        for c in (raw, *caches.values()):  # the codecs' one-time setup, untimed, as a server pays at startup
            c.warm_up()
        stored = sum(map(len, blobs))
        fp16 = 2 * written[0] * cc.chunk_tokens * spec.elements_per_token
        console.print(f"[bold]stored[/bold] {written[0]} chunks of {cc.chunk_tokens} tokens: "
                      f"{stored / 1e6:.1f} MB with {codec.name} ({fp16 / 1e6:.1f} MB at fp16, "
                      f"{fp16 / max(stored, 1):.2f}x; raw fp16 beside it, for comparison) after a "
                      f"{seconds:.1f} s prefill")
        table = Table(title=f"time to first token, {ANSWER_TOKENS}-token greedy answers")
        for column in ("question", "cold TTFT bf16 / fp32", "warm: kvpack (disk)", "loading raw (disk)",
                       *[f"kvpack ({name})" for name in caches if name != "disk"], "speed-up", "answer agrees"):
            table.add_column(column, justify="left" if column == "question" else "right")
        choices = Table(title="what the loader did per chunk (loaded at a level, or computed from the front)")
        for column in ("question", "store", "chunks"):
            choices.add_column(column)
        answers = []
        for question, ids in zip(QUESTIONS, prompts, strict=True):
            with _busy(console) as bar:
                bar.add_task(f"{question} (cold: full prefill of {len(ids)} tokens)", total=None)
                cold_answer, cold = _uncached(lm, ids)
                bar.add_task(f"{question} (cold in float32)", total=None)
                _, cold32 = _uncached(lm32, ids, tokens=1)
                bar.add_task(f"{question} (warm: from the store)", total=None)
                result = cc.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
                bar.add_task(f"{question} (loading raw fp16, every chunk)", total=None)
                raw_stats = raw.generate(ids, max_new_tokens=1, do_sample=False).stats
                others = {name: c.generate(ids, max_new_tokens=1, do_sample=False).stats
                          for name, c in caches.items() if name != "disk"}
            stats = result.stats
            warm_answer = result.new_tokens
            same = torch.equal(warm_answer, cold_answer)
            agree = next((i for i, (a, b) in enumerate(zip(warm_answer, cold_answer, strict=False)) if a != b),
                         min(len(warm_answer), len(cold_answer)))
            table.add_row(question, f"{cold:.2f} / {cold32:.2f} s", f"{stats.ttft_s:.2f} s",
                          f"{raw_stats.ttft_s:.2f} s", *[f"{o.ttft_s:.2f} s" for o in others.values()],
                          f"{min(cold, cold32) / stats.ttft_s:.1f}x",
                          "yes" if same else f"first {agree}/{len(cold_answer)} tokens")
            for name, st in {"disk": stats, **others}.items():
                choices.add_row(question, name, chunk_runs(st.chunk_levels))
            answers.append((question, tokenizer.decode(warm_answer, skip_special_tokens=True).strip()))
        console.print(table)
        console.print(choices)
        for question, answer in answers:
            console.print(f"[bold]Q[/bold] {question}\n[bold]A[/bold] {answer}")
        console.print("[dim]Warm requests bring the context's KV chunks back from the store (computing chunks from "
                      "the front only where the loader predicts that is faster) and prefill only the question; cold "
                      "requests prefill everything; the speed-up is against the faster cold run. A warm answer can "
                      "part from the cold one after a few tokens although lossless chunks come back bit for bit: the "
                      "warm request's KV was computed in other forward passes (the context once, the question on "
                      "its own), whose sums run in other orders, and a greedy bf16 answer can take either side of a "
                      "near-tie.[/dim]")
