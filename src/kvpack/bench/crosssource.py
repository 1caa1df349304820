"""`kvpack bench cross-source`: the cross-source table (issue 16) from the JSON of `kvpack bench codecs` and
`kvpack eval` runs; it measures nothing.

The protocol (docs/codecs.md): profile A calibrated on sources SA and profile B on SB (`kvpack calibrate --sources`
records them in the profile), each profile's settings evaluated on the eval documents of SA and of SB (`kvpack bench
codecs --sources`) and, optionally, on the user's own files (`kvpack eval --text`). Every row records what it was
measured on (``sources``, ``calibration_sources``, ``protocol``: :func:`kvpack.eval.corpora.protocol`); this module
groups the rows per setting (codec and parameters; the profile is not a parameter) and protocol: in-source (A on SA,
B on SB), cross-source (A on SB, B on SA) and own files, with the ratio (all bytes of all runs) and the mean
continuation-perplexity increase over documents, code and prose apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kvpack.bench.codecs import label
from kvpack.bench.rows import fmt

PROTOCOLS = ("in-source", "cross-source", "own files")


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(rows, calibrations)`` of the JSON files: evaluation rows (``{"rows": [...]}`` of bench codecs, a list of
    rows or one row of eval) and calibration records (``kvpack calibrate --json``: ``"kind": "calibration"``)."""
    rows: list[dict[str, Any]] = []
    calibrations: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and data.get("kind") == "calibration":
            calibrations.append(data)
            continue
        if isinstance(data, dict):
            data = data.get("rows", [data])
        rows += data
    for row in rows:
        if "sources" not in row:
            raise ValueError(f"a row of {row.get('codec')} has no sources: it predates the cross-source protocol")
    return rows, calibrations


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratio (byte totals), mean Δppl over all documents and per kind, and the runs (calibrated on -> evaluated on)."""
    docs = [d for r in rows for d in r["per_document"]]
    return {
        "ratio": sum(r["fp16_bytes"] for r in rows) / sum(r["stored_bytes"] for r in rows),
        "ppl_increase_pct": _mean([d["ppl_increase_pct"] for d in docs]),
        "ppl_increase_pct_code": _mean([d["ppl_increase_pct"] for d in docs if d["kind"] == "code"]),
        "ppl_increase_pct_prose": _mean([d["ppl_increase_pct"] for d in docs if d["kind"] == "prose"]),
        "documents": len(docs),
        "runs": [_run(r) for r in rows],
    }


def _run(row: dict[str, Any]) -> str:
    calibrated = "+".join(row.get("calibration_sources") or []) or "?"
    return f"{calibrated} -> {'+'.join(row['sources'])}"


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting of a calibrated codec with rows of a known protocol: ``{"setting", PROTOCOL: cell or
    None, ...}``, settings in the order they first appear."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("profile") and row.get("protocol") in PROTOCOLS:
            out.setdefault(label(row), {"setting": label(row), **dict.fromkeys(PROTOCOLS)})
    for name, entry in out.items():
        for p in PROTOCOLS:
            chosen = [r for r in rows if label(r) == name and r.get("protocol") == p]
            entry[p] = _cell(chosen) if chosen else None
    return list(out.values())


def unprofiled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings of codecs without a profile (nothing was learnt from any source, so no protocol applies), one entry
    per setting and evaluated source set: ``{"setting", "evaluated on", **cell}``, in the order they first appear."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("profile"):
            where = "own files" if row.get("protocol") == "own files" else "+".join(row["sources"])
            groups.setdefault((label(row), where), []).append(row)
    return [{"setting": name, "evaluated on": where, **_cell(chosen)} for (name, where), chosen in groups.items()]


#: Summary columns per protocol: (heading, key of the cell); own files that are neither code nor prose by their
#: suffix count in the own-files Δppl only.
_KINDS = (("ratio", "ratio"), ("code %", "ppl_increase_pct_code"), ("prose %", "ppl_increase_pct_prose"))
CELLS = {p: _KINDS for p in PROTOCOLS[:2]} | {"own files": (*_KINDS, ("Δppl %", "ppl_increase_pct"))}
SUMMARY_COLUMNS = ["setting"] + [f"{p} {heading}" for p, cells in CELLS.items() for heading, _ in cells]
UNPROFILED_COLUMNS = ["setting", "evaluated on", "ratio", "code %", "prose %", "Δppl %"]


def _summary_cells(entry: dict[str, Any]) -> list[str]:
    cells = [entry["setting"]]
    for p, keys in CELLS.items():
        cell = entry[p] or {}
        cells += [fmt(cell.get(key), ".2f" if key == "ratio" else "+.2f") for _, key in keys]
    return cells


def _unprofiled_cells(entry: dict[str, Any]) -> list[str]:
    return [entry["setting"], entry["evaluated on"], f"{entry['ratio']:.2f}",
            *(fmt(entry[k], "+.2f") for k in ("ppl_increase_pct_code", "ppl_increase_pct_prose", "ppl_increase_pct"))]


RUN_COLUMNS = ["setting", "profile", "calibrated on -> evaluated on", "protocol", "ratio", "Δppl %", "code %",
               "prose %", "KL mean", "enc MB/s", "dec MB/s"]


def _run_cells(row: dict[str, Any]) -> list[str]:
    profile = (row.get("profile") or {}).get("hash")
    return [label(row), profile[:8] if profile else "-", _run(row), row.get("protocol") or "-",
            f"{row['ratio']:.2f}", f"{row['ppl_increase_pct']:+.2f}", fmt(row.get("ppl_increase_pct_code"), "+.2f"),
            fmt(row.get("ppl_increase_pct_prose"), "+.2f"), f"{row['kl_mean']:.4f}", f"{row['encode_MBps']:.0f}",
            f"{row['decode_MBps']:.0f}"]


PROFILE_COLUMNS = ["profile", "codec", "calibrated on", "documents", "MB", "calibration s", "machine (load)"]


def _profile_cells(record: dict[str, Any]) -> list[str]:
    return [record["profile_hash"][:8], record["codec"], "+".join(record.get("calibration_sources") or []) or "-",
            str(len(record["documents"]) if record.get("documents") else record.get("n_documents")),
            f"{record['profile_bytes'] / 1e6:.1f}", f"{record['seconds']:.0f}",
            f"{record['machine']} ({record['load']:.1f})"]


def markdown(rows: list[dict[str, Any]], command: str, calibrations: Sequence[dict[str, Any]] = ()) -> str:
    """The results page: the summary per setting, codecs without a profile, the profiles (size and calibration
    time, from ``kvpack calibrate --json`` records), then every row (with its encode and decode MB/s)."""
    def table(columns: list[str], lines: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                *("| " + " | ".join(cells) + " |" for cells in lines)]

    page = ["# Cross-source evaluation", "", f"Produced by `{command}`.", "",
            "Per setting: ratio (fp16 bytes / stored bytes over every run of the protocol) and mean continuation-"
            "perplexity increase over code and prose documents. In-source: the profile was calibrated on the "
            "sources evaluated (other documents of them); cross-source: on none of them; own files: a user's files "
            "(`kvpack bench codecs --text` or `kvpack eval --text`; code or prose by suffix).", ""]
    page += table(SUMMARY_COLUMNS, [_summary_cells(e) for e in summary(rows)])
    if other := unprofiled(rows):
        page += ["", "Codecs without a profile (every source is unseen by them), per evaluated source set:", "",
                 *table(UNPROFILED_COLUMNS, [_unprofiled_cells(e) for e in other])]
    if calibrations:
        page += ["", "Profiles (`kvpack calibrate --json`):", "",
                 *table(PROFILE_COLUMNS, [_profile_cells(c) for c in calibrations])]
    page += ["", "Every run (MB/s of fp16 KV per second, encode and decode of every document; the machine's load "
             "during the runs moves them):", "", *table(RUN_COLUMNS, [_run_cells(r) for r in rows])]
    return "\n".join(page) + "\n"


def print_summary(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="cross-source: ratio and Δppl % (code, prose) per protocol")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for entry in summary(rows):
        table.add_row(*_summary_cells(entry))
    console.print(table)
