"""What one vLLM process of `kvpack bench vllm` runs (:class:`WorkerJob`), passed as JSON from the benchmark (kvpack's
venv) to :mod:`kvpack.bench.vllm_worker` (the vLLM venv). Plain data, no vLLM and no torch: both sides import it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TtftPrompt:
    """One context length of the cold/warm TTFT arm: ``ids`` is the whole prompt (the context, then a question)."""

    length: int
    ids: list[int]


@dataclass(frozen=True)
class ServingJob:
    """The serving run: request ``k`` asks ``prompts[trace[k]]``; ``concurrency`` requests in flight at once (a closed
    loop: a new one is submitted as soon as one finishes), each generating ``max_tokens`` tokens. ``salt`` is the
    cache salt of every request (it keeps these chunks apart from the TTFT arm's in the same store)."""

    prompts: list[list[int]]
    trace: list[int]
    concurrency: int
    max_tokens: int
    salt: str = "serving"

    def __post_init__(self) -> None:
        if not self.prompts or not self.trace:
            raise ValueError("the serving run needs prompts and a non-empty trace")
        if any(not 0 <= i < len(self.prompts) for i in self.trace):
            raise ValueError(f"the trace indexes prompts 0..{len(self.prompts) - 1}")
        if self.concurrency < 1 or self.max_tokens < 1:
            raise ValueError(f"concurrency and max_tokens must be at least 1, got {self.concurrency}, "
                             f"{self.max_tokens}")


@dataclass(frozen=True)
class WorkerJob:
    """One vLLM engine: its settings, the connector's (``connector`` is ``kv_connector_extra_config``; ``None`` runs
    vLLM without a connector), the TTFT prompts (``repeats`` timed cold and warm requests per length) and optionally
    the serving run. vLLM's own prefix cache is always off."""

    checkpoint: str
    dtype: str
    max_model_len: int
    kv_cache_gib: int
    connector: dict[str, Any] | None
    prompts: list[TtftPrompt] = field(default_factory=list)
    repeats: int = 3
    serving: ServingJob | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        needs = [len(p.ids) + 1 for p in self.prompts]  # the prompt and its one generated token
        if self.serving is not None:
            needs += [len(p) + self.serving.max_tokens for p in self.serving.prompts]
        if max(needs, default=0) > self.max_model_len:
            raise ValueError(f"a request needs {max(needs)} tokens, more than max_model_len {self.max_model_len}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerJob:
        data = json.loads(text)
        serving = data.pop("serving")
        prompts = [TtftPrompt(**p) for p in data.pop("prompts")]
        return cls(**data, prompts=prompts, serving=None if serving is None else ServingJob(**serving))
