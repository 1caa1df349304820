"""The kvpack command line: inspect, decode, prefill, eval (raw shows exactly zero change), errors and help; the
cross-source protocol's options (--sources) on a tiny random model."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import PROSE
from kvpack import cli, codecs
from kvpack.spec import ModelSpec
from test_families import tiny

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
    assert row["passkey_key_logprob"] == row["passkey_key_logprob_reference"] < 0
    assert row["passkey_hits"] == row["passkey_hits_reference"] and len(row["passkey_hits"]) == 2
    assert row["passkey_key_logprobs"] == row["passkey_key_logprobs_reference"]
    assert sum(row["passkey_key_logprobs"]) / 2 == row["passkey_key_logprob"]
    assert (row["passkey_gained"], row["passkey_lost"], row["passkey_mcnemar_p"]) == (0, 0, 1.0)
    assert 0.99 < row["ratio"] <= 1.0 and row["documents"] == [str(text)]


class CharTokenizer:
    """Characters as token ids of the tiny model's vocabulary (what the harness calls of a tokenizer)."""

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False) -> Any:
        return SimpleNamespace(input_ids=torch.tensor([[3 + ord(c) % 90 for c in text]]))


@pytest.fixture(scope="module")
def tiny_model() -> tuple[Any, Any, ModelSpec]:
    model = tiny("llama")
    return model, CharTokenizer(), ModelSpec.from_model(model)


def test_sources_reach_the_document_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kvpack.eval

    seen: list[list[Any]] = []

    def fake_evaluate(model: Any, tokenizer: Any, spec: Any, chosen: Any, docs: Any, **_: Any) -> list[dict[str, Any]]:
        seen.append(list(docs))
        raise ValueError("stop here")

    monkeypatch.setattr(cli, "load_model", lambda name: (None, None, None))
    monkeypatch.setattr(kvpack.eval, "evaluate", fake_evaluate)
    for command in (["eval", "--codec", "raw"], ["bench", "codecs", "--no-defaults"]):
        result = runner.invoke(cli.app, [*command, "--docs", "3", "--sources", "metadata, site-packages"])
        assert result.exit_code == 2 and "stop here" in result.output, result.output
        assert [(d.kind, d.source) for d in seen[-1]] == [("code", "site-packages")] * 2 + [("prose", "metadata")]
    text = tmp_path / "mine.txt"
    text.write_text(PROSE)
    for args in (["eval", "--text", str(text), "--sources", "stdlib"],
                 ["calibrate", "-o", str(tmp_path / "p"), "--text", str(text), "--sources", "stdlib"]):
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 2 and "exclude each other" in result.output, result.output
    result = runner.invoke(cli.app, ["eval", "--sources", "stdlib,wiki"])
    assert result.exit_code == 2 and "comma-separated subset" in result.output


