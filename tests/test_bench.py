"""Benchmark plumbing that needs no model: the emulated link store and the result pages."""

from __future__ import annotations

from pathlib import Path

import kvpack
from conftest import make_kv
from kvpack.bench import codecs as bench_codecs
from kvpack.bench import ttft
from kvpack.store import MemoryStore


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
