"""The kvpack command line: inspect, decode, prefill, eval (raw shows exactly zero change), errors and help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import PROSE
from kvpack import cli

GOLDEN = Path(__file__).parent / "golden"
runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0
    for command in ("prefill", "inspect", "decode", "eval", "demo", "bench"):
        assert command in result.output
    assert runner.invoke(cli.app, ["bench", "--help"]).exit_code == 0


def test_inspect_json_reports_ratio() -> None:
    result = runner.invoke(cli.app, ["inspect", str(GOLDEN / "raw_bf16.kvp"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["codec"]["name"] == "raw" and info["tokens"] == 6
    assert info["bits_per_element"] > 16 and info["ratio_vs_fp16"] < 1


def test_decode_writes_safetensors(tmp_path: Path) -> None:
    out = tmp_path / "kv.safetensors"
    result = runner.invoke(cli.app, ["decode", str(GOLDEN / "raw_bf16.kvp"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out))
    assert tuple(tensors["layer.1.values"].shape) == (1, 6, 4)


def test_corrupted_file_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.kvp"
    data = bytearray((GOLDEN / "raw_bf16.kvp").read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    result = runner.invoke(cli.app, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert "checksum mismatch" in result.output


def test_unknown_codec_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["eval", "--codec", "nope", "--text", str(GOLDEN / "raw_bf16.kvp")])
    assert result.exit_code == 2
    assert "unknown codec 'nope'" in result.output


@pytest.mark.model
def test_prefill_and_eval_raw_show_zero_change(smollm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "load_model", lambda name: smollm)
    text = tmp_path / "doc.txt"
    text.write_text(PROSE * 10)
    out = tmp_path / "doc.kvp"
    result = runner.invoke(cli.app, ["prefill", str(text), "-o", str(out), "--max-tokens", "64"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(cli.app, ["inspect", str(out), "--json"]).output)
    assert info["tokens"] == 64 and info["fingerprint"] == smollm[2].fingerprint

    report = tmp_path / "eval.json"
    result = runner.invoke(cli.app, ["eval", "--codec", "raw", "--text", str(text), "--prefix", "96", "--cont", "32",
                                     "--passkey", "256", "--trials", "2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    row = json.loads(report.read_text())
    for key in ("ppl_increase_pct", "kl_mean", "kl_p99"):
        assert row[key] == 0.0, key
    assert row["top1_agreement"] == 1.0 and row["greedy_agreement"] == 1.0
    assert row["passkey_accuracy"] == row["passkey_accuracy_reference"]
    assert 0.99 < row["ratio"] <= 1.0 and row["documents"] == [str(text)]
