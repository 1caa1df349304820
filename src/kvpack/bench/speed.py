"""`kvpack bench speed`: size, speed and error of the codecs on real KV caches, against zstd and ZipNN.

The caches are the model's own: the first ``prefix`` tokens of each eval document (half code, half prose),
prefilled once. On them every setting of :data:`SETTINGS` (plus any the caller adds) is measured:

* ``ratio``: fp16 bytes of the cache / bytes of the container(s), every byte counted, both with the whole document
  in one container (``chunk_tokens`` null) and cut into 256-token chunks as the store keeps them; the setting
  ``lossless as=float16`` first casts the cache to float16 (fp16 KV, as an fp16 model would make it);
* ``bits_per_element`` = 16 / ratio; ``rel_rmse_k`` / ``rel_rmse_v``: ``||x - x̂|| / ||x||`` over all keys / values;
* ``encode_mb_per_s`` / ``decode_mb_per_s``: fp16 bytes per second of wall-clock time, numba's default thread count
  (``threads``), for the whole document in one container and for all its 256-token chunks one after the other
  (each row's ``chunk_tokens``); ``*_mb_per_cpu_s`` per second of the process's CPU time (all threads), which shows
  the work done per CPU-second when other processes compete. Per document, after a warm-up, every measurement of
  every setting (and the zstd -3 decode) is timed once per round for ``repeats`` rounds
  (:func:`kvpack.bench.timing.round_medians`), and each takes its median: a slow spell of the machine weighs on all
  rows alike instead of on the few being timed in it. A fixed rANS encode on one thread and on all of them, timed in
  the same rounds (``host_check_msym_per_s``), says how fast the machine ran meanwhile;

and the anchors on the same bytes (the cache's own dtype, bf16 for SmolLM2): zstd levels 3 and 19 and ZipNN
(``zipnn`` package, byte input in bfloat16 mode; ``zipnn_exact`` says whether its output decompressed bit-exactly).
Rows are per setting, summed (bytes) or medianed (speeds) over the documents, and name the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numba
import torch
import zstandard
from rich.console import Console
from rich.table import Table

from kvpack import allocator
from kvpack.bench import entropy as entropy_bench
from kvpack.bench.rows import profile_tag
from kvpack.bench.timing import round_medians
from kvpack.codecs import get
from kvpack.codecs.base import Codec
from kvpack.codecs.calibrated import CalibratedCodec
from kvpack.codecs.raw import tensor_bytes
from kvpack.codecs.transform import Transform
from kvpack.codecs.transform.codec import decode_precision
from kvpack.cpu import model_name
from kvpack.entropy import encode_lanes
from kvpack.eval import progress_bar
from kvpack.eval.corpora import Document
from kvpack.eval.quality import tokenize
from kvpack.inference import prefill
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

#: (codec name, parameters) measured, in table order; ``"as": dtype`` (not a codec parameter) casts the cache first.
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lossless", {}),
    ("lossless", {"as": "float16"}),
    ("fp8", {}),
    ("kivi", {"bits": 4}),
    ("kivi", {"bits": 3}),
    ("kivi", {"bits": 2}),
    ("kivi", {"bits": 2, "residual": 128}),
)
STORE_CHUNK = 256


def _each(fn: Callable[[Any], object], items: Sequence[Any]) -> None:
    """``fn`` on every item in turn (a store coding a document's chunks one by one)."""
    for item in items:
        fn(item)


def _rel_rmse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(x.double().square().sum()) for x in a)
    return (num / den) ** 0.5 if den else 0.0


def _anchors(kv: KVCache) -> tuple[dict[str, Any], bytes]:
    """Byte counts of zstd -3 / -19 and ZipNN on the cache's raw bytes, and the zstd -3 frame (its decode is timed
    in the rounds with the codecs)."""
    import zipnn

    raw = tensor_bytes(kv.data)
    z3 = zstandard.ZstdCompressor(level=3).compress(raw)
    z19 = zstandard.ZstdCompressor(level=19).compress(raw)
    zn = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=numba.get_num_threads())
    packed = zn.compress(raw)
    exact = bytes(zn.decompress(packed)) == raw
    return {"raw": len(raw), "zstd3": len(z3), "zstd19": len(z19), "zipnn": len(packed), "zipnn_exact": exact}, z3


