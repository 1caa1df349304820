"""kvpack's connector inside vLLM (CPU backend, in-process), through the integration venv that `make vllm-venv` builds.

Three processes (tests/vllm_run.py), each making one vLLM engine after another, vLLM's own prefix cache off. Cold:
every codec (the calibrated ones with small profiles that `kvpack calibrate --for-vllm` bound to the served
checkpoint) over its own empty disk store: nothing is hit, the prompt's full chunks are stored. Warm, in a new
process: the loadable chunks are hit; the greedy output is token for token the cold one with raw, zstd and
lossless chunks, and a lossy chunk decodes to the raw run's K/V with the codec's own error on them. Then, on copies
of the raw store: valid entries holding other K/V change the output (the loaded K/V is what the model attends
to); corrupted entries are misses, recomputed, with the cold output. The vLLM server as the README starts it serves
a repeated prompt from the store. And `kvpack bench vllm` at its smallest (two more
processes: without and with the connector). Skipped, with the reason, only where the venv could not be built.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import PROSE
from kvpack import codecs
from kvpack.bench.redis_server import free_port
from kvpack.bench.vllm import numba_cache_of
from kvpack.cpu import flags
from kvpack.format import verify
from kvpack.profile import Profile

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


#: A process starts vLLM in 10 to 20 s and makes a run in 5 to 30 s on a 2-core machine (docs/vllm.md).
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3000),
              pytest.mark.skipif(_not_built() is not None, reason=str(_not_built()))]


#: Every codec, with its parameters (the calibrated ones also get a profile bound to the served model).
CODECS = {"raw": {}, "zstd": {}, "lossless": {}, "fp8": {}, "kivi": {"bits": 4}, "cachegen": {},
          "transform": {"preset": "16x"}, "kvtc": {"preset": "16x"}}
#: `kvpack calibrate` options of the calibrated codecs: small profiles, made in seconds.
SMALL = ["--option", "tokens=512", "--option", "cont=32", "--option", "fisher_docs=1", "--option", "measure_kl=false"]
CALIBRATION = {"cachegen": ["--option", "tokens=512"], "transform": SMALL, "kvtc": SMALL}
#: Codecs whose warm output must be the cold one token for token.
EXACT = ("raw", "zstd", "lossless")


def run_plan(runs: list[dict[str, Any]], prompt: str, tmp: Path, name: str) -> dict[str, dict[str, Any]]:
    """One process (a new one, so nothing of vLLM's state survives from earlier runs) making ``runs`` in turn."""
    plan, out = tmp / f"{name}.plan.json", tmp / f"{name}.json"
    plan.write_text(json.dumps({"checkpoint": str(MODEL), "prompt": prompt, "runs": runs}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "KVPACK_CACHE_DIR": str(tmp / "kvpack-cache"),
           "NUMBA_CACHE_DIR": numba_cache_of(PYTHON)}
    proc = subprocess.run([str(PYTHON), str(RUN), str(plan), str(out)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"{name}: vLLM runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {r["name"]: r for r in json.loads(out.read_text())}


def entries(store: Path) -> list[Path]:
    return sorted((store / "objects").glob("*/*"))


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Cold runs of every codec in one process; warm runs in a second, which then serves from copies of the raw
    store whose entries are valid but hold other K/V, and whose entries are corrupted (each engine has its own
    connector and store, and vLLM's prefix cache is off, so nothing of a run reaches the next but the process)."""
    tmp = tmp_path_factory.mktemp("vllm")
    prompt = "".join(f"Paragraph {i}. {PROSE}" for i in range(18)) + "\nSummarize the text above."
    params = dict(CODECS)
    for codec, options in CALIBRATION.items():
        profile = tmp / f"{codec}.kvprof"
        calibrate = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "kvpack"), "calibrate", "--codec", codec, "--model", str(MODEL),
             "--for-vllm", "float32",  # what tests/vllm_run.py serves in
             "--docs", "2", *options, "-o", str(profile)],
            env={**os.environ, "KVPACK_CACHE_DIR": str(tmp / "kvpack-cache")}, capture_output=True, text=True,
            timeout=900)
        assert calibrate.returncode == 0, calibrate.stdout[-3000:] + calibrate.stderr[-3000:]
        params[codec] = {**CODECS[codec], "profile": str(profile)}
    stores = {codec: tmp / codec for codec in CODECS}
    runs = [{"name": codec, "store": str(stores[codec]), "codec": codec, "codec_params": params[codec]}
            for codec in CODECS]
    cold = run_plan(runs, prompt, tmp, "cold")
    stored = {codec: entries(stores[codec]) for codec in CODECS}
    # copies of the raw store: one whose entries are valid but hold other K/V, one whose entries are corrupted
    raw = codecs.get("raw")
    forged, corrupted = tmp / "forged", tmp / "corrupted"
    for path in stored["raw"]:
        data = path.read_bytes()
        kv = raw.decode(data)
        kv.data.copy_(torch.randn(kv.data.shape, generator=torch.Generator().manual_seed(0)).to(kv.data.dtype) * 4)
        broken = bytearray(data)
        broken[len(broken) // 2] ^= 0xFF
        for root, payload in ((forged, raw.encode(kv)), (corrupted, bytes(broken))):
            target = root / path.relative_to(stores["raw"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
    altered = [{"name": "forged", "store": str(forged), "codec": "raw"},
               {"name": "corrupted", "store": str(corrupted), "codec": "raw"}]
    warm = run_plan(runs + altered, prompt, tmp, "warm")  # the altered stores' runs in the warm process, after it
    return {"cold": cold, "warm": warm, "stored": stored, "corrupted": corrupted, "params": params,
            "altered": {run["name"]: warm[run["name"]] for run in altered}}


@pytest.mark.parametrize("codec", list(CODECS))
def test_warm_run_in_a_new_process_loads_every_loadable_chunk(codec: str, rounds: dict[str, Any]) -> None:
    cold, warm = rounds["cold"][codec], rounds["warm"][codec]
    full, loadable = cold["prompt_tokens"] // CHUNK, (cold["prompt_tokens"] - 1) // CHUNK
    assert loadable >= 2, "the prompt must span at least two loadable chunks"
    assert cold["cached_tokens"] == 0
    assert len(rounds["stored"][codec]) == full
    assert cold["codec"] == warm["codec"] and json.loads(cold["codec"])["name"] == codec
    assert warm["cached_tokens"] == loadable * CHUNK  # from kvpack: vLLM's own prefix cache is off
    if codec in EXACT:
        assert warm["output"] == cold["output"]


def _by_position(paths: list[Path], codec: codecs.Codec, spec: Any = None) -> list[Any]:
    return sorted((codec.decode(p.read_bytes(), spec=spec) for p in paths), key=lambda kv: int(kv.positions[0]))


def _rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("codec", [c for c in CODECS if c not in EXACT])
def test_lossy_chunks_hold_the_served_kv_within_the_codecs_own_error(codec: str, rounds: dict[str, Any]) -> None:
    """A lossy chunk vLLM stored decodes to the K/V the raw run stored for the same tokens, with the error the codec
    makes on those K/V here (a wrong page layout or token order would be far off)."""
    reference = _by_position(rounds["stored"]["raw"], codecs.get("raw"))
    spec = reference[0].spec
    the_codec = codecs.get(codec, **rounds["params"][codec])
    stored = _by_position(rounds["stored"][codec], the_codec, spec)
    assert [int(kv.positions[0]) for kv in stored] == [int(kv.positions[0]) for kv in reference]
    for got, ref in zip(stored, reference, strict=True):
        own = _rel_rmse(the_codec.decode(the_codec.encode(ref), spec=spec).data, ref.data)
        assert 0 < _rel_rmse(got.data, ref.data) <= own * 1.05 + 1e-6


def test_valid_entries_with_other_kv_change_the_answer(rounds: dict[str, Any]) -> None:
    """The model attends to what was loaded: entries that decode to other K/V give another answer."""
    forged, cold = rounds["altered"]["forged"], rounds["cold"]["raw"]
    assert forged["cached_tokens"] == rounds["warm"]["raw"]["cached_tokens"]
    assert forged["output"] != cold["output"]


def test_corrupted_entries_are_misses_and_the_answer_is_the_cold_one(rounds: dict[str, Any]) -> None:
    corrupted = rounds["altered"]["corrupted"]
    assert corrupted["output"] == rounds["cold"]["raw"]["output"]
    for path in entries(rounds["corrupted"]):  # the store dropped what it could not verify; nothing broken is left
        verify(path.read_bytes())


def test_a_profile_calibrated_for_vllm_is_bound_to_the_model_vllm_serves(rounds: dict[str, Any]) -> None:
    """`kvpack calibrate --for-vllm` computes, without vLLM, the fingerprint the connector computes inside it."""
    for codec in CALIBRATION:
        profile = Profile.open(rounds["params"][codec]["profile"])
        assert profile.model_fingerprint == rounds["cold"][codec]["fingerprint"]


def test_bench_vllm_smallest_run_loads_every_warm_chunk_and_serves(tmp_path: Path) -> None:
    """`kvpack bench vllm` at its smallest: one length, raw, one repeat, a four-request serving run (two vLLM
    processes: without and with the connector)."""
    from kvpack.bench import vllm

    config = vllm.VllmBenchConfig(settings=("raw",), lengths=(600,), repeats=1, requests=4, contexts=2,
                                  context_tokens=300, concurrency=2, serving_tokens=2, serving_settings=("raw",),
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


def readme_serve_args() -> list[str]:
    """The arguments of the README's line that serves SmolLM2 with vLLM and kvpack, as written."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "vllm.entrypoints.openai.api_server" in x)
    args = shlex.split(line.split("&&", 1)[1])
    assert args[:3] == [".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"], line
    return args[3:]


class VllmServer:
    """vLLM's OpenAI-compatible server on a free loopback port, stopped by :meth:`stop`."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_SERVER_DEV_MODE": "1", "NUMBA_CACHE_DIR": numba_cache_of(PYTHON)}  # dev mode: /reset_prefix_cache
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", *args,
                                          "--host", "127.0.0.1", "--port", str(self.port),
                                          "--enable-prompt-tokens-details"],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the vLLM server exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"the vLLM server did not answer /health within 600 s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def complete(self, model: str, prompt: str) -> dict[str, Any]:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's own prefix cache (not kvpack's store); vLLM refuses while blocks are held, so retry a while."""
        for _ in range(60):
            request = urllib.request.Request(f"http://127.0.0.1:{self.port}/reset_prefix_cache", method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                if json.loads(response.read())["success"]:
                    return
            time.sleep(0.5)
        raise AssertionError(f"vLLM did not reset its prefix cache:\n{self.tail()}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


def test_the_readmes_vllm_line_serves_a_repeated_prompt_from_the_store(tmp_path: Path) -> None:
    """The README's command line (its store moved into a temporary folder; float32 on AMX hosts, as the README says):
    a request, the same request again, which vLLM's own prefix cache serves, then, with that cache emptied, a third,
    whose loadable chunks come from kvpack's store. The third answers what the second did: the same K/V at the same
    split of the prompt. Only in float32 is that also the first answer: in bfloat16, computing the prompt's tail
    apart from its head rounds differently from computing it in one pass, whoever holds the head (vLLM's own cache
    gave another 8-token answer than the cold one on a 2-core AMD EPYC Zen 3 in bfloat16)."""
    args = [a.replace("file:///var/tmp/kvpack-vllm", f"file://{tmp_path / 'store'}") for a in readme_serve_args()]
    if "amx_bf16" in flags():
        args[args.index("--dtype") + 1] = "float32"
    model = args[args.index("--model") + 1]
    prompt = "".join(f"Paragraph {i}. {PROSE}" for i in range(18)) + "\nSummarize the text above."
    server = VllmServer(args, tmp_path / "serve.log")
    try:
        cold = server.complete(model, prompt)
        tokens = cold["usage"]["prompt_tokens"]
        deadline = time.monotonic() + 120  # saves are asynchronous: wait until the chunks are stored
        while len(entries(tmp_path / "store")) < tokens // CHUNK and time.monotonic() < deadline:
            time.sleep(0.5)
        own = server.complete(model, prompt)
        server.reset_prefix_cache()
        warm = server.complete(model, prompt)
    finally:
        server.stop()
    loadable = (tokens - 1) // CHUNK * CHUNK
    assert len(entries(tmp_path / "store")) == tokens // CHUNK
    assert (cold["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
    assert own["usage"]["prompt_tokens_details"]["cached_tokens"] == loadable  # vLLM's blocks: the same split
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == loadable  # from kvpack: vLLM's cache is empty
    assert warm["choices"][0]["text"] == own["choices"][0]["text"]
    if args[args.index("--dtype") + 1] == "float32":
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
