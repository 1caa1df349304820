"""`kvpack bench vllm` without vLLM: its settings, the worker's job format, the rows made from what the vLLM processes
report (medians, p95, hit rates), and the page and plot rendered from the JSON. tests/test_vllm.py runs it in vLLM."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvpack import cli
from kvpack.bench import vllm
from kvpack.bench.vllm_job import ServingJob, TtftPrompt, WorkerJob
from kvpack.errors import CodecError


class ByteTokenizer:
    """A stand-in tokenizer: one id per UTF-8 byte."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}


@pytest.mark.parametrize("bad, match", [
    ({"settings": ("raw", "raw")}, "repeat"),
    ({"serving_settings": ("fp8",), "settings": ("raw",)}, "must be one of the settings"),
    ({"store_bytes": 0}, "store_bytes"),
    ({"dtype": "float16"}, "dtype"),
    ({"alpha": -1.0}, "alpha"),
    ({"repeats": 0}, "repeats"),
    ({"concurrency": 0}, "concurrency"),
    ({"lengths": (0,)}, "lengths"),
    ({"lengths": (), "serving_settings": ()}, "nothing to measure"),
    ({"settings": ("kivi:bits",)}, "NAME or NAME:k=v"),
])
def test_config_refuses_what_it_cannot_run(bad: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vllm.VllmBenchConfig(**bad)


def test_settings_are_built_before_any_vllm_process() -> None:
    assert vllm.check_settings(["raw", "kivi:bits=4"]) == {"raw": "raw", "kivi:bits=4": "kivi bits=4"}
    with pytest.raises(CodecError, match="profile"):
        vllm.check_settings(["transform"])  # a calibrated codec needs its profile


def test_worker_job_round_trips_through_json_and_refuses_prompts_beyond_the_window() -> None:
    serving = ServingJob([[1, 2, 3], [4, 5]], [0, 1, 1], concurrency=2, max_tokens=4)
    job = WorkerJob("/ckpt", "float32", 16, 1, {"store": "file:///s", "codec": "raw"}, [TtftPrompt(8, [7] * 9)],
                    repeats=2, serving=serving)
    assert WorkerJob.from_json(job.to_json()) == job
    with pytest.raises(ValueError, match="max_model_len"):
        WorkerJob("/ckpt", "float32", 9, 1, None, [TtftPrompt(8, [7] * 9)])  # 9 prompt tokens + 1 generated
    with pytest.raises(ValueError, match="indexes prompts"):
        ServingJob([[1]], [1], concurrency=1, max_tokens=1)


def test_prompts_are_corpus_contexts_plus_the_question_cut_to_the_window() -> None:
    tok = ByteTokenizer()
    question = len(tok(vllm.QUESTION)["input_ids"])
    short, long = vllm.prompts(tok, [100, 500], window=300)
    assert len(short.ids) == 100 + question and short.ids[-question:] == tok(vllm.QUESTION)["input_ids"]
    assert len(long.ids) == 300 - 1 and long.length == 500  # room left for one generated token
    assert long.ids[:100] == short.ids[:100]  # the same corpus text, longer


def _run(kind: str, ttft: float, cached: int, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "ttft_s": ttft, "vllm_ttft_s": ttft * 0.99, "cached_tokens": cached, "save_s": 0.1,
            "output_tokens": 1, "latency_s": ttft, "prompt_tokens": 1037} | extra


def test_ttft_rows_report_medians_of_cold_and_warm_and_check_every_hit() -> None:
    runs = [_run("cold", 3.0, 0, stored_bytes=400), _run("warm", 0.3, 1024), _run("cold", 2.0, 0, stored_bytes=400),
            _run("warm", 0.2, 1024), _run("cold", 9.0, 0, stored_bytes=400), _run("warm", 0.25, 1024)]
    result = {"ttft": [{"length": 1024, "prompt_tokens": 1037, "runs": runs, "load_average": [1.0, 1.0, 1.0]}],
              "page_bytes_per_token": 1}
    (row,) = vllm.ttft_rows("lossless", "lossless", result, {1024: 1024})
    assert row["cold_s"] == 3.0 and row["warm_s"] == 0.25 and row["warm_over_cold"] == pytest.approx(0.25 / 3)
    assert row["loadable_tokens"] == 1024 and row["hits_as_expected"]
    assert row["ratio"] == pytest.approx(1024 / 400)  # four full chunks of one byte per token, in 400 bytes
    runs[1]["cached_tokens"] = 768  # one warm request loaded less: flagged
    assert not vllm.ttft_rows("lossless", "lossless", result, {})[0]["hits_as_expected"]
    baseline = {"ttft": [{"length": 1024, "prompt_tokens": 1037, "runs": [_run("cold", 2.5, 0)],
                          "load_average": [1.0, 1.0, 1.0]}]}
    (row,) = vllm.ttft_rows(vllm.BASELINE, None, baseline, {})
    assert row["cold_s"] == 2.5 and row["warm_s"] is None and row["save_s"] is None


def test_serving_row_counts_hits_and_takes_mean_and_nearest_rank_p95() -> None:
    ttfts = [float(i) for i in range(1, 21)]
    cached = [0] * 5 + [512] * 5 + [1024] * 10  # prompts of 1037 tokens: 1024 loadable
    requests = [_run("serving", t, c, output_tokens=16) for t, c in zip(ttfts, cached, strict=True)]
    row = vllm.serving_row("lossless", "lossless", {"requests": requests, "wall_s": 10.0,
                                                    "load_average": [1.0, 1.0, 1.0]})
    assert row["ttft_mean_s"] == statistics.fmean(ttfts) and row["ttft_p95_s"] == 19.0
    assert row["hit_rate"] == 0.5 and row["partial_hit_rate"] == 0.25
    assert row["requests_per_s"] == 2.0 and row["output_tokens_per_s"] == 32.0
    assert row["tokens_loaded_fraction"] == pytest.approx((5 * 512 + 10 * 1024) / (20 * 1037))


def _doc(ratio: float) -> dict[str, Any]:
    config = vllm.VllmBenchConfig(settings=("lossless",), lengths=(4096,), requests=20)
    rows = [{"arm": arm, "setting": setting, "length": 4096, "context_tokens": 4096, "prompt_tokens": 4109,
             "loadable_tokens": 4096, "cold_s": 10.0, "warm_s": None if setting is None else 10.0 * ratio,
             "warm_over_cold": None if setting is None else ratio, "save_s": None, "stored_bytes": None,
             "ratio": None, "hits_as_expected": True} for arm, setting in ((vllm.BASELINE, None),
                                                                          ("lossless", "lossless"))]
    serving = [{"arm": arm, "setting": setting, "requests": 20, "ttft_mean_s": 2.0, "ttft_p95_s": 4.0,
                "latency_mean_s": 3.0, "requests_per_s": 0.5, "output_tokens_per_s": 8.0, "hit_rate": hit,
                "partial_hit_rate": 0.0, "tokens_loaded_fraction": hit} for arm, setting, hit in
               ((vllm.BASELINE, None, 0.0), ("lossless", "lossless", 0.8))]
    arms = [{"arm": a, "setting": s, "wall_s": 100.0, "startup_s": 20.0, "threads": 2, "error": None,
             "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2.0, 1.0, 1.0]}
            for a, s in ((vllm.BASELINE, None), ("lossless", "lossless"))]
    return {"rows": rows, "serving": serving, "arms": arms, "config": asdict(config), "machine": "test CPU",
            "checkpoint": "/x/smollm2-135m", "window": 8192, "question_tokens": 13,
            "load_average_start": [1.0, 1.0, 1.0], "load_average_end": [2.0, 1.0, 1.0],
            "command": "kvpack bench vllm --lengths 4096"}


@pytest.mark.parametrize("ratio, verdict", [(0.1, "met"), (0.5, "missed")])
def test_page_states_the_target_and_renders_from_json(ratio: float, verdict: str, tmp_path: Path) -> None:
    doc = _doc(ratio)
    target = vllm.target(doc)
    assert target is not None and target["met"] is (verdict == "met")
    (tmp_path / "v.json").write_text(json.dumps(doc))
    md, png = tmp_path / "v.md", tmp_path / "v.png"
    result = CliRunner().invoke(cli.app, ["bench", "vllm", "--render", str(tmp_path / "v.json"), "--markdown",
                                          str(md), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    page = md.read_text()
    assert f"**{verdict}**" in page and "Produced by `kvpack bench vllm --lengths 4096`" in page
    assert "enable_prefix_caching=False" in page and "| lossless | 20 | 2.000 | 4.000 |" in page
    assert png.stat().st_size > 0


def test_cli_refuses_bad_options_before_starting_vllm(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["bench", "vllm", "--serving-setting", "fp8", "--setting", "raw",
                                          "--venv", str(tmp_path)])
    assert result.exit_code == 2 and "must be one of the settings" in result.output
    result = CliRunner().invoke(cli.app, ["bench", "vllm", "--setting", "raw", "--serving-setting", "raw", "--venv",
                                          str(tmp_path)])
    assert result.exit_code == 2 and "make vllm-venv" in result.output


def test_under_a_store_budget_the_page_compares_transform_hit_rate_with_raw(tmp_path: Path) -> None:
    doc = _doc(0.1)
    assert vllm.budget_comparison(doc) is None  # no budget
    doc["config"]["store_bytes"] = 256 * 2**20
    assert vllm.budget_comparison(doc) is None  # no raw and transform serving arms
    doc["serving"] += [doc["serving"][1] | {"arm": arm, "setting": setting, "hit_rate": hit, "ttft_mean_s": ttft,
                                            "stored_bytes": stored}
                       for arm, setting, hit, ttft, stored in (("raw", "raw", 0.2, 5.0, 250e6),
                                                               ("transform 32x", "transform:profile=p", 0.7, 2.0, 9e6))]
    (arm,) = vllm.budget_comparison(doc)["arms"]  # type: ignore[index]
    assert arm["setting"] == "transform:profile=p" and arm["times_raw"] == pytest.approx(3.5)
    page = vllm.markdown(doc, "c", "r")
    assert "Under the 256 MiB store budget, transform 32x's hit rate is 0.70 against raw's 0.20 (3.5x" in page
    assert "| raw | 20 | 5.000 |" in page and "| 250.0 |" in page and "at most 256 MiB of entries" in page
