"""Where the encode and decode time of the rANS codecs goes: the rANS lanes against everything else.

For `lossless`, `fp8` and `kivi` (4 bits), on the KV caches of the first 1,536 tokens of two eval documents (one code,
one prose; SmolLM2 as `kvpack.models.load` computes it), coded whole (`doc`) and as 256-token chunks one by one, as
`kvpack bench speed` does: per round every setting is timed once, and each figure is the median over the rounds.
Inside each timed call, the time spent in `kvpack.entropy.rans.encode_lanes` (encode) or `decode_lanes` (decode) is
added up (the functions are wrapped; the codecs and the coder are unchanged). Reported per row: total and rANS
milliseconds, the rANS share, the lanes' rate (million symbols per second, all threads), the codec's fp16 MB/s, and
the MB/s the codec would reach if everything but the rANS lanes took no time (its ceiling with this rANS engine on
this host). Run from the repository root:

    .venv/bin/python docs/results/zen3/coding_split.py docs/results/zen3/coding-split.json

It writes the JSON, and the Markdown table (with the CPU, thread count and commit) beside it (``.md``).
"""

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numba
import torch

import kvpack.codecs.common as common
import kvpack.codecs.lossless as lossless
import kvpack.entropy.rans as rans
from kvpack import models
from kvpack.codecs import get
from kvpack.cpu import model_name
from kvpack.eval.corpora import documents
from kvpack.eval.quality import tokenize
from kvpack.inference import prefill
from kvpack.spec import ModelSpec

ROUNDS = 7
PREFIX = 1536
SETTINGS = {"lossless": {}, "fp8": {}, "kivi bits=4": {"bits": 4}}

spent = {"s": 0.0, "symbols": 0}


def timed(fn: Callable[..., Any], counts_output: bool) -> Callable[..., Any]:
    """``fn`` adding its wall-clock time and symbol count to ``spent``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        spent["s"] += time.perf_counter() - start
        spent["symbols"] += int(result.size if counts_output else args[0].size)
        return result

    return wrapper


rans.encode_lanes = timed(rans.encode_lanes, counts_output=False)  # pack() calls it through the module
common.decode_lanes = lossless.decode_lanes = timed(rans.decode_lanes, counts_output=True)

model, tokenizer = models.load()
spec = ModelSpec.from_model(model, tokenizer)
docs = documents(2)  # one code, one prose
caches = []
for doc in docs:
    ids, _ = tokenize(tokenizer, doc, PREFIX, 0)
    caches.append(prefill(model, spec, ids, step=256)[0])
fp16_bytes = [kv.data.numel() * 2 for kv in caches]

jobs = []  # (setting, chunk, op, calls); one call per cache (doc) or per chunk
for name, params in SETTINGS.items():
    codec = get(name.split()[0], **params)
    for kv in caches:
        for chunk, parts in (("doc", [kv]), ("256", kv.chunks(256))):
            blobs = [codec.encode(p) for p in parts]
            jobs.append((name, chunk, "encode", [lambda p=p, c=codec: c.encode(p) for p in parts]))
            jobs.append((name, chunk, "decode", [lambda b=b, c=codec: c.decode(b, spec) for b in blobs]))

# per (setting, chunk, op): per round, [seconds, rANS seconds, symbols] summed over the caches
samples: dict[tuple[str, str, str], list[list[float]]] = {}
for _ in range(ROUNDS):
    sums: dict[tuple[str, str, str], list[float]] = {}
    for name, chunk, op, calls in jobs:
        for call in calls:  # untimed, as bench speed's warm-up
            call()
        spent.update(s=0.0, symbols=0)
        start = time.perf_counter()
        for call in calls:
            call()
        seconds = time.perf_counter() - start
        acc = sums.setdefault((name, chunk, op), [0.0, 0.0, 0.0])
        acc[0] += seconds
        acc[1] += spent["s"]
        acc[2] += spent["symbols"]
    for key, acc in sums.items():
        samples.setdefault(key, []).append(acc)

mb = sum(fp16_bytes) / 1e6
rows = []
for (name, chunk, op), runs in samples.items():
    t, c = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    rows.append({"setting": name, "chunk": chunk, "op": op, "total_ms": 1e3 * t, "rans_ms": 1e3 * c,
                 "rans_share": c / t, "rans_msym_per_s": runs[0][2] / c / 1e6, "mb_per_s": mb / t,
                 "ceiling_mb_per_s": mb / c})

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
meta = {"cpu": model_name(), "threads": numba.get_num_threads(), "rounds": ROUNDS, "prefix": PREFIX,
        "documents": [d.name for d in docs], "commit": commit, "torch": torch.__version__, "numba": numba.__version__}
with open(sys.argv[1], "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
lines = [f"Produced by `.venv/bin/python docs/results/zen3/coding_split.py {sys.argv[1]}` (code as of {commit}): "
         f"{meta['cpu']}, {meta['threads']} numba threads, medians of {ROUNDS} rounds, the first {PREFIX} tokens of "
         f"{' and '.join(meta['documents'])}. rANS: the time inside the rANS lanes' encoder or decoder; MB/s are of "
         "fp16 KV; the last column is the MB/s the codec would reach if everything but the rANS lanes took no time.",
         "", "| setting | chunk | op | total ms | rANS ms | rANS share | rANS Msym/s | MB/s | MB/s if only rANS |",
         "|---|---|---|---|---|---|---|---|---|"]
for r in sorted(rows, key=lambda r: (r["op"], r["setting"], r["chunk"])):
    lines.append(f"| {r['setting']} | {r['chunk']} | {r['op']} | {r['total_ms']:.1f} | {r['rans_ms']:.1f} | "
                 f"{100 * r['rans_share']:.0f}% | {r['rans_msym_per_s']:.0f} | {r['mb_per_s']:.0f} | "
                 f"{r['ceiling_mb_per_s']:.0f} |")
with open(sys.argv[1].removesuffix(".json") + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
