"""Where the encode and decode time of the rANS codecs goes: the rANS lanes against everything else.

For `lossless`, `fp8` and `kivi` (4 bits), on the KV caches of the first 1,536 tokens of two eval documents (one code,
one prose; SmolLM2 as `kvpack.models.load` computes it), coded whole (`doc`) and as 256-token chunks one by one. The
rANS calls each encode or decode makes (`kvpack.entropy.rans.encode_lanes`, `decode_lanes`) are recorded once; then
the codec's calls and those rANS calls alone are timed side by side with `kvpack.bench.timing.round_medians` (every
measurement once per round, each after an untimed run of itself; medians over the rounds), and the two caches'
medians are added. Reported per row: total and rANS milliseconds, the rANS share, the lanes' rate (million symbols
per second, all threads), the codec's fp16 MB/s, and the MB/s the codec would reach if everything but the rANS
lanes took no time (its ceiling with this rANS engine on this host). Run from the repository root:

    .venv/bin/python docs/results/zen3/coding_split.py docs/results/zen3/coding-split.json

It writes the JSON, and the Markdown table (with the CPU, thread count and commit) beside it (``.md``).
"""

import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numba
import torch

import kvpack.codecs.common as common
import kvpack.codecs.lossless as lossless
import kvpack.entropy.rans as rans
from kvpack import models
from kvpack.bench.timing import round_medians
from kvpack.codecs import get
from kvpack.cpu import model_name
from kvpack.eval.corpora import documents
from kvpack.eval.quality import tokenize
from kvpack.inference import prefill
from kvpack.spec import ModelSpec

ROUNDS = 7
PREFIX = 1536
SETTINGS = {"lossless": {}, "fp8": {}, "kivi bits=4": {"bits": 4}}


def _each(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()

captured: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []  # the rANS calls of one job


def capturing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, also recording each call in ``captured``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        captured.append((fn, args, kwargs))
        return fn(*args, **kwargs)

    return wrapper


encode_lanes, decode_lanes = rans.encode_lanes, rans.decode_lanes
rans.encode_lanes = capturing(encode_lanes)  # pack() calls it through the module
common.decode_lanes = lossless.decode_lanes = capturing(decode_lanes)

model, tokenizer = models.load()
spec = ModelSpec.from_model(model, tokenizer)
docs = documents(2)  # one code, one prose
caches = []
for doc in docs:
    ids, _ = tokenize(tokenizer, doc, PREFIX, 0)
    caches.append(prefill(model, spec, ids, step=256)[0])

keys, fns, symbols = [], [], []  # per job (setting, chunk, op, cache): the codec's calls, then its rANS calls alone
for name, params in SETTINGS.items():
    codec = get(name.split()[0], **params)
    for kv in caches:
        for chunk, parts in (("doc", [kv]), ("256", kv.chunks(256))):
            blobs = [codec.encode(p) for p in parts]
            for op, calls in (("encode", [partial(codec.encode, p) for p in parts]),
                              ("decode", [partial(codec.decode, b, spec) for b in blobs])):
                captured.clear()
                for call in calls:
                    call()
                lanes = list(captured)
                keys.append((name, chunk, op))
                fns += [partial(_each, calls), partial(_each, [partial(f, *a, **k) for f, a, k in lanes])]
                symbols.append(sum(int(a[0].size) if f is encode_lanes else int(a[2][-1]) for f, a, _ in lanes))
rans.encode_lanes, common.decode_lanes, lossless.decode_lanes = encode_lanes, decode_lanes, decode_lanes

times = round_medians(fns, ROUNDS, primed=True)
totals: dict[tuple[str, str, str], list[float]] = {}  # seconds, rANS seconds, symbols: summed over the caches
for i, key in enumerate(keys):
    acc = totals.setdefault(key, [0.0, 0.0, 0.0])
    acc[0] += times[2 * i][0]
    acc[1] += times[2 * i + 1][0]
    acc[2] += symbols[i]

mb = sum(kv.data.numel() * 2 for kv in caches) / 1e6
rows = [{"setting": name, "chunk": chunk, "op": op, "total_ms": 1e3 * t, "rans_ms": 1e3 * c, "rans_share": c / t,
         "rans_msym_per_s": n / c / 1e6, "mb_per_s": mb / t, "ceiling_mb_per_s": mb / c}
        for (name, chunk, op), (t, c, n) in totals.items()]

commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
meta = {"cpu": model_name(), "threads": numba.get_num_threads(), "rounds": ROUNDS, "prefix": PREFIX,
        "documents": [d.name for d in docs], "commit": commit, "torch": torch.__version__, "numba": numba.__version__}
with open(sys.argv[1], "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
lines = [f"Produced by `.venv/bin/python docs/results/zen3/coding_split.py {sys.argv[1]}` (code as of {commit}): "
         f"{meta['cpu']}, {meta['threads']} numba threads, medians of {ROUNDS} primed rounds, the first {PREFIX} "
         f"tokens of "
         f"{' and '.join(meta['documents'])}. rANS: the same calls' rANS lanes timed alone; MB/s are of "
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
