"""`kvpack bench gpu`: without CUDA it refuses clearly; its whole script runs in the tiny configuration on the CPU
under Triton's interpreter (conftest selects it), so the prepared GPU benchmark is not untested code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvpack.bench import gpu
from kvpack.cli import app


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_gpu_without_cuda_refuses_with_a_clear_message() -> None:
    result = CliRunner().invoke(app, ["bench", "gpu"])
    assert result.exit_code == 2
    assert "needs an NVIDIA GPU with CUDA" in result.output
    with pytest.raises(gpu.GpuBenchError, match="--tiny --device cpu"):
        gpu.check_device(gpu.GpuBenchConfig())


def test_bench_gpu_tiny_runs_the_whole_script(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter only where there is no GPU
    result = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--device", device, "--json", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert "does not depend on weight values" in doc["note"]
    assert doc["machine"]["triton"]
    codecs = gpu.GpuBenchConfig.tiny().codecs
    assert [row["codec"] for row in doc["decode"]] == list(codecs)
    assert all(row["decode_gbps"] > 0 and row["ratio"] > 0 for row in doc["decode"])
    arms = {(row["arm"], row["link"]) for row in doc["ttft"]}
    assert ("recompute", None) in arms and ("lossless", "10 Gbps (emulated)") in arms
    assert len(doc["ttft"]) == 1 + len(codecs) * 2


def test_pipeline_overlaps_transfer_and_decoding() -> None:
    # 1 MB chunks at 8 Gbps take 1 ms each to arrive; decoding takes 2 ms: decode-bound after the first arrival
    assert gpu.pipeline_seconds([0.002] * 3, [10**6] * 3, 8.0) == pytest.approx(0.001 + 3 * 0.002)
    # decoding 0.5 ms: link-bound, the last chunk decoded 0.5 ms after it arrives
    assert gpu.pipeline_seconds([0.0005] * 3, [10**6] * 3, 8.0) == pytest.approx(0.003 + 0.0005)
    assert gpu.pipeline_seconds([0.001, 0.002], [5, 5], None) == pytest.approx(0.003)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="codecs"):
        gpu.GpuBenchConfig(codecs=("transform",))
    with pytest.raises(ValueError, match="contexts"):
        gpu.GpuBenchConfig(contexts=())
