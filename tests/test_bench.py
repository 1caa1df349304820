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
from kvpack.bench.links import links_available
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
    seen: list[list[bytes | None]] = []
    link = ttft.LinkStore(inner, gbps=1000.0, on_read=seen.append)
    assert link.get_many(["k", "missing"]) == [data, None] and seen == [[data, None]]
    assert link.contains("k") and link.stats().hits == 1
    link.put("k2", data)
    assert inner.get("k2") == data
    link.set_rate(2000.0)
    assert link.gbps == 2000.0


def test_rate_drop_lowers_the_rate_once_after_a_quarter_and_restores_it() -> None:
    rates: list[float] = []
    drop = ttft.RateDrop(rates.append, high=10.0, low=1.0)
    drop.arrived([b"x"])  # not armed: ignored
    with drop.armed(after=2):
        drop.arrived([b"x", None])
        assert rates == [] and not drop.dropped
        drop.arrived([b"x"])
        drop.arrived([b"x"])
        assert rates == [1.0] and drop.dropped
    assert rates == [1.0, 10.0]
    with drop.armed(after=5):
        drop.arrived([b"x"])
    assert rates == [1.0, 10.0] and not drop.dropped  # never dropped: nothing to restore


def test_ttft_config_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="needs recompute"):
        ttft.TtftConfig(strategies=("load", "adaptive"))
    with pytest.raises(ValueError, match="strategies are some of"):
        ttft.TtftConfig(strategies=("cake",))
    with pytest.raises(ValueError, match="Gbit/s"):
        ttft.TtftConfig(links_gbps=(0.0,))
    assert ttft.TtftConfig(strategies=("recompute", "adaptive")).loads == ("adaptive",)


def _row(n: int, strategy: str, method: str, transport: str, ttft_s: float, **extra: Any) -> dict[str, Any]:
    row = {"context_tokens": n, "method": method, "strategy": strategy, "transport": transport, "ttft_s": ttft_s,
           "bytes_read": 10, "ratio": n / 1024, "machine": "test", "chunks_hit": 4, "chunks_loaded": 4,
           "chunks_computed": 0, "fetch_gbps": 0.8, "link": "tbf" if transport.startswith("link") else None,
           "runs": [{"ttft_s": ttft_s, "chunks_loaded": 4, "chunks_computed": 0}]}
    return row | extra


def test_ttft_page_and_plot(tmp_path: Path) -> None:
    rows = [{"context_tokens": n, "method": "recompute", "strategy": "recompute", "transport": "-",
             "ttft_s": n / 100, "bytes_read": 0, "ratio": None, "machine": "test", "dtype": "float32",
             "recompute_s": {"bfloat16": n / 50, "float32": n / 100}} for n in (1024, 2048)]
    for n in (1024, 2048):
        for t in ("disk", "link 10 Gbps"):
            rows += [_row(n, "load", "raw", t, 0.1), _row(n, "adaptive", "raw", t, 0.05, chunks_loaded=3,
                                                             chunks_computed=1)]
    rows.append(_row(1024, "adaptive", "raw", "link 10→1 Gbps", 0.2, drop_to_gbps=1.0, runs=[
        {"ttft_s": 0.2, "chunks_loaded": 3, "chunks_computed": 1, "dropped": True},
        {"ttft_s": 0.3, "chunks_loaded": 4, "chunks_computed": 0, "dropped": False}]))
    page = ttft.markdown(rows, tmp_path / "ttft.png", "kvpack bench ttft --repeats 2")
    assert "| 1024 | load | raw | 1.0x | 0.100 | 0.100 | - |" in page
    assert "| 2048 | adaptive | raw | 2.0x | 0.050 | 0.050 | - |" in page
    assert "| 1024 | raw | 3/1 | 3/1 | 4/0 |" in page  # chunks loaded / computed
    assert "| 1024 | link 10→1 Gbps | recompute | 10.240 | raw | 0.200 | 51.20x | - |" in page
    assert "| 1024 | disk | load raw | 0.100 | raw | 0.050 | 2.00x | 2.00x |" in page
    assert "| 1024 | adaptive | raw | link 10→1 Gbps | 0.200 0.300 | 1/2 | 1 0 | 0.200 |" in page
    assert "`kvpack bench ttft --repeats 2`" in page and "real" in page and "emulated" not in page
    assert "Previous protocol" not in page and "| 1024 | 20.48 | 10.24 | float32 |" in page
    ttft.plot(rows, tmp_path / "ttft.png")
    assert (tmp_path / "ttft.png").read_bytes()[:4] == b"\x89PNG"
    assert "Targets of issue 11:" in page and "| adaptive <= 1.05x the best fixed strategy in every cell |" in page
    ttft.render([{k: v for k, v in r.items() if k != "machine"} for r in rows], tmp_path / "again.md", None, "cmd")
    assert "Produced by `cmd` on" in (tmp_path / "again.md").read_text()  # a partial file gets this machine


