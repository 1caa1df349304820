"""Benchmark plumbing that needs no model: the emulated link store and the result pages."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpack
from conftest import make_kv
from kvpack.bench import codecs as bench_codecs
from kvpack.bench import ttft
from kvpack.context import ContextCache
from kvpack.spec import ModelSpec
from kvpack.store import MemoryStore

VOCAB = 64


class CharTokenizer:
    """Just enough of a tokenizer for the TTFT benchmark: one token id per character."""

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[3 + ord(c) % (VOCAB - 3) for c in text]]))


def test_link_store_serves_the_inner_bytes() -> None:
    inner = MemoryStore()
    data = kvpack.encode(make_kv(tokens=4))
    inner.put("k", data)
    link = ttft.LinkStore(inner, gbps=1000.0)
    assert link.get_many(["k", "missing"]) == [data, None]
    assert link.contains("k") and link.stats().hits == 1
    link.put("k2", data)
    assert inner.get("k2") == data


def test_ttft_page_and_plot(tmp_path: Path) -> None:
    rows = [{"context_tokens": n, "method": "recompute", "transport": "-", "ttft_s": n / 100, "bytes_read": 0,
             "ratio": None, "machine": "test"} for n in (1024, 2048)]
    rows += [{"context_tokens": n, "method": "raw", "transport": t, "ttft_s": 0.1, "bytes_read": 10,
              "ratio": n / 1024, "machine": "test"} for n in (1024, 2048) for t in ("disk", "link 10 Gbps")]
    page = ttft.markdown(rows, tmp_path / "ttft.png", "kvpack bench ttft --repeats 2")
    assert "| 1024 | raw | 1.0x | 0.100 | 0.100 |" in page and "| 2048 | raw | 2.0x | 0.100 | 0.100 |" in page
    assert "`kvpack bench ttft --repeats 2`" in page
    ttft.plot(rows, tmp_path / "ttft.png")
    assert (tmp_path / "ttft.png").read_bytes()[:4] == b"\x89PNG"


def test_ttft_times_every_arm_under_one_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    float32_model = LlamaForCausalLM(config).eval()
    calls: Counter[str] = Counter()
    recompute, generate = ttft._recompute_ttft, ContextCache.generate

    def counted_recompute(lm: Any, ids: torch.Tensor) -> float:
        calls[str(lm.dtype)] += 1
        return recompute(lm, ids)

    def counted_generate(self: ContextCache, *args: Any, **kwargs: Any) -> Any:
        calls["load"] += 1
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ttft, "_recompute_ttft", counted_recompute)
    monkeypatch.setattr(ContextCache, "generate", counted_generate)
    rows = ttft.run(model, CharTokenizer(), ModelSpec.from_model(model), [kvpack.codecs.get("raw")], [256],
                    repeats=2, json_path=tmp_path / "t.json", markdown_path=tmp_path / "t.md",
                    float32_model=float32_model)
    assert json.loads((tmp_path / "t.json").read_text()) == rows
    (base,) = [r for r in rows if r["method"] == "recompute"]
    assert set(base["recompute_s"]) == {"bfloat16", "float32"}
    assert base["dtype"] in base["recompute_s"] and base["ttft_s"] == min(base["recompute_s"].values())
    loads = [r for r in rows if r["method"] != "recompute"]
    assert loads and all(r["tokens_hit"] == 256 for r in loads)
    # one warm-up and `repeats` timed runs for every arm: each recompute dtype and each transport
    assert calls == {"torch.bfloat16": 3, "torch.float32": 3, "load": 3 * len(loads)}
    page = (tmp_path / "t.md").read_text()
    assert "Previous protocol" not in page and "| 256 |" in page and "| bfloat16 | float32 | baseline |" in page
    with pytest.raises(ValueError, match=r"float32 recompute model is torch\.bfloat16"):
        ttft.run(model, CharTokenizer(), ModelSpec.from_model(model), [], [256], float32_model=model)


def test_ttft_page_from_the_previous_protocol_says_to_regenerate() -> None:
    rows = [{"context_tokens": 1024, "method": "recompute", "transport": "-", "ttft_s": 9.0, "bytes_read": 0,
             "ratio": None, "machine": "test"},
            {"context_tokens": 1024, "method": "raw", "transport": "disk", "ttft_s": 0.1, "bytes_read": 10,
             "ratio": 1.0, "machine": "test"}]
    page = ttft.markdown(rows, None, "kvpack bench ttft --repeats 2")
    assert page.splitlines()[2].startswith("> **Previous protocol: regenerate this page with `kvpack bench ttft")


def test_codecs_page_and_plot(tmp_path: Path) -> None:
    row = {"codec": "kivi", "params": {"bits": 2}, "ratio": 5.0, "bits_per_element": 3.2, "ppl_increase_pct": 1.5,
           "ppl_increase_pct_code": 1.0, "ppl_increase_pct_prose": 2.0, "kl_mean": 0.01, "kl_p99": 0.1,
           "top1_agreement": 0.95, "greedy_agreement": 0.5, "encode_MBps": 100.0, "decode_MBps": 200.0,
           "threads": 2, "prefix_tokens": 1536, "cont_tokens": 512, "documents": ["a", "b"], "machine": "test"}
    page = bench_codecs.markdown([row], "kvpack bench codecs", {"transform x": 1_000_000}, tmp_path / "p.png")
    assert "| kivi(bits=2) | 5.00 | 3.20 | +1.50 |" in page and "transform x: 1.00 MB" in page
    bench_codecs.plot([row], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_speed_rows_count_every_byte(tmp_path: Path) -> None:
    from kvpack.bench import speed
    from kvpack.eval.corpora import Document

    kv = make_kv(tokens=300, dtype="bfloat16")
    doc = Document(name="d", kind="code", text="")
    rows = speed.run([(doc, kv)], [kvpack.codecs.get("zstd", level=3)], tmp_path / "s.json", repeats=1)
    by = {(r["setting"], r["chunk_tokens"]): r for r in rows}
    lossless = by[("lossless", None)]
    assert lossless["ratio"] == kv.fp16_bytes / len(kvpack.codecs.get("lossless").encode(kv))
    assert lossless["rel_rmse_k"] == 0.0 and lossless["rel_rmse_v"] == 0.0
    assert by[("lossless", 256)]["ratio"] < lossless["ratio"]  # two containers pay two headers
    assert by[("kivi bits=2", None)]["rel_rmse_k"] > 0 and ("zstd level=3", None) in by
    assert "| zipnn (bf16) | doc |" in speed.markdown(rows, "kvpack bench speed")
