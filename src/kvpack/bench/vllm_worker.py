"""The vLLM side of `kvpack bench vllm`: one engine, in this process, runs one
:class:`~kvpack.bench.vllm_job.WorkerJob`. It needs vLLM, so it runs only with the vLLM venv's python
(``make vllm-venv``); the benchmark starts it as::

    .venv-vllm/bin/python -m kvpack.bench.vllm_worker JOB.json OUT.json

(as a module: run as a file, its directory would shadow vLLM with :mod:`kvpack.bench.vllm`).

vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager (no TorchInductor compile), with its own prefix
cache off, so every token it does not compute came from kvpack's store. Every request, TTFT arm and serving run
alike, goes through :func:`serve`: requests are added to the engine and it is stepped until they finish; a request's
TTFT is the wall time from its ``add_request`` to the end of the step that returned its first token (vLLM's own
``first_token_latency`` is recorded beside it). TTFT arm, per prompt: one untimed cold and one untimed warm request
(first-call costs: numba's compile of the codec, allocations), then ``repeats`` times a cold request under a new cache
salt (the connector's keys cover the salt, so it misses) followed by a warm one under the same salt (it hits what the
cold one stored). Between requests the connector's background writer is flushed (:meth:`KvpackConnector.flush`), so
encoding never runs inside a timed request; the flush time is recorded as ``save_s``. OUT.json is rewritten after
each prompt, so a run that is stopped keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from kvpack.bench.vllm_job import WorkerJob

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported (in the functions below)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(engine: Any, requests: list[tuple[list[int], str | None]], concurrency: int,
          max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    """Run ``requests`` (prompt ids, cache salt) through ``engine`` (a ``LLMEngine``), at most ``concurrency`` in
    flight, a new one added as soon as one finishes; per request (in order) its TTFT and what vLLM reports, and the
    wall seconds of the whole run."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
    pending = deque(enumerate(requests))
    inflight: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = [{} for _ in requests]

    def fill() -> None:
        while pending and len(inflight) < concurrency:
            k, (ids, salt) = pending.popleft()
            rid = f"q{k}"
            inflight[rid] = {"index": k, "prompt_tokens": len(ids), "submit": time.perf_counter()}
            engine.add_request(rid, {"prompt_token_ids": ids} | ({"cache_salt": salt} if salt else {}), params)

    start = time.perf_counter()
    fill()
    while inflight:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = inflight.get(out.request_id)
            if record is None:
                continue
            tokens = len(out.outputs[0].token_ids) if out.outputs else 0
            if "ttft_s" not in record and tokens:
                record["ttft_s"] = now - record["submit"]
            if out.finished:
                record.update(latency_s=now - record.pop("submit"), output_tokens=tokens,
                              cached_tokens=int(out.num_cached_tokens or 0),
                              vllm_ttft_s=getattr(out.metrics, "first_token_latency", None))
                records[record.pop("index")] = record
                del inflight[out.request_id]
        fill()
    return records, time.perf_counter() - start


class Worker:
    """The engine of one job and its connector's worker side (``None`` without a connector)."""

    def __init__(self, job: WorkerJob) -> None:
        import torch
        from vllm import LLM
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        import kvpack.integrations.vllm  # noqa: F401  its import lets vLLM's CPU worker start with numba loaded

        self.job = job
        kwargs: dict[str, Any] = {}
        if job.connector is not None:
            kwargs["kv_transfer_config"] = {
                "kv_connector": "KvpackConnector", "kv_connector_module_path": "kvpack.integrations.vllm",
                "kv_role": "kv_both", "kv_connector_extra_config": job.connector}
        started = time.perf_counter()
        self.llm = LLM(model=job.checkpoint, dtype=job.dtype, max_model_len=job.max_model_len, enforce_eager=True,
                       seed=0, enable_prefix_caching=False, disable_log_stats=False, **kwargs)
        self.startup_s = time.perf_counter() - started
        self.engine = self.llm.llm_engine
        self.connector = get_kv_transfer_group() if has_kv_transfer_group() else None
        if job.connector is not None and not hasattr(self.connector, "flush"):
            raise RuntimeError("the connector's worker side is not in this process (in-process vLLM is needed)")
        self.page_bytes_per_token: int | None = None
        if self.connector is not None:
            spec = self.connector.spec
            self.page_bytes_per_token = spec.elements_per_token * torch.empty(0, dtype=spec.torch_dtype).element_size()
        self.threads = torch.get_num_threads()
        store = (job.connector or {}).get("store", "")
        self.store_dir = Path(store.removeprefix("file://").partition("?")[0]) if store.startswith("file:///") else None

    def flush(self) -> float:
        """Wait for the connector's pending saves; the seconds waited."""
        started = time.perf_counter()
        if self.connector is not None:
            self.connector.flush()
        return time.perf_counter() - started

    def stored_bytes(self) -> int | None:
        if self.store_dir is None:
            return None
        return sum(p.stat().st_size for p in (self.store_dir / "objects").glob("*/*"))

    def one(self, ids: list[int], salt: str | None) -> dict[str, Any]:
        """One request alone, one generated token; flushed after, ``save_s`` the flush."""
        (record,), _ = serve(self.engine, [(ids, salt)], concurrency=1, max_tokens=1)
        return record | {"save_s": self.flush()}

    def ttft(self, length: int, ids: list[int]) -> dict[str, Any]:
        """The TTFT arm of one prompt (module docstring)."""
        salt = (lambda name: name) if self.connector is not None else (lambda name: None)
        self.one(ids, salt(f"warmup-{length}"))
        if self.connector is not None:
            self.one(ids, salt(f"warmup-{length}"))
        runs = []
        for k in range(self.job.repeats):
            before = self.stored_bytes()
            cold = self.one(ids, salt(f"cold-{length}-{k}"))
            after = self.stored_bytes()
            runs.append(cold | {"kind": "cold", "stored_bytes": None if after is None or before is None
                                else after - before})
            if self.connector is not None:
                runs.append(self.one(ids, salt(f"cold-{length}-{k}")) | {"kind": "warm"})
        return {"length": length, "prompt_tokens": len(ids), "runs": runs, "load_average": list(os.getloadavg())}


def main(argv: list[str]) -> None:
    job_path, out_path = (Path(a) for a in argv)
    job = WorkerJob.from_json(job_path.read_text())
    out: dict[str, Any] = {"load_average_start": list(os.getloadavg()), "ttft": [], "serving": None}
    worker = Worker(job)
    out |= {"startup_s": worker.startup_s, "threads": worker.threads,
            "page_bytes_per_token": worker.page_bytes_per_token}

    def save() -> None:
        out["load_average_end"] = list(os.getloadavg())
        out_path.write_text(json.dumps(out, indent=1))

    for prompt in job.prompts:
        out["ttft"].append(worker.ttft(prompt.length, prompt.ids))
        save()
    if job.serving is not None:
        serving = job.serving
        if not job.prompts:  # first-call costs outside the timed run
            worker.one(serving.prompts[0], "serving-warmup" if worker.connector is not None else None)
        salt = serving.salt if worker.connector is not None else None
        records, wall = serve(worker.engine, [(serving.prompts[i], salt) for i in serving.trace],
                              serving.concurrency, serving.max_tokens)
        out["serving"] = {"requests": [r | {"context": i} for r, i in zip(records, serving.trace, strict=True)],
                          "wall_s": wall, "save_s": worker.flush(), "stored_bytes": worker.stored_bytes(),
                          "load_average": list(os.getloadavg())}
        save()
    save()
    del worker
    gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