def _tiny_models() -> tuple[Any, Any]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval(), LlamaForCausalLM(config).eval()


def test_ttft_times_every_arm_under_one_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, float32_model = _tiny_models()
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
    config = ttft.TtftConfig(lengths=(512,), links_gbps=(1.0,), repeats=2, emulate_links=True)
    rows = ttft.run(model, CharTokenizer(), ModelSpec.from_model(model), [kvpack.codecs.get("raw")], config,
                    json_path=tmp_path / "t.json", markdown_path=tmp_path / "t.md", float32_model=float32_model)
    assert json.loads((tmp_path / "t.json").read_text()) == rows
    (base,) = [r for r in rows if r["strategy"] == "recompute"]
    assert set(base["recompute_s"]) == {"bfloat16", "float32"}
    assert base["dtype"] in base["recompute_s"] and base["ttft_s"] == min(base["recompute_s"].values())
    loads = [r for r in rows if r["strategy"] != "recompute"]
    by = {(r["strategy"], r["transport"]): r for r in loads}
    transports = ("memory", "disk", "link 1 Gbps (emulated)", "link 10→1 Gbps (emulated)")
    assert set(by) == {(s, t) for s in ("load", "adaptive") for t in transports}
    for (strategy, transport), r in by.items():
        assert r["chunks_hit"] == 2 and r["ratio"] > 0.9
        if r["plan"]["recompute"]:  # the adaptive loader may prefill the whole prompt instead of loading
            assert strategy == "adaptive" and r["tokens_hit"] == 0 and r["chunks_loaded"] == 0
        else:
            assert r["tokens_hit"] == 512
            assert r["chunks_loaded"] + r["chunks_computed"] + len(r["failed_chunks"]) == 2
        assert r["plan"]["chunks"] == 2 and r["plan"]["compute_front"] in (True, False)
        assert len(r["runs"]) == 2 and all(set(run) >= {"ttft_s", "chunks_loaded", "chunks_computed"}
                                           for run in r["runs"])
        assert all(isinstance(r[k], float) for k in ("ttft_s", "load_s", "fetch_s", "decode_s", "compute_s"))
        if strategy == "load":  # loading only: nothing computed from the front
            assert r["chunks_loaded"] == 2 and not r["plan"]["compute_front"]
        if transport.startswith("link"):
            assert r["link"] == "emulated" and r["link_note"] == "emulated links were asked for"
        if "→" in transport:
            assert r["drop_to_gbps"] == 1.0 and all("dropped" in run for run in r["runs"])
    # one warm-up and `repeats` timed runs for every arm: each recompute dtype and each (strategy, transport)
    assert calls == {"torch.bfloat16": 3, "torch.float32": 3, "load": 3 * len(loads)}
    page = (tmp_path / "t.md").read_text()
    assert "Previous protocol" not in page and "| 512 | adaptive | raw |" in page
    assert "**emulated**" in page and "| bfloat16 | float32 | baseline |" in page
    with pytest.raises(ValueError, match=r"float32 recompute model is torch\.bfloat16"):
        ttft.run(model, CharTokenizer(), ModelSpec.from_model(model), [], config, float32_model=model)


