"""Quality of a lossy KV codec on a real model, as BENCHMARKS.md defines it.

For each document: the KV cache of a prefix (default 1536 tokens) is encoded and decoded, then the continuation
(default 512 tokens) runs on the decoded cache and on the original one. Per document we compare:

- continuation perplexity (relative increase, %), next-token KL(p_original || p_decoded) (mean and 99th percentile
  over positions), top-1 agreement;
- greedy decoding of ``GREEDY_TOKENS`` tokens after the prefix: the fraction of them generated before the first
  disagreement with the original cache;
- optionally passkey retrieval (see :mod:`kvpack.eval.passkey`).

The original cache and reference logits of every document are computed once and reused for every codec setting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvpack import cpu
from kvpack.codecs.base import Codec
from kvpack.codecs.calibrated import CalibratedCodec
from kvpack.codecs.transform.codec import decode_precision, projection_dtype
from kvpack.eval.corpora import Document, protocol, source_order
from kvpack.inference import forward, greedy, prefill
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

GREEDY_TOKENS = 64


@dataclass
class Reference:
    """A document's original prefix cache and what the model does after it (computed once)."""

    document: Document
    kv: KVCache
    cont_ids: torch.Tensor
    logprobs: torch.Tensor  # [cont_tokens, vocab] float32 log-softmax after each continuation token
    greedy: list[int]


@dataclass
class DocumentResult:
    """One codec on one document."""

    document: str
    kind: str
    source: str
    fp16_bytes: int
    stored_bytes: int
    elements: int
    ppl_reference: float
    ppl: float
    kl: torch.Tensor  # [cont_tokens] per-position KL
    top1: float
    greedy_agreement: float
    encode_s: float
    decode_s: float

    @property
    def ppl_increase_pct(self) -> float:
        return 100.0 * (self.ppl / self.ppl_reference - 1.0)


def machine() -> str:
    """CPU model, core count and the precision of the transform codecs' projections (:func:`projection_dtype`:
    ``transform`` and ``kvtc`` results depend on it) for result tables."""
    gemm = str(projection_dtype()).removeprefix("torch.")
    if decode_precision() == "int8":
        gemm += " (decode: int8 for low-rate components)"
    return f"{cpu.model_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, transform GEMM {gemm}"