def _host_check() -> tuple[int, list[Callable[[], object]]]:
    """``(symbols, runs)``: one rANS encode (``bench entropy``'s ``laplace-a16`` case, 2M symbols) on one thread and
    on numba's thread count. Timed in the rounds with the codecs, they say how fast this machine's cores ran while
    the rows were taken (a shared VM's second core can be slow for minutes; the one-thread zstd anchor does not see
    that). Timed like the codecs, without the untimed run ``bench entropy`` puts before each timed one, so they
    compare like with like between speed pages, and with ``bench entropy``'s rows only roughly."""
    symbols, starts, table, freqs = entropy_bench.case_stream("laplace-a16")
    return symbols.size, [partial(encode_lanes, symbols, starts, table, freqs, threads=threads)
                          for threads in (1, numba.get_num_threads())]


def _as_dtype(kv: KVCache, dtype: str | None) -> KVCache:
    """``kv`` cast to KV dtype ``dtype`` (the spec says so too), or ``kv`` itself for ``None``."""
    if dtype is None:
        return kv
    spec = dataclasses.replace(kv.spec, dtype=dtype)
    return KVCache(spec=spec, data=kv.data.to(spec.torch_dtype), positions=kv.positions)


def caches(model: Any, tokenizer: Any, spec: ModelSpec, docs: Sequence[Document], prefix: int
           ) -> list[tuple[Document, KVCache]]:
    """The KV cache of the first ``prefix`` tokens of every document, with a progress bar."""
    out = []
    with progress_bar() as bar:
        task = bar.add_task("prefilling", total=len(docs) * prefix)
        for i, doc in enumerate(docs):
            bar.update(task, description=f"prefilling {doc.name}")
            ids, _ = tokenize(tokenizer, doc, prefix, 0)

            def advance(n: int, done: int = i * prefix) -> None:
                bar.update(task, completed=done + n)

            out.append((doc, prefill(model, spec, ids, step=256, on_progress=advance)[0]))
    return out


def _profile(codec: Codec) -> dict[str, str] | None:
    """A calibrated codec's profile as the rows name it (None for the others)."""
    return {"hash": codec.calibration.hash} if isinstance(codec, CalibratedCodec) else None