@pytest.mark.redis
@pytest.mark.skipif(not links_available()[0], reason=f"shaped links unavailable: {links_available()[1]}")
def test_ttft_over_a_real_shaped_link(tmp_path: Path) -> None:
    model, float32_model = _tiny_models()
    config = ttft.TtftConfig(lengths=(512,), links_gbps=(1.0,), repeats=1, drop=True)
    rows = ttft.run(model, CharTokenizer(), ModelSpec.from_model(model), [kvpack.codecs.get("raw")], config,
                    float32_model=float32_model)
    links = [r for r in rows if r["transport"] in ("link 1 Gbps", "link 10→1 Gbps")]
    assert len(links) == 4 and all(r["link"] == "tbf" and r["chunks_hit"] == 2 for r in links)
    assert all(r["fetch_gbps"] is not None for r in links if r["chunks_loaded"])


def test_ttft_page_from_the_previous_protocol_says_to_regenerate() -> None:
    rows = [{"context_tokens": 1024, "method": "recompute", "transport": "-", "ttft_s": 9.0, "bytes_read": 0,
             "ratio": None, "machine": "test"},
            {"context_tokens": 1024, "method": "raw", "transport": "disk", "ttft_s": 0.1, "bytes_read": 10,
             "ratio": 1.0, "machine": "test"}]
    page = ttft.markdown(rows, None, "kvpack bench ttft --repeats 2")
    assert page.splitlines()[2].startswith("> **Previous protocol: regenerate this page with `kvpack bench ttft")
    assert "| 1024 | load | raw | 1.0x | 0.100 |" in page


