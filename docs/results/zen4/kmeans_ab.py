"""In-process A/B of the row-class k-means (``kvpack.codecs.clusters``) before and after a77a9ef, issue 12.

Usage::

    git show a77a9ef^:src/kvpack/codecs/clusters.py > /tmp/clusters_before.py
    .venv/bin/python docs/results/zen4/kmeans_ab.py /tmp/clusters_before.py OUT.json

The 6 eval caches of ``kvpack bench speed`` (1,536 tokens each), cut in 256-token chunks, are encoded by ``fp8``,
``lossless`` and ``kivi`` (4 and 2 bits) with the earlier module's ``assign_classes`` (A) and the working tree's (B)
swapped into ``kvpack.codecs.common``: first once each, every chunk's bytes compared (they must be identical), then
7 rounds in alternating order; per document the median over rounds, then the median over documents, in MB/s of
fp16 KV.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time

import torch

from kvpack.bench import speed
from kvpack.cli import DEFAULT_MODEL, corpus, load_model
from kvpack.codecs import clusters, common, get
from kvpack.cpu import model_name

SETTINGS: tuple[tuple[str, dict[str, int]], ...] = (("fp8", {}), ("lossless", {}), ("kivi", {"bits": 4}),
                                                     ("kivi", {"bits": 2}))


def main(before: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("clusters_before", before)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {before}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["clusters_before"] = module
    spec.loader.exec_module(module)
    impl = {"A": module.assign_classes, "B": clusters.assign_classes}
    lm, tok, model_spec = load_model(DEFAULT_MODEL)
    entries = speed.caches(lm, tok, model_spec, corpus(6, "eval", None), 1536)
    rows = []
    for name, params in SETTINGS:
        codec = get(name, **params)
        rates: dict[str, list[float]] = {"A": [], "B": []}
        for doc, kv in entries:
            parts = list(kv.chunks(256))
            blobs = {}
            for k in "AB":
                common.assign_classes = impl[k]
                blobs[k] = [codec.encode(p) for p in parts]
            if blobs["A"] != blobs["B"]:
                raise SystemExit(f"{name} {params}: bytes differ on {doc.name}")
            times: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(7):
                for k in "AB" if r % 2 else "BA":
                    common.assign_classes = impl[k]
                    t0 = time.perf_counter()
                    for p in parts:
                        codec.encode(p)
                    times[k].append(time.perf_counter() - t0)
            for k in "AB":
                rates[k].append(kv.fp16_bytes / statistics.median(times[k]) / 1e6)
        a, b = statistics.median(rates["A"]), statistics.median(rates["B"])
        rows.append({"codec": name, "params": params, "encode_mb_per_s_before": a, "encode_mb_per_s_after": b,
                     "speedup": b / a, "bytes_identical": True})
        print(f"{name} {params}: {a:.0f} -> {b:.0f} MB/s ({b / a:.2f}x), bytes identical", flush=True)
    common.assign_classes = clusters.assign_classes
    with open(out, "w") as f:
        json.dump({"cpu": model_name(), "threads": torch.get_num_threads(), "chunk_tokens": 256,
                   "documents": [doc.name for doc, _ in entries], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
