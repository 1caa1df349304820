"""`kvpack bench gpu`: the GPU decoders' speed and the time to first token they give a Llama-3.1-8B-shaped model.

The prepared script for a machine with an NVIDIA GPU (docs/gpu.md). The model is built from a Llama-3.1-8B
configuration (32 layers, hidden 4096, 32 query heads, 8 KV heads of 128, MLP 14336, vocabulary 128256) with random
bfloat16 weights: the time of a forward pass and of decoding does not depend on the weight values, only on the
shapes (the compression ratios, which depend on the KV's statistics, are therefore not representative and are
recorded only to size the transfers). For each context length (8K and 32K tokens):

- ``recompute``: prefill of the whole context (logits of the last token only), the TTFT without kvpack;
- decode: the context's KV cache (from that prefill) is encoded on the CPU in chunks of ``chunk_tokens`` with each
  codec; decoding every chunk from host memory into one CUDA cache (``kvpack.gpu``: parse and checks on the CPU,
  sections copied to the device, kernels) is timed, and reported as GB/s of fp16 KV;
- TTFT when loading: the chunks arrive over a link (host memory: no transfer; emulated 10 and 25 Gbps links: chunk
  ``i`` arrives after ``bytes * 8 / rate`` seconds more), each chunk is decoded when it has arrived and the
  previous one is decoded (measured per chunk), then one forward step of the first new token on the loaded cache
  (measured). The links are emulated, not real: transfer times are computed from the bytes.

Every timing: one untimed warm-up call, then ``repeats`` timed calls, median, with the device synchronized. The
``transform`` codec is not included: its profile is a PCA basis of the whole-token KV vector (65,536 features for
this shape), which is not calibrated here. ``--tiny --device cpu`` runs a small configuration under Triton's
interpreter so the script itself is tested on machines without a GPU (its numbers mean nothing).
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch

from kvpack.errors import KvpackError
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec, RopeSpec

NOTE = ("random bfloat16 weights: the speed of a forward pass and of decoding does not depend on weight values, only "
        "on shapes; compression ratios of this KV are not representative")
#: Codecs measured (transform is left out: see the module docstring).
CODECS = ("raw", "zstd", "lossless", "fp8", "kivi", "cachegen")


class GpuBenchError(KvpackError):
    """The GPU benchmark cannot run here (no CUDA device, or a configuration it cannot measure)."""


@dataclass(frozen=True)
class GpuBenchConfig:
    """What `kvpack bench gpu` measures. Defaults: Llama-3.1-8B's shape, 8K and 32K tokens, every GPU codec."""

    device: str = "cuda"
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 128256
    contexts: tuple[int, ...] = (8192, 32768)
    chunk_tokens: int = 1024
    codecs: tuple[str, ...] = CODECS
    links_gbps: tuple[float, ...] = (10.0, 25.0)
    repeats: int = 5
    seed: int = 0
    name: str = "Llama-3.1-8B shape, random bf16 weights"

    def __post_init__(self) -> None:
        for attr in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "chunk_tokens", "repeats"):
            if not isinstance(getattr(self, attr), int) or getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be a positive int, got {getattr(self, attr)!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, and heads of kv_heads")
        if not self.contexts or any(not isinstance(n, int) or n < 1 for n in self.contexts):
            raise ValueError(f"contexts must be positive token counts, got {self.contexts!r}")
        unknown = set(self.codecs) - set(CODECS)
        if unknown:
            raise ValueError(f"codecs {sorted(unknown)} are not measured here; choose from {CODECS}")
        if any(g <= 0 for g in self.links_gbps):
            raise ValueError("link rates must be positive Gbps")
        if torch.device(self.device).type not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device!r}")

    @classmethod
    def tiny(cls, device: str = "cpu") -> GpuBenchConfig:
        """A configuration small enough for Triton's interpreter on a CPU (checks the script, measures nothing)."""
        return cls(device=device, layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256,
                   contexts=(8,), chunk_tokens=4, codecs=("raw", "zstd", "lossless"), links_gbps=(10.0,),
                   repeats=1, name="tiny Llama shape, random weights (script check under the interpreter)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def check_device(config: GpuBenchConfig) -> torch.device:
    """The device to run on; :class:`GpuBenchError` without CUDA (unless ``cpu``: then the interpreter is selected,
    which must happen before :mod:`kvpack.gpu` is imported)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GpuBenchError("kvpack bench gpu needs an NVIDIA GPU with CUDA, and torch.cuda.is_available() is False "
                            "here; run it on a GPU machine (or `kvpack bench gpu --tiny --device cpu` to check the "
                            "script under Triton's interpreter, which measures nothing)")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device


def build_model(config: GpuBenchConfig, device: torch.device) -> tuple[Any, ModelSpec]:
    """A Llama causal LM of the configured shape with random bfloat16 weights on ``device``, and its spec."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=config.hidden, intermediate_size=config.intermediate,
                     num_hidden_layers=config.layers, num_attention_heads=config.heads,
                     num_key_value_heads=config.kv_heads, vocab_size=config.vocab,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                     max_position_embeddings=max(config.contexts) + 16)
    torch.manual_seed(config.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf).eval()
    finally:
        torch.set_default_dtype(previous)
    digest = hashlib.sha256(repr(asdict(config)).encode()).hexdigest()  # not the weights: 16 GB to hash
    spec = ModelSpec(num_layers=config.layers, num_kv_heads=config.kv_heads, head_dim=config.head_dim,
                     dtype="bfloat16", rope=RopeSpec(theta=500000.0), sliding_windows=(None,) * config.layers,
                     fingerprint=digest, name=config.name)
    return model, spec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed warm-up, the device synchronized around each."""
    call()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill(model: Any, spec: ModelSpec, ids: torch.Tensor) -> tuple[Any, KVCache]:
    """The context's transformers cache (on the model's device) and a CPU copy as a :class:`KVCache`."""
    from kvpack.inference import new_cache

    cache = new_cache(model)
    model(ids[None], cache=cache, use_cache=True, logits_to_keep=1)
    kv = KVCache.from_hf(cache, spec, token_ids=ids.cpu())
    return cache, KVCache(spec=spec, data=kv.data.cpu(), positions=kv.positions, token_ids=kv.token_ids)


def pipeline_seconds(decode_s: list[float], chunk_bytes: list[int], gbps: float | None) -> float:
    """When the last chunk is decoded: chunk ``i`` arrives once the link has carried chunks ``0..i`` (at once from
    host memory, ``gbps=None``), and is decoded after it arrives and after chunk ``i - 1`` is decoded."""
    arrived = done = 0.0
    for seconds, size in zip(decode_s, chunk_bytes, strict=True):
        arrived += 0.0 if gbps is None else size * 8 / (gbps * 1e9)
        done = max(done, arrived) + seconds
    return done


def _codec(name: str, kv: KVCache, workdir: str) -> Any:
    from kvpack import codecs

    if name != "cachegen":
        return codecs.get(name)
    from kvpack.codecs.cachegen.calibrate import build_profile_from_caches

    path = build_profile_from_caches([kv]).save(workdir)  # calibrated on the KV it then encodes (random weights)
    return codecs.get("cachegen", profile=str(path))


@dataclass
class Result:
    """The JSON document `kvpack bench gpu` writes."""

    config: dict[str, Any]
    machine: dict[str, Any]
    note: str = NOTE
    decode: list[dict[str, Any]] = field(default_factory=list)
    ttft: list[dict[str, Any]] = field(default_factory=list)


def _machine(device: torch.device) -> dict[str, Any]:
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (Triton interpreter on the CPU)"
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}


def run(config: GpuBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure as the module docstring says; returns the JSON-able result."""
    import tempfile

    device = check_device(config)
    model, spec = build_model(config, device)
    result = Result(config=asdict(config), machine=_machine(device))
    gen = torch.Generator().manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as workdir:
        for n in config.contexts:
            ids = torch.randint(0, config.vocab, (n,), generator=gen).to(device)
            _measure_context(config, model, spec, ids, device, workdir, result, log)
    return asdict(result)