def test_codecs_page_and_plot(tmp_path: Path) -> None:
    row = {"codec": "kivi", "params": {"bits": 2}, "ratio": 5.0, "bits_per_element": 3.2, "ppl_increase_pct": 1.5,
           "ppl_increase_pct_code": 1.0, "ppl_increase_pct_prose": 2.0, "kl_mean": 0.01, "kl_p99": 0.1,
           "top1_agreement": 0.95, "greedy_agreement": 0.5, "encode_MBps": 100.0, "decode_MBps": 200.0,
           "threads": 2, "prefix_tokens": 1536, "cont_tokens": 512, "documents": ["a", "b"], "machine": "test"}
    page = bench_codecs.markdown([row], "kvpack bench codecs", {"transform x": 1_000_000}, tmp_path / "p.png")
    assert "| kivi(bits=2) | 5.00 | 3.20 | +1.50 |" in page and "transform x: 1.00 MB" in page
    calibrated = row | {"codec": "transform", "params": {"preset": "32x"},
                        "profile": {"hash": "ab12cd34ef", "rounding": 0.35, "calibration_tokens": 6144}}
    grouped = calibrated | {"profile": {"hash": "98fe76dc", "rounding": 0.5, "calibration_tokens": 6128,
                                        "grouping": "layers:2"}}
    page = bench_codecs.markdown([row, calibrated, grouped], "kvpack bench codecs", {}, None)
    assert "| transform(preset=32x) [ab12cd34] | 5.00 |" in page
    assert "- `ab12cd34`: quantizer rounding 0.35, 6144 calibration tokens\n" in page  # rows from before: no groups
    assert "- `98fe76dc`: quantizer rounding 0.5, 6128 calibration tokens, PCA groups layers:2" in page
    bench_codecs.plot([row], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_codecs_page_passkey_cells() -> None:
    row = {"codec": "raw", "params": {}, "ratio": 1.0, "bits_per_element": 16.0, "ppl_increase_pct": 0.0,
           "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0, "greedy_agreement": 1.0, "encode_MBps": 1.0,
           "decode_MBps": 1.0, "threads": 2, "prefix_tokens": 8, "cont_tokens": 8, "documents": ["a"],
           "machine": "test"}
    older = row | {"passkey_accuracy": 0.75, "passkey_accuracy_reference": 0.8}  # rows from before the log-prob
    newer = older | {"passkey_key_logprob": -3.214, "passkey_key_logprob_reference": -1.5, "passkey_gained": 2,
                     "passkey_lost": 3}
    lines = bench_codecs.markdown([row, older, newer], "kvpack bench codecs", {}, None).splitlines()
    assert "| 1.00 | - | - | 1 | 1 |" in lines[-3]
    assert "| 0.75 (0.80) | - | 1 | 1 |" in lines[-2]
    assert "| 0.75 (0.80) +2/-3 | -3.21 (-1.50) | 1 | 1 |" in lines[-1]


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
    one, every = lossless["host_check_msym_per_s"]  # the host check ran in the rounds: plausible rates, on the page
    assert 1 < one < 1e5 and 1 < every < 1e5
    assert f"rANS encode {one:.0f} Msym/s on 1 thread" in speed.markdown(rows, "kvpack bench speed")


def test_speed_keeps_settings_under_different_profiles_apart(tmp_path: Path) -> None:
    from kvpack.bench import speed
    from kvpack.codecs.transform import Transform
    from kvpack.codecs.transform.calibrate import calibrate_from_caches
    from kvpack.eval.corpora import Document
    from test_calibrate import low_rank_caches

    caches = low_rank_caches()
    codecs = []
    for grouping in ("joint", "layers:3"):  # the same setting (preset 4x) under two profiles
        prof = calibrate_from_caches(caches, caches[0].spec, grouping=grouping, ratios=(2.0, 4.0), default_ratio=4.0,
                                     reference_tokens=256)
        codecs.append(Transform(profile=str(prof.save(tmp_path / f"{grouping}.kvprof")), preset="4x"))
    kv = low_rank_caches(n=1, tokens=300, seed=9)[0]
    rows = speed.run([(Document(name="d", kind="code", text=""), kv)], codecs, repeats=1, anchors=False,
                     defaults=False)
    assert {r["codec"] for r in rows} == {"transform"}  # no default settings
    mine = [r for r in rows if r["chunk_tokens"] is None]
    assert [r["setting"] for r in mine] == [f"transform preset=4x sinks=1 layers=1 [{c.calibration.hash[:8]}]"
                                            for c in codecs]
    for row, codec in zip(mine, codecs, strict=True):  # each row's bytes are its own profile's
        assert row["profile"] == {"hash": codec.calibration.hash}
        assert row["ratio"] == kv.fp16_bytes / len(codec.encode(kv))
        assert row["encode_gemm"] == str(codec.encode_dtype()).removeprefix("torch.")  # the precision it encoded in
        assert row["components"] == codec.allocation().info["components"] > 0  # the decode GEMM's inner dimension
        assert f"{row['setting']} encode GEMM in {row['encode_gemm']} ({row['components']} components)" in \
            speed.markdown(rows, "kvpack bench speed")


def test_cross_source_table_refuses_rows_without_sources(tmp_path: Path) -> None:
    from kvpack.bench import crosssource

    old = tmp_path / "old.json"
    old.write_text('{"rows": [{"codec": "raw"}], "profiles_bytes": {}}')
    with pytest.raises(ValueError, match="predates the cross-source protocol"):
        crosssource.load([old])


def test_lossless_context_sees_a_context_that_pays_and_projects_today_exactly(tmp_path: Path) -> None:
    from kvpack.bench import lossless_context
    from kvpack.eval.corpora import Document

    kv = make_kv(tokens=300, layers=1, head_dim=64)
    kv.data[..., 1::2, :] = kv.data[..., 0::2, :]  # every odd token repeats the one before: the previous token tells
    rows = lossless_context.run([(Document(name="d", kind="code", text=""), kv)], chunks=(256,),
                                json_path=tmp_path / "c.json")
    by = {r["context"]: r for r in rows}
    today, prev = by["today"], by["prev symbol"]
    assert prev["adaptive"] < today["adaptive"] - 0.5 and prev["code"] < today["code"] - 1
    assert today["static"] == today["code"] + today["tables"] and today["elements"] == kv.data.numel()
    assert 0.98 < by["mantissa bit 5"]["entropy"] <= 1.0  # random mantissas: nothing to gain
    written = sum(len(kvpack.codecs.get("lossless").encode(part)) for part in kv.chunks(256))
    assert today["actual"] < 8 * written / kv.data.numel()  # the sections, without container headers
    assert json.loads((tmp_path / "c.json").read_text())[0]["context"] == "today"
    assert "| 256 | prev symbol |" in lossless_context.markdown(rows, "kvpack bench lossless-context")


def test_transform_context_charges_today_as_coded_and_sees_a_context_that_pays(tmp_path: Path) -> None:
    from kvpack.bench import transform_context
    from kvpack.codecs.transform import Transform
    from kvpack.codecs.transform.calibrate import calibrate_from_caches
    from kvpack.eval.corpora import Document
    from kvpack.format import read_container
    from test_calibrate import low_rank_caches

    caches = low_rank_caches()
    prof = calibrate_from_caches(caches, caches[0].spec, ratios=(2.0, 4.0), default_ratio=4.0, reference_tokens=256)
    codec = Transform(profile=str(prof.save(tmp_path / "p.kvprof")), preset="4x")
    # every odd token repeats the one before it (pre-RoPE: a pair shares its position), so the previous token's
    # level predicts the next one's in the held-out fold too; scaled down, the levels fall within the contexts' 0-3
    pairs = torch.arange(300, dtype=torch.int64) // 2
    docs = [low_rank_caches(n=1, tokens=300, seed=s, positions=pairs)[0] for s in (11, 12, 13, 14)]
    for kv in docs:
        kv.data.mul_(0.1)
    rows = transform_context.run(codec, [(Document(name=f"d{i}", kind="code", text=""), kv)
                                         for i, kv in enumerate(docs)], chunks=(128,),
                                 json_path=tmp_path / "c.json")
    by = {r["model"]: r for r in rows}
    today = by["today"]
    coded = sum(len(read_container(codec.encode(part)).section("e0")) for kv in docs for part in kv.chunks(128))
    assert today["saving"] == 0 and today["projected_ratio"] == today["ratio_today"]
    # the ideal cost under the profile's tables is what the rANS section holds, up to lane states and flushes
    assert 0.98 * coded < today["bits_per_symbol"] * today["symbols"] / 8 < 1.02 * coded
    assert by["prev 4"]["saving"] > 0.1 and by["prev 4"]["projected_ratio"] > today["ratio_today"]
    assert by["per-chunk tables"]["table_bits_per_symbol"] > 0
    assert today["symbols"] == sum(codec.level_symbols(p).symbols.size for kv in docs for p in kv.chunks(128))
    assert json.loads((tmp_path / "c.json").read_text())[0]["model"] == "today"
    assert "| 128 | prev 4 x neighbour 4 | 20 |" in transform_context.markdown(rows, "kvpack bench transform-context")
    with pytest.raises(ValueError, match="at least 2 documents"):
        transform_context.run(codec, [(Document(name="d", kind="code", text=""), docs[0])])


def test_round_medians_time_every_function_once_per_round() -> None:
    from kvpack.bench.timing import round_medians

    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    assert len(round_medians(fns, 3)) == 2
    assert "".join(calls) == "ab" + "ab" * 3  # warm-ups, then rounds: never all runs of one function in a block
    calls.clear()
    round_medians(fns, 2, primed=True)
    assert "".join(calls) == "ab" + "aabb" * 2  # each timed run right after an untimed one of the same function
    with pytest.raises(ValueError, match="repeats"):
        round_medians(fns, 0)


def test_entropy_bench_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvpack bench entropy` on small streams: a row per case and thread count, a coded size at or above the
    entropy of the symbols under their tables and within a few percent of it, and the JSON it writes."""
    from kvpack.bench import entropy

    monkeypatch.setattr(entropy, "N_LANES", 8)
    monkeypatch.setattr(entropy, "REPEATS", 1)
    rows = entropy.run(tmp_path / "e.json")
    threads = sorted({r["threads"] for r in rows})
    assert [(r["case"], r["threads"]) for r in rows] == [(c[0], t) for c in entropy.CASES for t in threads]
    for r in rows:
        assert r["bits_per_symbol"] >= r["entropy_bits_per_symbol"] and 0 <= r["overhead_pct"] < 5, r
        assert r["encode_msym_per_s"] > 0 and r["decode_msym_per_s"] > 0
    assert json.loads((tmp_path / "e.json").read_text()) == rows
    symbols, starts, table, freqs = entropy.case_stream("laplace-a16")  # what bench speed's host check encodes
    assert symbols.size == starts[-1] == 8 * entropy.LANE_SYMBOLS and table.size == freqs.shape[0] == 8