def run(entries: Sequence[tuple[Document, KVCache]], extra: Sequence[Codec] = (), json_path: Path | None = None,
        console: Console | None = None, repeats: int = 5, anchors: bool = True, defaults: bool = True
        ) -> list[dict[str, Any]]:
    """Measure every setting (:data:`SETTINGS` unless not ``defaults``, then ``extra``) on ``entries``; print a
    table, optionally write JSON rows."""
    console = console or Console()
    settings = [(name, setting, get(name, **{k: v for k, v in setting.items() if k != "as"}))
                for name, setting in (SETTINGS if defaults else ())] + [(c.name, c.params(), c) for c in extra]
    machine: dict[str, Any] = {"cpu": model_name(), "cores": os.cpu_count(), "load_1min": os.getloadavg()[0],
                               "threads": numba.get_num_threads(), "threading_layer": None,
                               "malloc_tuned": allocator.TUNED,
                               "transform_gemm": decode_precision()}
    acc: dict[str, dict[str, Any]] = {}
    base: dict[str, Any] = {"raw": 0, "zstd3": 0, "zstd19": 0, "zipnn": 0, "zipnn_exact": True, "fp16": 0,
                            "zstd3_decode_s": []}
    n_check, checks = _host_check()
    check_rates: list[list[float]] = [[] for _ in checks]
    for doc, cache in entries:
        base["fp16"] += cache.fp16_bytes
        timed: list[Callable[[], object]] = list(checks)
        if anchors:
            with console.status(f"anchors on {doc.name} ..."):
                a, z3 = _anchors(cache)
            for key in ("raw", "zstd3", "zstd19", "zipnn"):
                base[key] += a[key]
            base["zipnn_exact"] &= a["zipnn_exact"]
            timed.append(partial(zstandard.ZstdDecompressor().decompress, z3))
        labels = []
        for name, setting, codec in settings:
            label = name + "".join(f" {k}={v}" for k, v in setting.items() if v is not None) + \
                profile_tag({"profile": _profile(codec)})
            kv = _as_dtype(cache, setting.get("as"))
            with console.status(f"{label} on {doc.name} ..."):
                data = codec.encode(kv)
                out = codec.decode(data)
                parts = list(kv.chunks(STORE_CHUNK))
                blobs = [codec.encode(part) for part in parts]
            timed += [partial(codec.encode, kv), partial(codec.decode, data),
                      partial(_each, codec.encode, parts), partial(_each, codec.decode, blobs)]
            labels.append(label)
            row = acc.setdefault(label, {"codec": name, "params": codec.params(), "bytes": 0, "chunked_bytes": 0,
                                         "err_k": [], "err_v": [], "profile": _profile(codec), "encode_gemm": (
                                             str(codec.encode_dtype()).removeprefix("torch.")
                                             if isinstance(codec, Transform) else None), "components": (
                                             codec.allocation().info.get("components")
                                             if isinstance(codec, Transform) else None)})
            row["bytes"] += len(data)
            row["chunked_bytes"] += sum(len(b) for b in blobs)
            row["err_k"].append(_rel_rmse(kv.keys, out.keys))
            row["err_v"].append(_rel_rmse(kv.values, out.values))
        what = f"timing {len(timed)} measurements on {doc.name}"
        with console.status(f"{what} in {repeats} rounds ...") as status:

            def done(i: int, what: str = what, status: Any = status) -> None:
                status.update(f"{what}: round {i + 1} of {repeats} done")

            times = round_medians(timed, repeats, on_round=done)
        for rates in check_rates:
            rates.append(n_check / times.pop(0)[0] / 1e6)
        if anchors:
            base["zstd3_decode_s"].append(cache.fp16_bytes / times.pop(0)[0])
        for i, label in enumerate(labels):
            row = acc[label]
            for k, (key, chunk) in enumerate((("enc", None), ("dec", None), ("enc", STORE_CHUNK),
                                              ("dec", STORE_CHUNK))):
                wall, cpu = times[4 * i + k]
                row.setdefault(f"{key}@{chunk}", []).append(cache.fp16_bytes / wall / 1e6)
                row.setdefault(f"{key}_cpu@{chunk}", []).append(cache.fp16_bytes / cpu / 1e6)
    machine["threading_layer"] = numba.threading_layer()
    machine["host_check_msym_per_s"] = [statistics.median(rates) for rates in check_rates]
    fp16 = base["fp16"]
    rows: list[dict[str, Any]] = []
    for label, r in acc.items():
        for chunk, size in ((None, r["bytes"]), (STORE_CHUNK, r["chunked_bytes"])):
            rows.append({"setting": label, "codec": r["codec"], "params": r["params"], "profile": r["profile"],
                         "encode_gemm": r["encode_gemm"], "components": r["components"],
                         "chunk_tokens": chunk,
                         "ratio": fp16 / size, "bits_per_element": 16 * size / fp16,
                         "encode_mb_per_s": statistics.median(r[f"enc@{chunk}"]),
                         "decode_mb_per_s": statistics.median(r[f"dec@{chunk}"]),
                         "encode_mb_per_cpu_s": statistics.median(r[f"enc_cpu@{chunk}"]),
                         "decode_mb_per_cpu_s": statistics.median(r[f"dec_cpu@{chunk}"]),
                         "rel_rmse_k": statistics.mean(r["err_k"]), "rel_rmse_v": statistics.mean(r["err_v"]),
                         "documents": [doc.name for doc, _ in entries], **machine})
    if anchors:
        for label, key in (("zstd -3", "zstd3"), ("zstd -19", "zstd19"), ("zipnn (bf16)", "zipnn")):
            rows.append({"setting": label, "codec": key, "params": {}, "chunk_tokens": None,
                         "ratio": fp16 / base[key], "bits_per_element": 16 * base[key] / fp16,
                         "encode_mb_per_s": None,
                         "decode_mb_per_s": statistics.median(base["zstd3_decode_s"]) / 1e6 if key == "zstd3"
                         else None,
                         "rel_rmse_k": 0.0, "rel_rmse_v": 0.0, "documents": [doc.name for doc, _ in entries],
                         **({"zipnn_exact": base["zipnn_exact"]} if key == "zipnn" else {}), **machine})
    _print(console, rows)
    if json_path is not None:
        json_path.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_path}")
    return rows


