"""kvpack's connector inside vLLM (CPU backend, in-process), through the integration venv that `make vllm-venv` builds.

Every run is a new process (tests/vllm_run.py), so vLLM's own prefix cache starts empty. Cold run: nothing is hit, the
prompt's full chunks are stored. Warm run: the loadable chunks are hit and the greedy output is token for token the
cold one, with raw and with lossless chunks. Valid entries with other K/V: the output changes, so the loaded K/V is
what the model attends to. Corrupted entries: misses, recomputed, the cold output. Six vLLM runs in all, and two
more for `kvpack bench vllm` at its smallest (without and with the connector). Skipped, with the reason, only where
the venv could not be built.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import PROSE
from kvpack import codecs
from kvpack.format import verify

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
PYTHON = VENV / "bin" / "python"
MODEL = VENV / "models" / "smollm2-135m"
RUN = Path(__file__).with_name("vllm_run.py")
CHUNK = 256


def _not_built() -> str | None:
    if (VENV / ".kvpack-installed").is_file() and PYTHON.is_file() and (MODEL / "config.json").is_file():
        return None
    log = ROOT / ".venv-vllm.log"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    return ("the vLLM integration venv is not built: run `make test-vllm` (builds it and runs this test)"
            + (f"; its last attempt ended with: {tail[0]} (.venv-vllm.log)" if tail else ""))


#: Each vLLM run is a new process (2.5 to 6 minutes each on the shared, loaded 2-core development machine); the raw
#: test makes four.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3000),
              pytest.mark.skipif(_not_built() is not None, reason=str(_not_built()))]


def run(store: Path, codec: str, prompt: Path, tmp: Path, name: str) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KVPACK_CACHE_DIR": str(tmp / "kvpack-cache")}
    proc = subprocess.run([str(PYTHON), str(RUN), str(MODEL), str(store), codec, str(prompt), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name}: vLLM run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def entries(store: Path) -> list[Path]:
    return sorted((store / "objects").glob("*/*"))


@pytest.fixture(scope="module")
def prompt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "prompt.txt"
    path.write_text("".join(f"Paragraph {i}. {PROSE}" for i in range(18)) + "\nSummarize the text above.")
    return path


@pytest.mark.parametrize("codec", ["raw", "lossless"])
def test_warm_run_in_a_new_process_loads_the_stored_chunks_and_answers_the_same(
        codec: str, prompt: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cold = run(store, codec, prompt, tmp_path, "cold")
    full, loadable = cold["prompt_tokens"] // CHUNK, (cold["prompt_tokens"] - 1) // CHUNK
    assert loadable >= 2, "the prompt must span at least two loadable chunks"
    assert cold["cached_tokens"] == 0
    assert len(entries(store)) == full
    warm = run(store, codec, prompt, tmp_path, "warm")
    assert warm["cached_tokens"] == loadable * CHUNK  # from kvpack: vLLM's own prefix cache is empty
    assert warm["output"] == cold["output"]
    if codec != "raw":
        return
    # valid entries holding other K/V: the answer changes, so the model attends to what was loaded
    originals = {path: path.read_bytes() for path in entries(store)}
    raw = codecs.get("raw")
    for path, data in originals.items():
        kv = raw.decode(data)
        kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(0)).to(kv.data.dtype) * 4)
        path.write_bytes(raw.encode(kv))
    forged = run(store, codec, prompt, tmp_path, "forged")
    assert forged["cached_tokens"] == loadable * CHUNK
    assert forged["output"] != cold["output"]
    # corrupted entries are misses: vLLM recomputes those tokens and answers as without a cache
    for path, data in originals.items():
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0xFF
        path.write_bytes(bytes(broken))
    corrupted = run(store, codec, prompt, tmp_path, "corrupted")
    assert corrupted["output"] == cold["output"]
    for path in entries(store):  # the store dropped what it could not verify; nothing broken is left
        verify(path.read_bytes())


def test_bench_vllm_smallest_run_loads_every_warm_chunk_and_serves(tmp_path: Path) -> None:
    """`kvpack bench vllm` at its smallest: one length, raw, one repeat, a four-request serving run (two vLLM
    processes: without and with the connector)."""
    from kvpack.bench import vllm

    config = vllm.VllmBenchConfig(settings=("raw",), lengths=(600,), repeats=1, requests=4, contexts=2,
                                  context_tokens=300, concurrency=2, serving_tokens=2, serving_setting="raw",
                                  kv_cache_gib=1, arm_timeout_s=900)
    doc = vllm.run(config, VENV, MODEL, tmp_path, log=lambda _: None)
    assert [a["error"] for a in doc["arms"]] == [None, None]
    baseline, raw = doc["rows"]
    assert baseline["warm_s"] is None and raw["hits_as_expected"] and raw["loadable_tokens"] == 512
    assert raw["ratio"] == pytest.approx(1.0, rel=0.01)  # raw stores the pages' bytes (and a small header)
    assert [s["arm"] for s in doc["serving"]] == [vllm.BASELINE, "raw"]
    assert doc["serving"][0]["hit_rate"] == 0 and all(s["requests"] == 4 for s in doc["serving"])
    vllm.render(doc, tmp_path / "v.md", tmp_path / "v.png", "render")
    assert "hits as expected" in (tmp_path / "v.md").read_text()
