"""kvpack.bench.reuse without the model: edits of lines, the targets read from a results document, the page."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from kvpack.bench import reuse


@pytest.mark.parametrize("seed", range(20))
def test_edit_lines_inserts_deletes_or_replaces_one_to_ten_lines(seed: int) -> None:
    lines = [f"line {i}\n" for i in range(14)]
    new, info = reuse.edit_lines(lines, random.Random(seed))
    assert 1 <= info["lines"] <= 10 and 1 <= info["at_line"] < len(lines)
    at, n = info["at_line"], info["lines"]
    assert new[:at] == lines[:at]
    change = {"insert": n, "delete": -n, "replace": 0}[info["op"]]
    assert len(new) == len(lines) + change
    assert new[len(new) - (len(lines) - at - (0 if info["op"] == "insert" else n)):] == lines[at + (
        0 if info["op"] == "insert" else n):]


def _row(policy: str, ratio: float, kl: float, recomputed: float = 0.0, ppl: float = 0.0) -> dict[str, Any]:
    return {"policy": policy, "ratio": ratio, "params": {}, "kl_mean": kl, "kl_p99": kl, "top1": 1.0, "greedy": 1.0,
            "ppl": 10.0 * (1 + ppl / 100), "ppl_ref": 10.0, "ppl_increase_pct": ppl, "recomputed": recomputed,
            "kl_mean_code": kl, "kl_mean_prose": kl}


def _doc() -> dict[str, Any]:
    config = reuse.ReuseConfig(ratios=(0.05, 0.15), passkey_trials=20)
    rag = [_row("none", 0.0, 1.0)] + [_row(p, r, kl) for r in config.ratios
                                      for p, kl in (("epic", 0.5), ("blend", 0.3), ("prophet", 0.1))]
    timing = [{"policy": p, "ratio": 0.15, "ttft_s": t, "speedup": 8.0 / t}
              for p, t in (("full", 8.0), ("prophet", 2.0))]
    edits = [_row("prefix-only", 1.0, 0.0, 0.5), _row("pie", 0.0, 0.01, 0.04, 0.5), _row("pie+blend", 0.05, 0.0, 0.2)]
    return {"command": "kvpack bench reuse", "model": "m", "dtype": "float32", "dtype_probe_256_tokens_s": {},
            "machine": "cpu", "config": asdict(config), "load_average_start": [1.0] * 3,
            "load_average_end": [1.0] * 3, "minutes": 1.0,
            "rag": {"cases": [{"segments": 4}], "rows": rag},
            "timing": {"segments": 8, "segment_tokens": 512, "prompt_tokens": 4200, "rows": timing},
            "passkey": {"trials": [{}] * 20, "segments": 8, "segment_tokens": 256,
                        "rows": [{"policy": p, "ratio": 0.15, "accuracy": a}
                                 for p, a in (("none", 0.5), ("epic", 0.8), ("blend", 0.9), ("prophet", 1.0),
                                              ("full", 0.95))]},
            "edits": {"cases": [], "rows": edits,
                      "timing": {"tokens": 4096,
                                 "rows": [{"policy": "full", "ratio": 1.0, "ttft_s": 6.0, "speedup": 1.0},
                                          {"policy": "pie", "ratio": 0.0, "ttft_s": 1.0, "speedup": 6.0}]}}}


def test_targets_are_judged_on_the_document_numbers() -> None:
    t = reuse.targets(_doc())
    assert t["kl_gap_closed_at_15"]["best"] == "prophet" and t["kl_gap_closed_at_15"]["gap_closed"]["prophet"] == 0.9
    assert t["kl_gap_closed_at_15"]["met"] and t["best_beats_epic_and_blend"]["met"]
    assert t["ttft_speedup_at_15"]["met"] and t["ttft_speedup_at_15"]["speedup"]["prophet"] == 4.0
    assert t["passkey_at_15"]["met_by"] == ["blend", "prophet"]  # epic is two trials below full
    doc = _doc()
    doc["passkey"]["rows"][-1]["accuracy"] = 0.85  # full below prophet by three trials: no loss, but not equal
    assert reuse.targets(doc)["passkey_at_15"]["equal_within_one"] == ["epic", "blend"]
    assert reuse.targets(doc)["passkey_at_15"]["met_by"] == ["epic", "blend", "prophet"]
    assert t["edits"]["best_at_most_10pct"]["policy"] == "pie" and t["edits"]["met"]  # +0.5% at 4%, 6x


def test_a_target_missed_is_reported_missed() -> None:
    doc = _doc()
    doc["rag"]["rows"][2]["kl_mean"] = 0.01  # blend at 5% now below prophet's 0.1
    doc["edits"]["rows"][1]["ppl_increase_pct"] = 3.0
    t = reuse.targets(doc)
    assert t["best_beats_epic_and_blend"]["winner_by_ratio"] == ["blend", "prophet"]
    assert not t["best_beats_epic_and_blend"]["met"] and not t["edits"]["met"]


def test_the_page_renders_every_part_and_the_targets(tmp_path: Path) -> None:
    doc = _doc()
    doc["targets"] = reuse.targets(doc)
    reuse.write(doc, tmp_path / "r.json", tmp_path / "r.md", None, "kvpack bench reuse --from-json r.json")
    page = (tmp_path / "r.md").read_text()
    for heading in ("## RAG", "## TTFT", "## Passkey", "## Edits", "## Targets"):
        assert heading in page
    assert "--from-json r.json" in page and "| prophet | 0.15 |" in page


def test_a_run_that_stopped_resumes_with_its_parts_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kvpack import models
    from test_families import tiny

    model = tiny("llama")
    monkeypatch.setattr(models, "load", lambda name, dtype=None: (model, None))
    ran: list[str] = []
    for part, runner in (("rag", "run_rag"), ("timing", "run_rag_timing"), ("edits", "run_edits"),
                         ("passkey", "run_passkey")):
        monkeypatch.setattr(reuse, runner, lambda *args, part=part: ran.append(part) or _doc()[part])
    stopped = {k: v for k, v in _doc().items() if k not in ("edits", "passkey")} | {"parts_done": ["rag", "timing"]}
    config = reuse.ReuseConfig(ratios=(0.05, 0.15), passkey_trials=20)
    doc = reuse.run("m", config, lambda _: None, "kvpack bench reuse --resume r.json", resume=stopped)
    assert ran == ["edits", "passkey"] and doc["rag"] == stopped["rag"] and doc["command"] == "kvpack bench reuse"
    assert doc["parts_done"] == ["rag", "timing", "passkey", "edits"] and doc["minutes"] >= stopped["minutes"]
    assert doc["resumed"][0]["parts"] == ["edits", "passkey"] and doc["targets"]["edits"]["met"]
    reuse.write(doc, None, tmp_path / "r.md", None, "render")
    assert "Parts edits, passkey by `kvpack bench reuse --resume r.json`, resuming that run" in (
        tmp_path / "r.md").read_text()
    with pytest.raises(ValueError, match="cannot resume"):
        reuse.run("m", reuse.ReuseConfig(cases=2), lambda _: None, "again", resume=stopped)