COLUMNS = ("setting", "chunk", "ratio", "bits/el", "enc MB/s", "dec MB/s", "dec MB/cpu-s", "rel RMSE K",
           "rel RMSE V")


def _cells(r: dict[str, Any]) -> list[str]:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return [r["setting"], fmt(r["chunk_tokens"], "d") if r["chunk_tokens"] else "doc", f"{r['ratio']:.3f}",
            f"{r['bits_per_element']:.3f}", fmt(r["encode_mb_per_s"], ".0f"), fmt(r["decode_mb_per_s"], ".0f"),
            fmt(r.get("decode_mb_per_cpu_s"), ".0f"), f"{r['rel_rmse_k']:.4f}", f"{r['rel_rmse_v']:.4f}"]


def _title(rows: list[dict[str, Any]]) -> str:
    m = rows[0]
    gemm = f", transform/kvtc decode GEMM in {m['transform_gemm']}" if "transform_gemm" in m else ""
    encodes = {r["setting"]: (r["encode_gemm"], r.get("components")) for r in rows if r.get("encode_gemm")}
    gemm += "".join(f", {setting} encode GEMM in {dtype}" + (f" ({n} components)" if n else "")
                    for setting, (dtype, n) in encodes.items())
    check = m.get("host_check_msym_per_s")  # pages from before the check existed have none
    host = (f", host check in the rounds: rANS encode {check[0]:.0f} Msym/s on 1 thread, {check[1]:.0f} on "
            f"{m['threads']} (`bench entropy` laplace-a16)") if check else ""
    return (f"codecs on {len(m['documents'])} real eval caches: {m['cpu']}, {m['cores']} cores, {m['threads']} numba "
            f"threads ({m['threading_layer']}), load {m['load_1min']:.1f}{host}{_malloc(m)}{gemm}")


def _malloc(m: dict[str, Any]) -> str:
    """How malloc ran (:mod:`kvpack.allocator`); rows from before the setting existed say nothing."""
    if "malloc_tuned" not in m:
        return ""
    return ", malloc tuned by kvpack" if m["malloc_tuned"] else ", glibc malloc defaults"


def _print(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title=_title(rows))
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in rows:
        table.add_row(*_cells(r))
    console.print(table)


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    """docs/results/speed.md from the rows."""
    lines = ["# Codec size and speed on SmolLM2-135M KV caches", "", f"Produced by `{command}`: {_title(rows)}.", "",
             f"Documents: {', '.join(rows[0]['documents'])}. Ratio = fp16 bytes / stored bytes, every byte counted, "
             "for the whole prefix in one container (`doc`) and cut into 256-token chunks as the store keeps them. "
             "MB/s are of fp16 KV per second of wall-clock time, coding the whole prefix at once (`doc`) or its "
             "256-token chunks one by one (per document, every row and the zstd -3 decode timed once per round, "
             "median over rounds; then the median over documents); MB/cpu-s per second of the process's CPU time. "
             "zstd and ZipNN compress the cache's own bf16 bytes.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
