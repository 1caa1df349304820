"""rANS engine benchmark: encode/decode throughput at 1 and 2 threads, and bits/symbol against the entropy.

Behind ``kvpack bench entropy [--json PATH]``. Streams are synthetic but shaped like quantized KV channels: many
lanes, each with its own discretized Laplace or Gaussian (random scale) and its own table quantized from its own
counts, plus a skewed case (almost all mass on one symbol), a case with tables shared by 16 lanes each, and short
(2K-symbol) lanes. ``bits_per_symbol`` counts the whole :func:`kvpack.entropy.pack` blob without tables (words,
per-lane counts, header); ``table_bytes`` are the tables it would carry inline. ``entropy_bits_per_symbol`` is the
empirical entropy of the symbols coded with each table, i.e. the least any coder with one static table per group
can spend. Times are the median of ``REPEATS`` runs of :func:`encode_lanes` / :func:`decode_lanes` after a warm-up,
one and two threads alternating, each timed run right after an untimed one
(:func:`kvpack.bench.timing.round_medians`; a thread that has slept since its last call takes long to wake on a VM:
0.9 ms of a 2.9 ms two-thread encode of 2M symbols here):
``*_msym_per_s`` from wall-clock time, ``*_msym_per_cpu_s`` from the process's CPU time (all its threads), which
shows what the code does per CPU-second it actually got when other processes compete for the cores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np
from rich.console import Console
from rich.table import Table

from kvpack.bench.timing import round_medians
from kvpack.cpu import model_name
from kvpack.entropy import counts_to_tables, decode_lanes, encode_lanes, pack, pack_tables, quantize_freqs

REPEATS = 15
LANE_SYMBOLS = 8192
N_LANES = 256


def _laplace(rng: np.random.Generator, n_lanes: int, lane: int, alphabet: int) -> np.ndarray:
    scale = rng.uniform(0.5, alphabet / 8, (n_lanes, 1))
    v = np.round(rng.laplace(0.0, 1.0, (n_lanes, lane)) * scale) + alphabet // 2
    return np.clip(v, 0, alphabet - 1).astype(np.uint8).ravel()


def _gauss(rng: np.random.Generator, n_lanes: int, lane: int, alphabet: int) -> np.ndarray:
    sigma = rng.uniform(1.0, alphabet / 8, (n_lanes, 1))
    v = np.round(rng.normal(0.0, 1.0, (n_lanes, lane)) * sigma) + alphabet // 2
    return np.clip(v, 0, alphabet - 1).astype(np.uint8).ravel()


def _skewed(rng: np.random.Generator, n_lanes: int, lane: int, alphabet: int) -> np.ndarray:
    rare = rng.random((n_lanes, lane)) < 0.02
    return np.where(rare, rng.integers(0, alphabet, (n_lanes, lane)), 0).astype(np.uint8).ravel()


# name, generator, alphabet, symbols per lane, lanes per table
CASES: list[tuple[str, Callable[[np.random.Generator, int, int, int], np.ndarray], int, int, int]] = [
    ("laplace-a16", _laplace, 16, LANE_SYMBOLS, 1),
    ("gauss-a64", _gauss, 64, LANE_SYMBOLS, 1),
    ("skewed-a16", _skewed, 16, LANE_SYMBOLS, 1),
    ("laplace-a16-shared16", _laplace, 16, LANE_SYMBOLS, 16),
    ("laplace-a16-2k", _laplace, 16, 2048, 1),
]


def _entropy_bits(symbols: np.ndarray, group: np.ndarray, n_groups: int, alphabet: int) -> float:
    """Total empirical entropy in bits of ``symbols`` coded with one static table per group."""
    counts = np.bincount(group * alphabet + symbols, minlength=n_groups * alphabet).reshape(n_groups, alphabet)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.nansum(counts * np.log2(p)))


def case_stream(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stream of case ``name`` of :data:`CASES` (deterministic): ``(symbols, lane_starts, lane_table, freqs)``,
    the arguments of :func:`encode_lanes`. ``kvpack bench speed`` times ``laplace-a16`` as its host check."""
    _, gen, alphabet, lane, share = next(case for case in CASES if case[0] == name)
    n_lanes = N_LANES * LANE_SYMBOLS // lane
    symbols = gen(np.random.default_rng(0), n_lanes, lane, alphabet)
    starts = np.arange(n_lanes + 1, dtype=np.int64) * lane
    if share == 1:
        return symbols, starts, np.arange(n_lanes, dtype=np.int32), counts_to_tables(symbols, starts, alphabet)
    lane_table = (np.arange(n_lanes) // share).astype(np.int32)
    group = np.repeat(lane_table.astype(np.int64), lane)
    n_tables = int(lane_table[-1]) + 1
    counts = np.bincount(group * alphabet + symbols, minlength=n_tables * alphabet)
    return symbols, starts, lane_table, quantize_freqs(counts.reshape(n_tables, alphabet))


def _case_rows(name: str, alphabet: int, lane: int, thread_counts: list[int]) -> list[dict[str, Any]]:
    symbols, starts, lane_table, freqs = case_stream(name)
    n_lanes = starts.size - 1
    n = symbols.size
    blob_bits = 8 * len(pack(symbols, starts, lane_table, freqs, include_tables=False))
    entropy = _entropy_bits(symbols, np.repeat(lane_table.astype(np.int64), lane), freqs.shape[0], alphabet)
    words, offsets = encode_lanes(symbols, starts, lane_table, freqs)
    for threads in thread_counts:
        if not np.array_equal(decode_lanes(words, offsets, starts, lane_table, freqs, threads=threads), symbols):
            raise RuntimeError(f"rANS round trip failed on case {name}")
    encodes = round_medians([partial(encode_lanes, symbols, starts, lane_table, freqs, threads=threads)
                             for threads in thread_counts], REPEATS, primed=True)
    decodes = round_medians([partial(decode_lanes, words, offsets, starts, lane_table, freqs, threads=threads)
                             for threads in thread_counts], REPEATS, primed=True)
    rows = []
    for threads, t_enc, t_dec in zip(thread_counts, encodes, decodes, strict=True):
        rows.append(
            {
                "case": name,
                "threads": threads,
                "encode_msym_per_s": n / t_enc[0] / 1e6,
                "decode_msym_per_s": n / t_dec[0] / 1e6,
                "encode_msym_per_cpu_s": n / t_enc[1] / 1e6,
                "decode_msym_per_cpu_s": n / t_dec[1] / 1e6,
                "bits_per_symbol": blob_bits / n,
                "entropy_bits_per_symbol": entropy / n,
                "overhead_pct": 100.0 * (blob_bits / entropy - 1.0),
                "table_bytes": len(pack_tables(freqs)),
                "alphabet": alphabet,
                "n_lanes": n_lanes,
                "lane_symbols": lane,
                "n_tables": int(freqs.shape[0]),
            }
        )
    return rows


def run(json_path: Path | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Run every case at 1 and 2 threads (as far as numba has threads); print a table, optionally write JSON.

    Returns one row per (case, threads) with ``case``, ``threads``, ``encode_msym_per_s``, ``decode_msym_per_s``,
    ``bits_per_symbol``, ``entropy_bits_per_symbol``, ``overhead_pct``, the CPU-time rates and the case's shape;
    every row also names the machine (``cpu``, ``cores``, ``load_1min`` at the start, numba and its threading
    layer).
    """
    console = console or Console()
    machine: dict[str, Any] = {
        "cpu": model_name(),
        "cores": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "numba": numba.__version__,
    }
    thread_counts = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    with console.status("benchmarking the rANS engine ..."):
        for name, _, alphabet, lane, _ in CASES:
            rows += _case_rows(name, alphabet, lane, thread_counts)
    machine["threading_layer"] = numba.threading_layer()  # known once a parallel kernel has run
    rows = [{**r, **machine} for r in rows]
    table = Table(
        title=f"kvpack bench entropy (Msym/s): {machine['cpu']}, {machine['cores']} cores, "
        f"load {machine['load_1min']:.1f}"
    )
    columns = ("case", "lanes x len", "thr", "enc", "dec", "enc/cpu", "dec/cpu", "bits/sym", "entropy", "over %")
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in rows:
        table.add_row(
            r["case"],
            f"{r['n_lanes']} x {r['lane_symbols']}",
            str(r["threads"]),
            f"{r['encode_msym_per_s']:.0f}",
            f"{r['decode_msym_per_s']:.0f}",
            f"{r['encode_msym_per_cpu_s']:.0f}",
            f"{r['decode_msym_per_cpu_s']:.0f}",
            f"{r['bits_per_symbol']:.4f}",
            f"{r['entropy_bits_per_symbol']:.4f}",
            f"{r['overhead_pct']:+.2f}",
        )
    console.print(table)
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_path}")
    return rows


if __name__ == "__main__":
    run()