def test_calibrate_options_reach_the_codecs_calibration(tiny_model: tuple[Any, Any, ModelSpec],
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kvpack.codecs.transform import calibrate as transform_calibration

    monkeypatch.setattr(cli, "load_model", lambda name: tiny_model)
    real, seen = transform_calibration.calibrate, {}

    def fake(model: Any, tokenizer: Any, spec: Any, **options: Any) -> Any:
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(transform_calibration, "calibrate", fake)
    result = runner.invoke(cli.app, ["calibrate", "--docs", "2", "-o", str(tmp_path / "p"), "--option", "rounding=0.4",
                                     "--option", "max_tokens=100", "--option", "measure_kl=false"])
    assert result.exit_code == 2 and "stop here" in result.output, result.output
    config = seen["config"]
    assert (config.rounding, config.max_tokens, config.measure_kl) == (0.4, 100, False)
    assert isinstance(config.max_tokens, int)
    monkeypatch.setattr(transform_calibration, "calibrate", real)

    def no_model(name: str) -> Any:
        raise AssertionError("a bad --option must be refused before the model loads")

    monkeypatch.setattr(cli, "load_model", no_model)
    for options, message in ((["bogus=1"], "has no setting 'bogus'; its settings: tokens, cont"),
                             (["tokens=-5"], "tokens must be an integer in 16.."),
                             (["rounding=0.9"], "rounding must be a number in [0, 0.5]"),
                             (["measure_kl=maybe"], "measure_kl must be true or false")):
        args = [a for o in options for a in ("--option", o)]
        result = runner.invoke(cli.app, ["calibrate", "--docs", "2", "-o", str(tmp_path / "p"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    result = runner.invoke(cli.app, ["calibrate", "--codec", "cachegen", "--docs", "2", "-o", str(tmp_path / "p"),
                                     "--option", "tokens=0"])
    assert result.exit_code == 2 and "tokens must be an integer in 10.." in result.output, result.output
    result = runner.invoke(cli.app, ["calibrate", "--docs", "2", "-o", str(tmp_path / "p"), "--option", "rounding"])
    assert result.exit_code == 2 and "name=value" in result.output, result.output
    result = runner.invoke(cli.app, ["calibrate", "--draw", "1", "--text", __file__, "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "exclude each other" in result.output, result.output


def test_calibrate_draws_other_documents(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--draw K`` calibrates on the K-th set of documents and says which ones an earlier draw already used."""
    from kvpack.eval.corpora import documents, shared_documents

    seen: dict[int, list[str]] = {}

    def stop(name: str) -> Any:
        raise typer.Exit(3)

    monkeypatch.setattr(cli, "load_model", stop)
    for n in (2, 12):
        result = runner.invoke(cli.app, ["calibrate", "--docs", str(n), "--draw", "1", "-o", str(tmp_path / "p")])
        assert result.exit_code == 3, result.output
        said = " ".join(result.output.split()).replace(", ", ",")
        seen[n] = [d.name for d in documents(n, "calibration", draw=1)]
        assert f"(draw 1): {','.join(seen[n])}".replace(" ", "") in said.replace(" ", "")
        repeated = shared_documents(n, "calibration", ("stdlib", "pydoc"), 1)
        assert ("repeats" in said) == bool(repeated)
    assert not set(seen[2]) & {d.name for d in documents(2, "calibration")}


def test_cross_source_protocol(tiny_model: tuple[Any, Any, ModelSpec], monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    """Calibrate on stdlib+pydoc, evaluate on the eval split of both source sets and on a user's file: every row says
    what it was measured on, and the cross-source table puts each run under its protocol."""
    import kvpack.eval
    from kvpack.eval.quality import reference

    monkeypatch.setattr(cli, "load_model", lambda name: tiny_model)
    monkeypatch.setattr(kvpack.eval, "reference", functools.partial(reference, greedy_tokens=2))  # not checked
    profile = tmp_path / "a.kvprof"
    record = tmp_path / "a.calibration.json"
    result = runner.invoke(cli.app, ["calibrate", "--codec", "cachegen", "--docs", "2", "--sources", "pydoc,stdlib",
                                     "-o", str(profile), "--json", str(record)])
    assert result.exit_code == 0, result.output
    assert "calibration documents from pydoc,stdlib: stdlib/" in result.output
    made = json.loads(record.read_text())
    assert made["kind"] == "calibration" and made["profile_bytes"] == profile.stat().st_size
    assert made["calibration_sources"] == ["stdlib", "pydoc"] and len(made["documents"]) == 2
    assert made["seconds"] > 0 and made["profile_hash"] == codecs.get("cachegen", profile=str(profile)).profile_hash()
    notes = tmp_path / "notes.md"
    notes.write_text(Path(__file__).with_name("conftest.py").read_text().replace("#", ""))
    runs = []
    for sources in ("stdlib,pydoc", "site-packages,metadata", None):
        out = tmp_path / f"{sources}.json"
        where = ["--sources", sources] if sources else ["--text", str(Path(__file__)), "--text", str(notes)]
        result = runner.invoke(cli.app, ["bench", "codecs", "--no-defaults", "--setting",
                                         f"cachegen:profile={profile}", "--setting", "fp8", *where, "--docs", "2",
                                         "--prefix", "48", "--cont", "16", "--json", str(out)])
        assert result.exit_code == 0, result.output
        runs.append(out)
    in_source, in_fp8 = json.loads(runs[0].read_text())["rows"]
    cross = json.loads(runs[1].read_text())["rows"][0]
    own, own_fp8 = json.loads(runs[2].read_text())["rows"]
    assert in_source["calibration_sources"] == cross["calibration_sources"] == ["stdlib", "pydoc"]
    assert (in_source["protocol"], cross["protocol"], own["protocol"]) == ("in-source", "cross-source", "own files")
    assert cross["sources"] == ["site-packages", "metadata"] and cross["kinds"] == ["code", "prose"]
    assert [(d["kind"], d["source"]) for d in cross["per_document"]] == [("code", "site-packages"),
                                                                        ("prose", "metadata")]
    assert set(cross["ppl_increase_pct_by_source"]) == {"site-packages", "metadata"}
    assert own["sources"] == ["file"] and [d["kind"] for d in own["per_document"]] == ["code", "prose"]
    assert in_fp8["profile"] is None and in_fp8["protocol"] is None

    page = tmp_path / "cross.md"
    summary = tmp_path / "cross.json"
    result = runner.invoke(cli.app, ["bench", "cross-source", *map(str, runs), str(record), "--markdown", str(page),
                                     "--json", str(summary)])
    assert result.exit_code == 0, result.output
    tables = json.loads(summary.read_text())
    assert tables["profiles"] == [made]
    (entry,) = tables["settings"]
    assert entry["setting"].startswith("cachegen")
    assert entry["cross-source"]["runs"] == ["stdlib+pydoc -> site-packages+metadata"]
    assert entry["cross-source"]["ratio"] == cross["ratio"]
    assert entry["cross-source"]["ppl_increase_pct_prose"] == cross["ppl_increase_pct_prose"]
    assert entry["in-source"]["documents"] == 2
    assert entry["own files"]["ppl_increase_pct_code"] == own["ppl_increase_pct_code"] is not None
    assert entry["own files"]["ppl_increase_pct_prose"] == own["ppl_increase_pct_prose"] is not None
    # fp8 learnt nothing from any source: one entry per evaluated source set, none under a protocol
    assert [(e["setting"], e["evaluated on"]) for e in tables["unprofiled"]] == [
        ("fp8(classes=2)", where) for where in ("stdlib+pydoc", "site-packages+metadata", "own files")]
    assert tables["unprofiled"][2]["ratio"] == own_fp8["ratio"]
    text = page.read_text()
    assert "own files prose %" in text and "| enc MB/s | dec MB/s |" in text
    assert "| fp8(classes=2) | site-packages+metadata |" in text
    assert f"| {made['profile_hash'][:8]} | cachegen | stdlib+pydoc | 2 |" in text  # the profiles table
    assert f"| {made['profile_hash'][:8]} | stdlib+pydoc -> site-packages+metadata | cross-source |" in text


@pytest.mark.parametrize("args", [["calibrate", "-o", "p", "--docs", "0"], ["eval", "--codec", "raw", "--prefix", "0"],
                                  ["bench", "speed", "--repeats", "0"], ["bench", "codecs", "--docs", "-1"],
                                  ["eval", "--codec", "raw", "--passkey", "512", "--trials", "0"]])
def test_counts_below_one_are_refused_before_anything_loads(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(name: str) -> Any:
        raise AssertionError("a count below one must be refused before the model loads")

    monkeypatch.setattr(cli, "load_model", no_model)
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2 and "greater than or equal to 1" in result.output, result.output
