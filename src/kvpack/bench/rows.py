"""The standard results table of quality rows (``kvpack eval``, ``kvpack bench codecs`` and the codec benchmarks)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = ("codec", "params", "ratio", "bits/el", "Δppl %", "code %", "prose %", "KL mean", "KL p99", "top-1",
           "greedy", "passkey (ref) +/-", "key log p (ref)", "enc MB/s", "dec MB/s")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` for a missing value (the results pages' tables)."""
    return "-" if value is None else format(value, spec)


def profile_tag(row: dict[str, Any]) -> str:
    """`` [hash]`` of a row's calibration profile (``row["profile"]["hash"]``; empty without one): rows of one
    setting under different profiles differ only there."""
    profile = row.get("profile")
    return f" [{profile['hash'][:8]}]" if profile else ""


def passkey_cells(row: dict[str, Any]) -> tuple[str, str]:
    """A row's passkey accuracy ``acc (reference's) +gained/-lost`` and mean key log-probability ``lp (reference's)``
    (``-`` without passkey trials; rows written before the key log-probability was recorded show its ``-``)."""
    if row.get("passkey_accuracy") is None:
        return "-", "-"
    accuracy = f"{row['passkey_accuracy']:.2f} ({row['passkey_accuracy_reference']:.2f})"
    if row.get("passkey_gained") is None:
        return accuracy, "-"
    return (f"{accuracy} +{row['passkey_gained']}/-{row['passkey_lost']}",
            f"{row['passkey_key_logprob']:.2f} ({row['passkey_key_logprob_reference']:.2f})")


def print_rows(rows: list[dict[str, Any]], title: str, console: Console | None = None) -> None:
    """Print the rows of :func:`kvpack.eval.evaluate` as one table: ratio, quality metrics and MB/s per codec."""
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("codec", "params") else "right")
    for r in rows:
        params = ",".join(f"{k}={v}" for k, v in r["params"].items() if v is not None)
        table.add_row(r["codec"], params, f"{r['ratio']:.2f}", f"{r['bits_per_element']:.2f}",
                      fmt(r["ppl_increase_pct"], "+.2f"), fmt(r.get("ppl_increase_pct_code"), "+.2f"),
                      fmt(r.get("ppl_increase_pct_prose"), "+.2f"), fmt(r["kl_mean"], ".4f"),
                      fmt(r["kl_p99"], ".3f"), fmt(r["top1_agreement"], ".3f"), fmt(r["greedy_agreement"], ".2f"),
                      *passkey_cells(r), fmt(r["encode_MBps"], ".0f"), fmt(r["decode_MBps"], ".0f"))
    (console or Console()).print(table)


def show_and_save(rows: list[dict[str, Any]], title: str, columns: Sequence[str],
                  cells: Callable[[dict[str, Any]], list[str]], console: Console, json_path: Path | None,
                  left: str) -> None:
    """Print ``rows`` as one table (``cells(row)`` under ``columns``; column ``left`` left-aligned, the others
    right) and write them as JSON to ``json_path`` when given (the measurement benchmarks' common ending)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == left else "right")
    for r in rows:
        table.add_row(*cells(r))
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_path}")
