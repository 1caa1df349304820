"""`kvpack demo` / `make demo`: the main job on the embedded defaults.

A long context (CPython's ``textwrap.py``, about 4.8K tokens) is prefilled once and stored through a
:class:`~kvpack.context.ContextCache` in a disk store. Three questions about it are then answered twice: without
kvpack (the model reads the whole context: a cold start) and with kvpack (the loader brings the context's KV cache
back from the store, computing chunks from the front only where that is predicted to be faster, and only the
question is prefilled: a warm start). The cold start is timed in bfloat16 (the model kvpack serves, whose answer
the warm one is compared with) and in float32, and the speed-up is against the faster of the two: which is faster
depends on the CPU. The demo prints the times to first token, what the loader did (chunks loaded and computed), the
bytes stored against fp16, and whether the answers agree. One stored chunk is decoded before the timed runs, so the warm
times do not include numba's one-off compilation of the codec's decoder (cached on disk after the first run).
"""

from __future__ import annotations

import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvpack.codecs.base import Codec
from kvpack.context import ContextCache, _FirstTokenClock
from kvpack.inference import as_batch
from kvpack.store import DiskStore
from kvpack.store import open as open_store

CONTEXT_FILE = "textwrap.py"
QUESTIONS = (
    "What does the dedent function do?",
    "What is the default width of a TextWrapper?",
    "Which function collapses whitespace and truncates text to fit a width?",
)
ANSWER_TOKENS = 32


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
    try:
        with ContextCache(lm, tokenizer, store=store, codec=codec, spec=spec) as cc:
            with _busy(console) as bar:
                bar.add_task(f"prefilling the context once ({shared} tokens) and storing its chunks", total=None)
                warm = cc.prefill(prompts[0][:shared])
                cc.flush()
            stored = store.stats().bytes_written
            first = store.get(cc.keys.keys(prompts[0][:shared])[0])
            if first is not None:  # decode one chunk untimed: numba compiles (or loads) the decoder now
                codec.decode(first, spec)
            fp16 = 2 * warm.chunks_written * cc.chunk_tokens * spec.elements_per_token
            console.print(f"[bold]stored[/bold] {warm.chunks_written} chunks of {cc.chunk_tokens} tokens: "
                          f"{stored / 1e6:.1f} MB ({fp16 / 1e6:.1f} MB at fp16, {fp16 / max(stored, 1):.2f}x) "
                          f"after a {warm.prefill_s:.1f} s prefill")
            table = Table(title=f"time to first token, {ANSWER_TOKENS}-token greedy answers")
            for column in ("question", "cold TTFT bf16 / fp32", "warm TTFT (kvpack)", "speed-up", "tokens reused",
                           "chunks loaded / computed", "answer agrees"):
                table.add_column(column, justify="left" if column == "question" else "right")
            answers = []
            for question, ids in zip(QUESTIONS, prompts, strict=True):
                with _busy(console) as bar:
                    bar.add_task(f"{question} (cold: full prefill of {len(ids)} tokens)", total=None)
                    cold_answer, cold = _uncached(lm, ids)
                    bar.add_task(f"{question} (cold in float32)", total=None)
                    _, cold32 = _uncached(lm32, ids, tokens=1)
                    bar.add_task(f"{question} (warm: from the store)", total=None)
                    result = cc.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
                stats = result.stats
                warm_answer = result.new_tokens
                same = torch.equal(warm_answer, cold_answer)
                agree = next((i for i, (a, b) in enumerate(zip(warm_answer, cold_answer, strict=False)) if a != b),
                             min(len(warm_answer), len(cold_answer)))
                table.add_row(question, f"{cold:.2f} / {cold32:.2f} s", f"{stats.ttft_s:.2f} s",
                              f"{min(cold, cold32) / stats.ttft_s:.1f}x", f"{stats.tokens_hit}/{stats.prompt_tokens}",
                              f"{stats.chunks_loaded} / {stats.chunks_computed}",
                              "yes" if same else f"first {agree}/{len(cold_answer)} tokens")
                answers.append((question, tokenizer.decode(warm_answer, skip_special_tokens=True).strip()))
        console.print(table)
        for question, answer in answers:
            console.print(f"[bold]Q[/bold] {question}\n[bold]A[/bold] {answer}")
        console.print("[dim]Warm requests bring the context's KV chunks back from the store and prefill only the "
                      "question; cold requests prefill everything; the speed-up is against the faster cold run. "
                      "Answers can differ in rare places only because split and one-shot prefill add "
                      "floating-point numbers in different orders.[/dim]")
    finally:
        if tmp is not None:
            tmp.cleanup()
