"""In-process A/B of the transform decode's projection precisions (``$KVPACK_TRANSFORM_GEMM``), issue 12.

Usage: ``.venv/bin/python docs/results/zen4/int8_decode_ab.py PROFILE PRESET OUT.json``

The 6 eval caches of ``kvpack bench speed`` (1,536 tokens each), cut in 256-token chunks and encoded once (float32
projection); each document's chunks are decoded in bfloat16 and in int8 (``kvpack.codecs.transform.int8``) in
alternating order, 5 rounds, median per document, then the median over documents: MB/s of fp16 KV. Also the
squared error of each precision's decoded caches against the float32 decode's, summed over chunks, as a share of
the codec's own error (the float32 decode against the original cache).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from kvpack.bench import speed
from kvpack.cli import DEFAULT_MODEL, corpus, load_model, parse_setting
from kvpack.codecs.transform.codec import PROJECTION_ENV
from kvpack.cpu import model_name
from kvpack.kv import KVCache

PRECISIONS = ("bfloat16", "int8")


def squared_error(a: KVCache, b: KVCache) -> float:
    return float((a.data.float() - b.data.float()).pow(2).sum())


def main(profile: str, preset: str, out: str) -> None:
    lm, tok, spec = load_model(DEFAULT_MODEL)
    entries = speed.caches(lm, tok, spec, corpus(6, "eval", None), 1536)
    codec = parse_setting(f"transform:profile={profile},preset={preset}")
    rates: dict[str, list[float]] = {k: [] for k in PRECISIONS}
    error = dict.fromkeys(("own", *PRECISIONS), 0.0)
    for doc, kv in entries:
        os.environ[PROJECTION_ENV] = "float32"
        parts = list(kv.chunks(256))
        blobs = [codec.encode(p) for p in parts]
        exact = [codec.decode(b) for b in blobs]
        error["own"] += sum(squared_error(x, p) for x, p in zip(exact, parts, strict=True))
        times: dict[str, list[float]] = {k: [] for k in PRECISIONS}
        for k in PRECISIONS:
            os.environ[PROJECTION_ENV] = k
            error[k] += sum(squared_error(codec.decode(b), x) for b, x in zip(blobs, exact, strict=True))
        for r in range(5):
            for k in PRECISIONS if r % 2 else PRECISIONS[::-1]:
                os.environ[PROJECTION_ENV] = k
                t0 = time.perf_counter()
                for b in blobs:
                    codec.decode(b)
                times[k].append(time.perf_counter() - t0)
        for k in PRECISIONS:
            rates[k].append(kv.fp16_bytes / statistics.median(times[k]) / 1e6)
        print(doc.name, {k: round(v[-1]) for k, v in rates.items()}, flush=True)
    result = {"cpu": model_name(), "threads": torch.get_num_threads(), "profile_hash": codec.calibration.hash,
              "preset": preset, "documents": [doc.name for doc, _ in entries],
              "decode_mb_per_s": {k: statistics.median(v) for k, v in rates.items()},
              "decode_mb_per_s_per_document": rates,
              "error_share_of_codec_error": {k: error[k] / error["own"] for k in PRECISIONS}}
    print(json.dumps({k: result[k] for k in ("cpu", "decode_mb_per_s", "error_share_of_codec_error")}, indent=2))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])
