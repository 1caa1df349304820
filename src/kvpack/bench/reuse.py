"""`kvpack bench reuse`: segments reused at new positions and edited documents, per repair policy, on the real model.

Three kinds of cases (docs/reuse.md, issue 13 §3), each compared with full recompute of the same prompt:

- **RAG**: a system prompt, then ``n`` segments (``segment_counts``, alternating per pair of cases) of
  ``segment_tokens`` tokens cut at random places of random eval documents, then the continuation of one of them
  (``continuation`` tokens, scored) and a question-like suffix (greedy decoding after it). Even cases draw from code
  documents, odd ones from prose. Per policy and recompute ratio: KL(full || policy) mean and p99 over the scored
  positions, top-1 agreement, continuation perplexity, greedy agreement (matching prefix of ``greedy_tokens``).
- **Passkey across segments**: 8 filler segments, one holding the key; per trial the key's segment is drawn; accuracy
  per policy against full recompute.
- **Edits**: an eval document's first ``edit_tokens`` tokens of lines (half stdlib code, half prose), stored, then
  edited (insert, delete or replace 1-10 lines at a random line); the continuation's perplexity after the edited
  version, per arm: full recompute, prefix-only reuse (``repair="full"``: the stored chunks before the first change
  load, the rest is computed), PIE (``repair="none"``: only edited tokens) and PIE plus a policy's repair set.

What is expensive is computed once per case: each segment's cache (stored in a memory store through
:class:`~kvpack.context.ContextCache`, raw codec), the assembled unrepaired cache, and the full-recompute reference;
every policy and ratio then starts from them. Quality arms apply ``policy.repair(job)``, as ``SegmentReuse.assemble``
does; besides ``recomputed`` (the share of moved tokens recomputed at every layer) each RAG row has ``compute``, the
(token, layer) pairs recomputed over those of recomputing every moved token: CacheBlend's arms recompute every moved
token in their first layers, so at equal ``recomputed`` they spend more than EPIC's or the query-aware arm's.

TTFT is measured on dedicated timing cases (RAG: ``max(segment_counts)`` segments of ``segment_tokens[1]`` tokens;
edits: the first edit case) through the request path (``cc.segments.assemble`` from the memory store, then the model
over the uncached tail until the last prompt token's logits), full recompute through the same path
(``repair="full"``; for edits also a plain prefill without any store). Every timed arm follows one protocol
(:func:`kvpack.bench.ttft.timed`): one untimed warm-up run, ``repeats`` timed runs, the lower median. The model runs
in one dtype for every arm: with ``dtype="auto"`` the faster of bfloat16 and float32 on a 256-token prefill (both
times recorded).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.rows import fmt
from kvpack.bench.ttft import timed
from kvpack.context import ContextCache
from kvpack.eval import passkey
from kvpack.eval.corpora import Document, documents
from kvpack.eval.quality import machine
from kvpack.inference import forward, greedy, new_cache, prefill
from kvpack.kv import KVCache
from kvpack.loader import LoaderConfig
from kvpack.reuse import Blend, Epic, Prompt, Prophet, Repair, RepairJob, RepairPolicy, Segment
from kvpack.reuse.policies import FullRecompute, NoRepair
from kvpack.store import MemoryStore

SYSTEM = "You are a helpful assistant. Use the documents below to answer the question at the end.\n\n"
QUESTION = "\n\nQuestion: which document does the text just before this question come from, and what is it about?" \
           "\nAnswer:"
#: Characters of each eval document that segments are cut from (about 3-4K tokens: room for 512 + continuation).
POOL_CHARS = 12_000
#: Chunk size of the edits' store: prefix-only reuse loads whole chunks before the first change.
EDIT_CHUNK = 64
EXACT = LoaderConfig(compute_front=False, estimates_path="")
#: Document kinds; cases alternate between them (half code, half prose).
KINDS = ("code", "prose")


@dataclass(frozen=True)
class ReuseConfig:
    """Sizes of ``kvpack bench reuse`` (defaults: the issue's protocol)."""

    cases: int = 6
    segment_counts: tuple[int, ...] = (4, 8)
    segment_tokens: tuple[int, int] = (256, 512)
    continuation: int = 64
    greedy_tokens: int = 8
    ratios: tuple[float, ...] = (0.05, 0.10, 0.15, 0.20, 0.30)
    timing_ratio: float = 0.15
    passkey_trials: int = 20
    passkey_segments: int = 8
    passkey_segment_tokens: int = 256
    edit_cases: int = 6
    edit_tokens: int = 4096
    edit_ratios: tuple[float, ...] = (0.05, 0.10)
    repeats: int = 3
    seed: int = 0
    dtype: str = "auto"

    def __post_init__(self) -> None:
        lo, hi = self.segment_tokens
        if not 16 <= lo <= hi:
            raise ValueError(f"segment_tokens must be 16 <= low <= high, got {self.segment_tokens}")
        if min(self.segment_counts, default=0) < 2:
            raise ValueError("segment_counts must be at least 2 (segments move only after the first)")
        if any(not 0.0 < r <= 1.0 for r in (*self.ratios, *self.edit_ratios, self.timing_ratio)):
            raise ValueError("ratios must be fractions in (0, 1]")
        if self.passkey_segment_tokens < 48:
            raise ValueError("passkey_segment_tokens must be at least 48 (the needle must fit)")
        if self.continuation < 4 or self.greedy_tokens < 1 or self.repeats < 1:
            raise ValueError("continuation >= 4, greedy_tokens >= 1 and repeats >= 1 are needed")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


@dataclass
class _Scored:
    """What the model does after a cache: log-probs of the scored positions ``[s, vocab]`` and greedy tokens."""

    logprobs: torch.Tensor
    greedy: list[int]


def _score(model: Any, kv: KVCache | None, tail: torch.Tensor, scored: int, greedy_tokens: int,
           skip: int = 0) -> _Scored:
    """Run the uncached ``tail`` after ``kv`` (``None``: from scratch); log-probs of rows ``skip..skip+scored-2``
    (predicting ``tail[skip+1 : skip+scored]``) and greedy tokens after the whole tail."""
    cache = kv.to_hf() if kv is not None else new_cache(model)
    logits = forward(model, tail[:-1], cache)
    return _Scored(logits[skip : skip + scored - 1].log_softmax(-1),
                   greedy(model, cache, int(tail[-1]), greedy_tokens))


def _compare(arm: _Scored, ref: _Scored, targets: torch.Tensor) -> dict[str, Any]:
    kl = (ref.logprobs.exp() * (ref.logprobs - arm.logprobs)).sum(-1).clamp_min(0)
    agree = next((i for i, (a, b) in enumerate(zip(arm.greedy, ref.greedy, strict=False)) if a != b),
                 min(len(arm.greedy), len(ref.greedy)))
    return {"kl": kl.tolist(), "top1": float((arm.logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean()),
            "ppl": float((-arm.logprobs.gather(1, targets[:, None]).mean()).exp()),
            "ppl_ref": float((-ref.logprobs.gather(1, targets[:, None]).mean()).exp()),
            "greedy": agree / max(1, len(ref.greedy))}


def _repaired(job: RepairJob, repair: Repair) -> KVCache:
    kv = KVCache.empty(job.kv.spec, job.kv.num_tokens)
    kv.data.copy_(job.kv.data)
    kv.token_ids = job.kv.token_ids
    repair.apply(kv)
    return kv


def _policies(ratio: float, per_segment: float) -> list[RepairPolicy]:
    """The arms at one recompute ratio: EPIC with ``k`` = that share of a segment, CacheBlend with one selection at
    layer 1 (as LMCache runs it) and with gradual filtering over 3 layers, query-aware."""
    return [Epic(k=max(1, round(ratio * per_segment))), Blend(ratio=ratio, layer=1),
            Blend(ratio=ratio, layer=1, checks=3), Prophet(ratio=ratio)]


def _label(policy: RepairPolicy) -> str:
    return "blend-gradual" if isinstance(policy, Blend) and policy.checks > 1 else policy.name


# ------------------------------------------------------------------------------------------------------- RAG
def _pools(tokenizer: Any) -> dict[str, list[torch.Tensor]]:
    """Token ids of the eval documents by kind (code, prose), each its first ``POOL_CHARS`` characters."""
    pools: dict[str, list[torch.Tensor]] = {"code": [], "prose": []}
    for doc in documents(16):
        pools[doc.kind].append(tokenizer(doc.text[:POOL_CHARS], add_special_tokens=False,
                                         return_tensors="pt").input_ids[0])
    return pools


def rag_case(tokenizer: Any, pools: dict[str, list[torch.Tensor]], kind: str, count: int, lengths: tuple[int, int],
             continuation: int, rng: random.Random) -> dict[str, Any]:
    """One RAG prompt: system, ``count`` segments, the continuation of segment ``j`` and the question (token ids)."""
    system = tokenizer(SYSTEM, return_tensors="pt").input_ids[0]
    question = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids[0]
    segments, sources = [], []
    for _ in range(count):
        d = rng.randrange(len(pools[kind]))
        ids = pools[kind][d]
        n = rng.randint(*lengths)
        start = rng.randrange(0, len(ids) - n - continuation)
        segments.append(ids[start : start + n])
        sources.append((d, start, n))
    j = rng.randrange(count)
    d, start, n = sources[j]
    cont = pools[kind][d][start + n : start + n + continuation]
    return {"kind": kind, "system": system, "segments": segments, "continued": j, "continuation": cont,
            "question": question}


def _moved(system: torch.Tensor, segments: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    bounds, at = [], len(system)
    for s in segments:
        bounds.append((at, at + len(s)))
        at += len(s)
    return torch.arange(len(system), at, dtype=torch.int64), tuple(bounds)


def _segment_arms(model: Any, tokenizer: Any, spec: Any, system: torch.Tensor, segments: list[torch.Tensor],
                  tail: torch.Tensor, scored: int, arms: list[tuple[str, float, RepairPolicy]],
                  greedy_tokens: int) -> tuple[_Scored, list[tuple[str, float, RepairPolicy, Repair, _Scored]]]:
    """The full-recompute reference and every arm's result on one segmented prompt (segments computed once)."""
    kv_full, _ = prefill(model, spec, torch.cat([system, *segments]), step=512)
    ref = _score(model, kv_full, tail, scored, greedy_tokens)
    del kv_full
    with ContextCache(model, tokenizer, store=MemoryStore(), codec="raw", spec=spec, loader=EXACT) as cc:
        _, base, _, _ = cc.segments.assemble(Prompt([system, *segments, Segment(tail, cache=False)], repair="none"))
    assert base is not None
    candidates, bounds = _moved(system, segments)
    job = RepairJob(model=model, kv=base, candidates=candidates, segments=bounds, query=tail)
    out = []
    for label, ratio, policy in arms:
        repair = policy.repair(job)
        out.append((label, ratio, policy, repair, _score(model, _repaired(job, repair), tail, scored, greedy_tokens)))
    return ref, out


def _rag_arms(config: ReuseConfig, per_segment: float) -> list[tuple[str, float, RepairPolicy]]:
    arms: list[tuple[str, float, RepairPolicy]] = [("none", 0.0, NoRepair())]
    for r in config.ratios:
        arms += [(_label(p), r, p) for p in _policies(r, per_segment)]
    return arms


def run_rag(model: Any, tokenizer: Any, spec: Any, config: ReuseConfig, say: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(config.seed)
    pools = _pools(tokenizer)
    per_arm: dict[tuple[str, float], list[dict[str, Any]]] = {}
    cases = []
    for c in range(config.cases):
        kind = KINDS[c % 2]
        count = config.segment_counts[(c // 2) % len(config.segment_counts)]
        case = rag_case(tokenizer, pools, kind, count, config.segment_tokens, config.continuation, rng)
        tail = torch.cat([case["continuation"], case["question"]])
        moved = sum(len(s) for s in case["segments"])
        t0 = time.perf_counter()
        ref, results = _segment_arms(model, tokenizer, spec, case["system"], case["segments"], tail,
                                     len(case["continuation"]), _rag_arms(config, moved / count),
                                     config.greedy_tokens)
        targets = case["continuation"][1:]
        for label, ratio, policy, repair, scored in results:
            row = _compare(scored, ref, targets) | {"recomputed": repair.recomputed.numel() / moved,
                                                    "compute": repair.token_layers / (moved * spec.num_layers),
                                                    "params": policy.params(),
                                                    "kind": kind}
            per_arm.setdefault((label, ratio), []).append(row)
        cases.append({"kind": kind, "segments": count, "tokens": [len(s) for s in case["segments"]],
                      "continued": case["continued"], "seconds": time.perf_counter() - t0})
        say(f"rag case {c + 1}/{config.cases} ({kind}, {count} segments, {moved} tokens) in "
            f"{time.perf_counter() - t0:.0f} s")
    rows = [_summarize(label, ratio, results) for (label, ratio), results in per_arm.items()]
    rows.append({"policy": "full", "ratio": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0, "greedy": 1.0,
                 "recomputed": 1.0, "compute": 1.0, "ppl": rows[0]["ppl_ref"], "ppl_ref": rows[0]["ppl_ref"],
                 "ppl_increase_pct": 0.0,
                 "kl_mean_code": 0.0, "kl_mean_prose": 0.0, "params": {}})
    return {"cases": cases, "rows": rows}


def _summarize(label: str, ratio: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases (p99 over every scored position of every case)."""
    kls = torch.tensor([k for r in results for k in r["kl"]])
    ppl, ref = statistics.mean(r["ppl"] for r in results), statistics.mean(r["ppl_ref"] for r in results)
    row = {"policy": label, "ratio": ratio, "params": results[0]["params"],
           "kl_mean": statistics.mean(statistics.mean(r["kl"]) for r in results),
           "kl_p99": float(kls.quantile(0.99)) if kls.numel() else 0.0,
           "top1": statistics.mean(r["top1"] for r in results), "greedy": statistics.mean(r["greedy"] for r in results),
           "ppl": ppl, "ppl_ref": ref, "ppl_increase_pct": 100.0 * (ppl / ref - 1.0),
           "recomputed": statistics.mean(r["recomputed"] for r in results),
           "compute": statistics.mean(r["compute"] for r in results)}
    for kind in KINDS:
        mine = [statistics.mean(r["kl"]) for r in results if r["kind"] == kind]
        row[f"kl_mean_{kind}"] = statistics.mean(mine) if mine else None
    return row


# ------------------------------------------------------------------------------------------------- timing
def _seconds(s: float) -> float:
    return s


def _request(model: Any, cc: ContextCache, prompt: Prompt) -> float:
    """TTFT of one request: assemble from the store, run the uncached tail to the last prompt token's logits."""
    start = time.perf_counter()
    flat, kv, _, _ = cc.segments.assemble(prompt)
    with torch.no_grad():
        forward(model, flat[kv.num_tokens if kv is not None else 0 :], kv.to_hf() if kv is not None
                else new_cache(model))[-1]
    return time.perf_counter() - start


def run_rag_timing(model: Any, tokenizer: Any, spec: Any, config: ReuseConfig,
                   say: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(config.seed + 1)
    count, tokens = max(config.segment_counts), config.segment_tokens[1]
    case = rag_case(tokenizer, _pools(tokenizer), "code", count, (tokens, tokens), config.continuation,
                    rng)
    tail = torch.cat([case["continuation"], case["question"]])
    parts = [case["system"], *case["segments"], Segment(tail, cache=False)]
    arms: list[tuple[str, float, RepairPolicy]] = [("full", 1.0, FullRecompute()), ("none", 0.0, NoRepair())]
    arms += [(_label(p), config.timing_ratio, p) for p in _policies(config.timing_ratio, tokens)]
    rows: list[dict[str, Any]] = []
    with ContextCache(model, tokenizer, store=MemoryStore(), codec="raw", spec=spec, loader=EXACT) as cc:
        cc.prefill(Prompt(parts))
        cc.flush()
        for label, ratio, policy in arms:
            seconds = timed(partial(_request, model, cc, Prompt(parts, repair=policy)), _seconds, config.repeats)
            rows.append({"policy": label, "ratio": ratio, "params": policy.params(), "ttft_s": seconds})
            say(f"ttft {label} {ratio:.2f}: {seconds:.2f} s")
    full = rows[0]["ttft_s"]
    for row in rows:
        row["speedup"] = full / row["ttft_s"]
    return {"segments": count, "segment_tokens": tokens, "rows": rows,
            "prompt_tokens": len(case["system"]) + count * tokens + len(tail)}


# --------------------------------------------------------------------------------------------------- passkey
def run_passkey(model: Any, tokenizer: Any, spec: Any, config: ReuseConfig,
                say: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(config.seed + 2)
    n = config.passkey_segment_tokens
    filler_ids = tokenizer(passkey.FILLER * (n // 8 + 2), add_special_tokens=False, return_tensors="pt").input_ids[0]
    filler = filler_ids[:n]
    system = tokenizer(SYSTEM, return_tensors="pt").input_ids[0]
    question = tokenizer(passkey.QUESTION, add_special_tokens=False, return_tensors="pt").input_ids[0]
    r = config.timing_ratio
    arms: list[tuple[str, float, RepairPolicy]] = [("none", 0.0, NoRepair())]
    arms += [(_label(p), r, p) for p in _policies(r, n)]
    hits = {label: 0 for label, _, _ in arms} | {"full": 0}
    placed = []
    for t in range(config.passkey_trials):
        key = str(rng.randrange(10_000, 100_000))
        needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False,
                           return_tensors="pt").input_ids[0]
        at = rng.randrange(0, n - len(needle))
        keyed = torch.cat([filler[:at], needle, filler[at : n - len(needle)]])
        where = rng.randrange(config.passkey_segments)
        segments = [keyed if i == where else filler for i in range(config.passkey_segments)]
        ref, results = _segment_arms(model, tokenizer, spec, system, segments, question, 2, arms,
                                     passkey.ANSWER_TOKENS)
        found = {"full": key in tokenizer.decode(ref.greedy).replace(" ", "")}
        for label, _, _, _, scored in results:
            found[label] = key in tokenizer.decode(scored.greedy).replace(" ", "")
        for label, ok in found.items():
            hits[label] += ok
        placed.append({"segment": where, "offset": at, "found": found})
        say(f"passkey trial {t + 1}/{config.passkey_trials}: key in segment {where}: "
            + " ".join(f"{k}={int(v)}" for k, v in found.items()))
    trials = config.passkey_trials
    rows = [{"policy": label, "ratio": ratio, "accuracy": hits[label] / trials} for label, ratio, _ in arms]
    rows.append({"policy": "full", "ratio": 1.0, "accuracy": hits["full"] / trials})
    return {"trials": placed, "rows": rows, "segments": config.passkey_segments, "segment_tokens": n}


# ----------------------------------------------------------------------------------------------------- edits
#: Eval documents per kind that edit cases are drawn from (the eval split holds 14 prose documents).
EDIT_POOL = 14


def _long_documents(tokenizer: Any, kind: str, count: int, tokens: int) -> list[Document]:
    """The first ``count`` eval documents of ``kind`` (in :func:`documents`' order) with at least ``tokens`` tokens:
    an edit case needs its ``edit_tokens`` plus a continuation after them."""
    pool = [d for d in documents(2 * EDIT_POOL) if d.kind == kind]
    chosen = [d for d in pool if len(tokenizer(d.text, add_special_tokens=False).input_ids) >= tokens][:count]
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} of the {len(pool)} {kind} eval documents have {tokens} tokens, "
                         f"{count} edit cases need them: ask for fewer --edit-cases or --edit-tokens")
    return chosen


def _lines_upto(tokenizer: Any, doc: Document, tokens: int) -> tuple[list[str], list[str]]:
    """``doc``'s lines split where the first ``tokens`` tokens end (by whole lines), and the lines after."""
    lines = doc.text.splitlines(keepends=True)
    total = 0
    for k, line in enumerate(lines):
        total += len(tokenizer(line, add_special_tokens=False).input_ids)
        if total >= tokens:
            return lines[: k + 1], lines[k + 1 :]
    raise ValueError(f"{doc.name} has fewer than {tokens} tokens")


def edit_lines(lines: list[str], rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """Insert, delete or replace 1-10 lines at a random line (inserted lines: copies of other lines of the file)."""
    op, count = rng.choice(("insert", "delete", "replace")), rng.randint(1, min(10, len(lines) - 2))
    at = rng.randrange(1, len(lines) - count)
    pick = [lines[rng.randrange(len(lines))] for _ in range(count)]
    new = {"insert": lines[:at] + pick + lines[at:], "delete": lines[:at] + lines[at + count :],
           "replace": lines[:at] + pick + lines[at + count :]}[op]
    return new, {"op": op, "lines": count, "at_line": at, "of_lines": len(lines)}


def _edit_arms(ratios: tuple[float, ...]) -> list[tuple[str, float, RepairPolicy]]:
    arms: list[tuple[str, float, RepairPolicy]] = [("prefix-only", 1.0, FullRecompute()), ("pie", 0.0, NoRepair())]
    for r in ratios:
        arms += [("pie+blend", r, Blend(ratio=r, layer=1)), ("pie+prophet", r, Prophet(ratio=r))]
    return arms


def _edit_case(tokenizer: Any, doc: Document, tokens: int, continuation: int,
               rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    head, rest = _lines_upto(tokenizer, doc, tokens)
    new_lines, info = edit_lines(head, rng)
    old = tokenizer("".join(head), return_tensors="pt").input_ids[0]
    new = tokenizer("".join(new_lines), return_tensors="pt").input_ids[0]
    cont = tokenizer("".join(rest), add_special_tokens=False, return_tensors="pt").input_ids[0][:continuation]
    return old, new, cont, info | {"document": doc.name, "kind": doc.kind, "old_tokens": len(old),
                                   "new_tokens": len(new)}


def run_edits(model: Any, tokenizer: Any, spec: Any, config: ReuseConfig,
              say: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(config.seed + 3)
    code, prose = (_long_documents(tokenizer, kind, (config.edit_cases + 1 - i) // 2,
                                   config.edit_tokens + 2 * config.continuation) for i, kind in enumerate(KINDS))
    arms = _edit_arms(config.edit_ratios)
    per_arm: dict[tuple[str, float], list[dict[str, Any]]] = {}
    cases, timing = [], None
    for c in range(config.edit_cases):
        doc = (code, prose)[c % 2][c // 2]
        old, new, cont, info = _edit_case(tokenizer, doc, config.edit_tokens, config.continuation, rng)
        t0 = time.perf_counter()
        kv_full, _ = prefill(model, spec, new, step=512)
        ref = _score(model, kv_full, cont, len(cont), config.greedy_tokens)
        del kv_full
        name = f"{doc.name}#{c}"
        with ContextCache(model, tokenizer, store=MemoryStore(), codec="raw", spec=spec, loader=EXACT,
                          chunk_tokens=EDIT_CHUNK) as cc:
            cc.prefill(Prompt([Segment(old, doc=name)]))
            cc.flush()
            for label, ratio, policy in arms:
                prompt = Prompt([Segment(new, doc=name), Segment(cont, cache=False)], repair=policy)
                flat, kv, stats, _ = cc.segments.assemble(prompt)
                start = kv.num_tokens if kv is not None else 0  # prefix-only: the rest of the document runs too
                scored = _score(model, kv, flat[start:], len(cont), config.greedy_tokens, skip=len(new) - start)
                whole = label == "prefix-only"  # every token from the first changed chunk, at every layer
                recomputed = (len(new) - stats.tokens_hit) if whole else stats.tokens_recomputed
                layers = recomputed * spec.num_layers if whole else stats.token_layers_recomputed
                row = _compare(scored, ref, cont[1:]) | {"recomputed": recomputed / len(new), "params": policy.params(),
                                                         "compute": layers / (len(new) * spec.num_layers),
                                                         "kind": doc.kind}
                per_arm.setdefault((label, ratio), []).append(row)
            if c == 0:
                timing = _edit_timing(model, cc, name, new, cont, arms, config.repeats, say)
        cases.append(info | {"seconds": time.perf_counter() - t0})
        say(f"edit case {c + 1}/{config.edit_cases} ({info['op']} {info['lines']} lines at line {info['at_line']} of "
            f"{info['of_lines']}, {len(new)} tokens) in {time.perf_counter() - t0:.0f} s")
    rows = [_summarize(label, ratio, results) for (label, ratio), results in per_arm.items()]
    return {"cases": cases, "rows": rows, "timing": timing}


def _edit_timing(model: Any, cc: ContextCache, name: str, new: torch.Tensor, cont: torch.Tensor,
                 arms: list[tuple[str, float, RepairPolicy]], repeats: int,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """TTFT on the first edit case: full recompute (a plain prefill, no store) and every arm's request path."""
    flat = torch.cat([new, cont])

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            forward(model, flat, new_cache(model))[-1]
        return time.perf_counter() - start

    rows: list[dict[str, Any]] = [{"policy": "full", "ratio": 1.0, "ttft_s": timed(plain, _seconds, repeats)}]
    for label, ratio, policy in arms:
        prompt = Prompt([Segment(new, doc=name), Segment(cont, cache=False)], repair=policy)
        rows.append({"policy": label, "ratio": ratio, "ttft_s": timed(partial(_request, model, cc, prompt), _seconds,
                                                                       repeats)})
        say(f"edit ttft {label} {ratio:.2f}: {rows[-1]['ttft_s']:.2f} s")
    for row in rows:
        row["speedup"] = rows[0]["ttft_s"] / row["ttft_s"]
    return {"tokens": len(new), "rows": rows}


# ---------------------------------------------------------------------------------------------------- driver
def _probe_dtypes(name: str) -> tuple[Any, Any, dict[str, float]]:
    """Load the model in bfloat16 and float32, time a 256-token prefill in each (after a 32-token warm-up);
    returns the faster model, its tokenizer and both times."""
    from kvpack import models
    from kvpack.spec import ModelSpec

    ids = torch.arange(1000, 1256)
    times, loaded = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = models.load(name, dtype=dtype)
        spec = ModelSpec.from_model(model, tokenizer)
        prefill(model, spec, ids[:32])
        start = time.perf_counter()
        prefill(model, spec, ids)
        times[str(dtype).removeprefix("torch.")] = time.perf_counter() - start
        loaded[str(dtype).removeprefix("torch.")] = (model, tokenizer)
    best = min(times, key=lambda k: times[k])
    return (*loaded[best], times)


def run(name: str, config: ReuseConfig, say: Callable[[str], None], command: str,
        parts: tuple[str, ...] = ("rag", "timing", "edits", "passkey"),
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every part of the benchmark; the JSON document (also the input of :func:`markdown` and :func:`plot`).
    ``checkpoint(doc)`` is called after each part with the document so far (the parts done). ``resume``: the
    document of an earlier run of the same model and config that stopped part-way; its parts are kept, the others
    run in its dtype, and the document records this run under ``resumed`` (command, parts, load, minutes)."""
    from kvpack import models
    from kvpack.spec import ModelSpec

    runners = {"rag": run_rag, "timing": run_rag_timing, "passkey": run_passkey, "edits": run_edits}
    unknown = [p for p in parts if p not in runners]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; parts are {', '.join(runners)}")
    started = time.time()
    load_start = os.getloadavg()
    if resume is not None:
        _check_resumable(resume, name, config)
        model, tokenizer = models.load(name, dtype=getattr(torch, resume["dtype"]))
        out = dict(resume)
        todo = [p for p in parts if p not in resume.get("parts_done", [])]
        record: dict[str, Any] = {"command": command, "parts": todo, "load_average_start": list(load_start)}
        out["resumed"] = [*resume.get("resumed", []), record]
        minutes_before = float(resume["minutes"])
    else:
        if config.dtype == "auto":
            model, tokenizer, probe = _probe_dtypes(name)
        else:
            model, tokenizer = models.load(name, dtype=getattr(torch, config.dtype))
            probe = {}
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        out = {"command": command, "model": name, "dtype": dtype, "dtype_probe_256_tokens_s": probe,
               "machine": machine(), "config": asdict(config), "load_average_start": list(load_start)}
        todo, record, minutes_before = list(parts), out, 0.0
    spec = ModelSpec.from_model(model, tokenizer)
    say(f"model {name} in {out['dtype']}; parts to run: {', '.join(todo) or 'none'}")
    for part in todo:
        out[part] = runners[part](model, tokenizer, spec, config, say)
        record["load_average_end"], record["minutes"] = list(os.getloadavg()), (time.time() - started) / 60
        out["minutes"] = minutes_before + record["minutes"]
        out["parts_done"] = [p for p in runners if p in out]
        out["targets"] = targets(out)
        if checkpoint is not None:
            checkpoint(out)
    return out


def _check_resumable(doc: dict[str, Any], name: str, config: ReuseConfig) -> None:
    """ValueError unless ``doc`` is a run of model ``name`` under exactly ``config``."""
    same = json.loads(json.dumps(asdict(config))) == json.loads(json.dumps(doc.get("config")))
    if doc.get("model") != name or not same or "dtype" not in doc or "minutes" not in doc:
        raise ValueError(f"cannot resume: that run was of {doc.get('model')!r} with config {doc.get('config')}; "
                         f"this one is of {name!r} with {asdict(config)} (give the same options)")


#: The policy arms at each ratio, by label (:func:`_policies`).
POLICIES = ("epic", "blend", "blend-gradual", "prophet")


def _row(rows: list[dict[str, Any]], policy: str, ratio: float) -> dict[str, Any] | None:
    return next((r for r in rows if r["policy"] == policy and abs(r["ratio"] - ratio) < 1e-9), None)


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the numbers it is judged on (``met``: True/False, None if not measured)."""
    out: dict[str, Any] = {}
    r15 = doc["config"]["timing_ratio"]
    if "rag" in doc:
        rows = doc["rag"]["rows"]
        none = _row(rows, "none", 0.0)
        assert none is not None
        gaps = {p: 1.0 - r["kl_mean"] / none["kl_mean"] for p in POLICIES
                if (r := _row(rows, p, r15)) is not None and none["kl_mean"] > 0}
        best = max(gaps, key=lambda p: gaps[p]) if gaps else None
        out["kl_gap_closed_at_15"] = {"gap_closed": gaps, "best": best,
                                      "met": None if best is None else gaps[best] >= 0.8}
        beats = {}
        for ratio in doc["config"]["ratios"]:
            kls = {p: r["kl_mean"] for p in POLICIES if (r := _row(rows, p, ratio))}
            beats[str(ratio)] = kls
        wins = [min(k, key=lambda p: k[p]) for k in beats.values() if k]
        out["best_beats_epic_and_blend"] = {"kl_mean_by_ratio": beats, "winner_by_ratio": wins,
                                            "met": bool(wins) and all(w == "prophet" for w in wins)}
    if doc.get("timing"):
        t = doc["timing"]
        speed = {r["policy"]: r["speedup"] for r in t["rows"]}
        best = out.get("kl_gap_closed_at_15", {}).get("best") or "blend"
        out["ttft_speedup_at_15"] = {"segments": t["segments"], "segment_tokens": t["segment_tokens"],
                                     "speedup": speed, "met": speed.get(best, 0.0) >= 3.0, "policy": best}
    if doc.get("passkey"):
        acc = {r["policy"]: r["accuracy"] for r in doc["passkey"]["rows"]}
        one = 1.0 / doc["config"]["passkey_trials"]
        # "equal to full recompute within one trial": a policy that retrieves more keys than full recompute (the
        # model's own misses vary with the prompt) loses nothing, so it counts; ``equal_within_one`` is the strict
        # reading, reported beside it.
        out["passkey_at_15"] = {"accuracy": acc,
                                "met_by": [p for p in POLICIES if p in acc and acc[p] >= acc["full"] - one - 1e-9],
                                "equal_within_one": [p for p in POLICIES if p in acc
                                                     and abs(acc[p] - acc["full"]) <= one + 1e-9]}
        out["passkey_at_15"]["met"] = bool(out["passkey_at_15"]["met_by"])
    if doc.get("edits"):
        rows = doc["edits"]["rows"]
        ok = [r for r in rows if r["policy"] != "prefix-only" and r["recomputed"] <= 0.10]
        best = min(ok, key=lambda r: r["ppl_increase_pct"]) if ok else None
        timing = doc["edits"].get("timing") or {"rows": [], "tokens": 0}
        speed = {f"{r['policy']} {r['ratio']:.2f}": r["speedup"] for r in timing["rows"]}
        out["edits"] = {"best_at_most_10pct": None if best is None else
                        {"policy": best["policy"], "ratio": best["ratio"], "ppl_increase_pct": best["ppl_increase_pct"],
                         "recomputed": best["recomputed"]},
                        "ttft_tokens": timing["tokens"], "speedup": speed,
                        "met": best is not None and best["ppl_increase_pct"] <= 1.0
                        and speed.get(f"{best['policy']} {best['ratio']:.2f}", 0.0) >= 5.0}
    return out



def markdown(doc: dict[str, Any], command: str, plot_name: str | None) -> str:
    """The results page, rendered from the JSON document ``doc`` by ``command``."""
    c = doc["config"]
    probe = ", ".join(f"{k} {v:.1f} s" for k, v in doc["dtype_probe_256_tokens_s"].items())
    lines = [f"# Reuse at new positions and edits: `kvpack bench reuse` on {doc['model']}", "",
             f"Produced by `{doc['command']}` ({doc['minutes']:.0f} min; {doc['machine']}; load average "
             f"{', '.join(f'{x:.1f}' for x in doc['load_average_start'])} at the start, "
             f"{', '.join(f'{x:.1f}' for x in doc['load_average_end'])} at the end); this page rendered from "
             f"docs/results/reuse.json by `{command}`. Protocol: `kvpack.bench.reuse` (module docstring). Model dtype "
             f"{doc['dtype']} for every arm"
             + (f" (the faster on a 256-token prefill: {probe})" if probe else "") + ".", ""]
    for r in doc.get("resumed", []):
        lines += [f"Parts {', '.join(r['parts'])} by `{r['command']}`, resuming that run"
                  + (f" ({r['minutes']:.0f} min; load average "
                     f"{', '.join(f'{x:.1f}' for x in r['load_average_start'])} at the start, "
                     f"{', '.join(f'{x:.1f}' for x in r['load_average_end'])} at the end)" if "minutes" in r else "")
                  + ".", ""]
    if plot_name:
        lines += [f"![KL against recompute ratio]({plot_name})", ""]
    if "rag" in doc:
        counts = sorted({x["segments"] for x in doc["rag"]["cases"]})
        lines += [f"## RAG: {len(doc['rag']['cases'])} cases of {' and '.join(map(str, counts))} segments of "
                  f"{c['segment_tokens'][0]}-{c['segment_tokens'][1]} tokens (half code, half prose)", "",
                  "Against full recompute, means over the cases; KL p99 over every scored position; `recomputed` "
                  "is the share of the moved tokens recomputed at every layer, `compute` the (token, layer) pairs "
                  "recomputed over those of recomputing every moved token (CacheBlend's arms recompute every moved "
                  "token in layers 0-1 first).", "",
                  "| policy | ratio | recomputed | compute | KL mean | KL p99 | KL code | KL prose | top-1 "
                  "| ppl (full) | Δppl % | greedy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["rag"]["rows"]:
            lines.append(f"| {r['policy']} | {r['ratio']:.2f} | {r['recomputed']:.3f} | "
                         f"{fmt(r.get('compute'), '.3f')} | {r['kl_mean']:.4f} | "
                         f"{r['kl_p99']:.3f} | {fmt(r['kl_mean_code'], '.4f')} | {fmt(r['kl_mean_prose'], '.4f')} | "
                         f"{r['top1']:.3f} | {r['ppl']:.2f} ({r['ppl_ref']:.2f}) | {r['ppl_increase_pct']:+.2f} | "
                         f"{r['greedy']:.2f} |")
        lines.append("")
    if doc.get("timing"):
        t = doc["timing"]
        lines += [f"## TTFT: {t['segments']} x {t['segment_tokens']} tokens ({t['prompt_tokens']} prompt tokens)", "",
                  f"One warm-up, {c['repeats']} timed runs, lower median; request path from a memory store (raw).",
                  "", "| policy | ratio | TTFT s | speedup vs full |", "|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['ratio']:.2f} | {r['ttft_s']:.2f} | {r['speedup']:.2f}x |" for r in t["rows"]]
        lines.append("")
    if doc.get("passkey"):
        p = doc["passkey"]
        lines += [f"## Passkey across segments: {len(p['trials'])} trials, key in one of {p['segments']} segments of "
                  f"{p['segment_tokens']} tokens", "", "| policy | ratio | accuracy |", "|---|---|---|"]
        lines += [f"| {r['policy']} | {r['ratio']:.2f} | {r['accuracy']:.2f} |" for r in p["rows"]]
        lines.append("")
    if doc.get("edits"):
        e = doc["edits"]
        lines += [f"## Edits: {len(e['cases'])} documents of about {c['edit_tokens']} tokens (half code, half prose)",
                  "", "Continuation perplexity after the edited document, against full recompute of the edited "
                  "version; `recomputed`: share of the document's tokens recomputed (prefix-only: every token from "
                  "the first stored chunk that differs).", "",
                  "| arm | ratio | recomputed | KL mean | top-1 | ppl (full) | Δppl % | greedy |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            lines.append(f"| {r['policy']} | {r['ratio']:.2f} | {r['recomputed']:.3f} | {r['kl_mean']:.4f} | "
                         f"{r['top1']:.3f} | {r['ppl']:.2f} ({r['ppl_ref']:.2f}) | {r['ppl_increase_pct']:+.2f} | "
                         f"{r['greedy']:.2f} |")
        lines += ["", "Cases: " + "; ".join(f"{x['document']} {x['op']} {x['lines']} lines at line {x['at_line']}/"
                                            f"{x['of_lines']}" for x in e["cases"]), ""]
        if e.get("timing"):
            lines += [f"TTFT on the first case ({e['timing']['tokens']} tokens), same protocol:", "",
                      "| arm | ratio | TTFT s | speedup vs full |", "|---|---|---|---|"]
            lines += [f"| {r['policy']} | {r['ratio']:.2f} | {r['ttft_s']:.2f} | {r['speedup']:.2f}x |"
                      for r in e["timing"]["rows"]]
            lines.append("")
    lines += ["## Targets (issue 13)", "", "| target | measured here | met |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {_met(met)} |" for name, measured, met in _target_rows(doc["targets"])]
    return "\n".join([*lines, ""])


def _met(met: bool | None) -> str:
    return "not measured" if met is None else ("yes" if met else "**no**")


def _by_policy(values: dict[str, float], template: str) -> str:
    """Each policy's value formatted by ``template``, e.g. ``"blend 82%, prophet 91%"`` for ``"{:.0%}"``."""
    return ", ".join(f"{p} {template.format(v)}" for p, v in values.items())


def _target_rows(t: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """One line per target of the issue: its wording, the numbers it is judged on, met or not."""
    rows = []
    if "kl_gap_closed_at_15" in t:
        g = t["kl_gap_closed_at_15"]
        rows.append(("a policy at 15% closes >= 80% of the KL gap none -> full",
                     _by_policy(g["gap_closed"], "{:.0%}"), g["met"]))
    if "best_beats_epic_and_blend" in t:
        b = t["best_beats_epic_and_blend"]
        rows.append(("the best policy (prophet) beats EPIC and CacheBlend at equal ratio",
                     "lowest KL per ratio: " + ", ".join(f"{r}: {w}" for r, w in
                                                         zip(b["kl_mean_by_ratio"], b["winner_by_ratio"],
                                                             strict=False)), b["met"]))
    if "ttft_speedup_at_15" in t:
        s = t["ttft_speedup_at_15"]
        rows.append((f"TTFT >= 3x below full ({s['segments']} x {s['segment_tokens']} tokens here, 8 x 512 in the "
                     "issue)", _by_policy(s["speedup"], "{:.2f}x"), s["met"]))
    if "passkey_at_15" in t:
        k = t["passkey_at_15"]
        strict = k.get("equal_within_one")
        rows.append(("passkey at 15% equal to full within one trial (read: no more than one trial below full)",
                     _by_policy(k["accuracy"], "{:.2f}")
                     + ("" if strict is None else f"; strictly equal within one trial: {', '.join(strict) or 'none'}"),
                     k["met"]))
    if "edits" in t:
        e = t["edits"]
        best = e["best_at_most_10pct"]
        rows.append((f"edits: ppl within +1% at <= 10% recompute, TTFT >= 5x below full ({e['ttft_tokens']} tokens "
                     "here, 4K in the issue)",
                     ("no arm recomputed <= 10%; " if best is None else f"{best['policy']} {best['ratio']:.2f}: "
                      f"{best['ppl_increase_pct']:+.2f}% at {best['recomputed']:.1%} recomputed; ")
                     + _by_policy(e["speedup"], "{:.2f}x"), e["met"]))
    return rows


def plot(doc: dict[str, Any], path: Path) -> None:
    """KL mean against recompute ratio per policy (RAG cases)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = doc["rag"]["rows"]
    none = _row(rows, "none", 0.0)
    assert none is not None
    for policy in POLICIES:
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["ratio"])
        if not mine:
            continue
        ax.plot([0.0] + [r["ratio"] for r in mine], [none["kl_mean"]] + [r["kl_mean"] for r in mine], marker="o",
                label=policy)
    ax.set_xlabel("recompute ratio (of the moved tokens)")
    ax.set_ylabel("KL(full || policy), mean")
    ax.set_title(f"kvpack bench reuse: {len(doc['rag']['cases'])} RAG cases, {doc['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict[str, Any], json_path: Path | None, markdown_path: Path | None, plot_path: Path | None,
          render_command: str) -> None:
    if json_path:
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
    if plot_path and "rag" in doc:
        plot(doc, plot_path)
    if markdown_path:
        markdown_path.write_text(markdown(doc, render_command, plot_path.name if plot_path else None))