def _measure_context(config: GpuBenchConfig, model: Any, spec: ModelSpec, ids: torch.Tensor, device: torch.device,
                     workdir: str, result: Result, log: Callable[[str], None]) -> None:
    """The recompute arm, then every codec's decode rate and TTFT arms, at one context length."""
    from kvpack import gpu

    n = ids.numel()
    recompute = timed(lambda: model(ids[None], logits_to_keep=1), device, config.repeats)
    cache, kv = prefill(model, spec, ids)
    step = timed(partial(_first_token, model, cache, n), device, config.repeats)
    result.ttft.append({"tokens": n, "arm": "recompute", "link": None, "ttft_s": recompute})
    log(f"{n} tokens: recompute {recompute * 1e3:.1f} ms, first-token step {step * 1e3:.1f} ms")
    bounds = list(range(0, n, config.chunk_tokens))
    target = KVCache.empty(spec, n, device=device)
    for name in config.codecs:
        codec = _codec(name, kv, workdir)
        blobs = [codec.encode(kv[a : a + config.chunk_tokens]) for a in bounds]
        per_chunk = []
        for a, blob in zip(bounds, blobs, strict=True):
            out = target[a : a + config.chunk_tokens]
            per_chunk.append(timed(partial(gpu.decode, blob, spec, device=device, codec=codec, out=out), device,
                                   config.repeats))
        stored = sum(len(b) for b in blobs)
        total = sum(per_chunk)
        result.decode.append({"tokens": n, "codec": name, "stored_bytes": stored, "ratio": kv.fp16_bytes / stored,
                              "decode_s": total, "decode_gbps": kv.fp16_bytes / total / 1e9})
        log(f"  {name}: ratio {kv.fp16_bytes / stored:.2f}, decode {kv.fp16_bytes / total / 1e9:.2f} GB/s")
        for gbps in (None, *config.links_gbps):
            ttft = pipeline_seconds(per_chunk, [len(b) for b in blobs], gbps) + step
            link = "host memory" if gbps is None else f"{gbps:g} Gbps (emulated)"
            result.ttft.append({"tokens": n, "arm": name, "link": link, "ttft_s": ttft,
                                "vs_recompute": recompute / ttft})


@torch.no_grad()
def _first_token(model: Any, cache: Any, n: int) -> None:
    """One forward step of a new token on a copy of the loaded cache (the cache itself is left as it was)."""
    from kvpack.inference import new_cache

    fresh = new_cache(model)
    for i, layer in enumerate(cache.layers):
        fresh.update(layer.keys, layer.values, i)
    token = torch.zeros(1, 1, dtype=torch.int64, device=layer.keys.device)
    model(token, cache=fresh, use_cache=True, position_ids=torch.full_like(token, n))


def with_contexts(config: GpuBenchConfig, contexts: tuple[int, ...] | None) -> GpuBenchConfig:
    """``config`` with other context lengths (CLI ``--contexts``)."""
    return config if contexts is None else replace(config, contexts=contexts)