def tokenize(tokenizer: Any, doc: Document, prefix: int, cont: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix`` and ``cont`` token ids of ``doc``; :class:`ValueError` when it is too short."""
    ids = tokenizer(doc.text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < prefix + cont:
        raise ValueError(f"{doc.name} has {ids.numel()} tokens, fewer than prefix {prefix} + continuation {cont}")
    return ids[:prefix], ids[prefix : prefix + cont]


def reference(model: Any, tokenizer: Any, spec: ModelSpec, doc: Document, prefix: int, cont: int,
              on_progress: Callable[[int], None] | None = None, greedy_tokens: int = GREEDY_TOKENS) -> Reference:
    """Prefill ``doc``'s prefix and record the original continuation log-probs and ``greedy_tokens`` greedy tokens
    (every benchmark and ``kvpack eval`` keep the default; a check that reads no greedy agreement may ask for
    fewer: each is one single-token forward, the slowest step of an evaluation on a CPU)."""
    prefix_ids, cont_ids = tokenize(tokenizer, doc, prefix, cont)
    kv, _ = prefill(model, spec, prefix_ids, step=256, on_progress=on_progress)
    logprobs = forward(model, cont_ids, kv.to_hf()).log_softmax(-1)
    return Reference(document=doc, kv=kv, cont_ids=cont_ids, logprobs=logprobs,
                     greedy=greedy(model, kv.to_hf(), int(cont_ids[0]), greedy_tokens))


def perplexity(logprobs: torch.Tensor, cont_ids: torch.Tensor) -> float:
    """Perplexity of ``cont_ids[1:]`` under ``logprobs[:-1]`` (position i predicts token i+1)."""
    nll = -logprobs[:-1].gather(1, cont_ids[1:, None]).mean()
    return float(nll.exp())


def evaluate_document(model: Any, ref: Reference, codec: Codec) -> DocumentResult:
    """Encode ``ref``'s cache with ``codec``, decode it, and compare what the model does after it (greedy agreement
    over as many tokens as ``ref`` recorded)."""
    t0 = time.perf_counter()
    data = codec.encode(ref.kv)
    t1 = time.perf_counter()
    decoded = codec.decode(data, ref.kv.spec)
    t2 = time.perf_counter()
    logprobs = forward(model, ref.cont_ids, decoded.to_hf()).log_softmax(-1)
    kl = (ref.logprobs.exp() * (ref.logprobs - logprobs)).sum(-1).clamp_min(0)
    tokens = greedy(model, decoded.to_hf(), int(ref.cont_ids[0]), len(ref.greedy))
    agree = next((i for i, (a, b) in enumerate(zip(tokens, ref.greedy, strict=False)) if a != b),
                 min(len(tokens), len(ref.greedy)))
    return DocumentResult(
        document=ref.document.name, kind=ref.document.kind, source=ref.document.source,
        fp16_bytes=ref.kv.fp16_bytes, stored_bytes=len(data),
        elements=ref.kv.num_tokens * ref.kv.spec.elements_per_token,
        ppl_reference=perplexity(ref.logprobs, ref.cont_ids), ppl=perplexity(logprobs, ref.cont_ids), kl=kl,
        top1=float((logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean()),
        greedy_agreement=agree / max(len(ref.greedy), 1), encode_s=t1 - t0, decode_s=t2 - t1,
    )


#: What a row says about the profile of a calibrated codec besides its hash (what ``kvpack calibrate --option`` can
#: change), so that rows of one setting under different profiles can be told apart.
PROFILE_FACTS = ("rounding", "calibration_tokens", "grouping")


def summarize(codec: Codec, results: Sequence[DocumentResult], prefix: int, cont: int) -> dict[str, Any]:
    """The JSON row of one codec setting over all documents (means over documents; byte totals for ratios).

    ``sources``/``kinds`` are those of the documents, ``calibration_sources`` those the codec's profile records
    (``kvpack calibrate --sources``; None without), and ``protocol`` the setting they make (:func:`protocol`);
    ``profile``: the profile's hash and :data:`PROFILE_FACTS` (None for codecs without one).
    """
    fp16 = sum(r.fp16_bytes for r in results)
    stored = sum(r.stored_bytes for r in results)
    kl = torch.cat([r.kl for r in results])
    mean = lambda values: float(sum(values) / len(values))  # noqa: E731
    sources = source_order(r.source for r in results)
    calibrated_on = codec.calibration.meta.get("calibration_sources") if isinstance(codec, CalibratedCodec) else None
    profile = ({"hash": codec.calibration.hash, **{k: codec.calibration.meta.get(k) for k in PROFILE_FACTS}}
               if isinstance(codec, CalibratedCodec) else None)
    return {
        "codec": codec.name,
        "params": codec.params(),
        "codec_id": codec.codec_id,
        "ratio": fp16 / stored,
        "bits_per_element": 8 * stored / sum(r.elements for r in results),
        "stored_bytes": stored,
        "fp16_bytes": fp16,
        "ppl_increase_pct": mean([r.ppl_increase_pct for r in results]),
        "ppl_increase_pct_code": _kind_mean(results, "code"),
        "ppl_increase_pct_prose": _kind_mean(results, "prose"),
        "ppl_increase_pct_by_source": {s: mean([r.ppl_increase_pct for r in results if r.source == s])
                                       for s in sources},
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl.double(), 0.99)),
        "top1_agreement": mean([r.top1 for r in results]),
        "greedy_agreement": mean([r.greedy_agreement for r in results]),
        "encode_MBps": fp16 / 1e6 / sum(r.encode_s for r in results),
        "decode_MBps": fp16 / 1e6 / sum(r.decode_s for r in results),
        "threads": torch.get_num_threads(),
        "prefix_tokens": prefix,
        "cont_tokens": cont,
        "documents": [r.document for r in results],
        "sources": sources,
        "kinds": sorted({r.kind for r in results}),
        "calibration_sources": calibrated_on,
        "profile": profile,
        "protocol": protocol(calibrated_on, sources),
        "per_document": [
            {"document": r.document, "kind": r.kind, "source": r.source, "ratio": r.fp16_bytes / r.stored_bytes,
             "ppl_reference": r.ppl_reference, "ppl": r.ppl, "ppl_increase_pct": r.ppl_increase_pct,
             "kl_mean": float(r.kl.mean()), "top1_agreement": r.top1, "greedy_agreement": r.greedy_agreement}
            for r in results
        ],
    }


def _kind_mean(results: Sequence[DocumentResult], kind: str) -> float | None:
    values = [r.ppl_increase_pct for r in results if r.kind == kind]
    return float(sum(values) / len(values)) if values else None

