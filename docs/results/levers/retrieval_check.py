"""Does a retrieval check on calibration text rank profiles as the 7K passkey benchmark does? The four profiles of
the 4x-token recipe (`kvpack calibrate --codec transform --sources stdlib,pydoc --docs 12 --option max_tokens=24576
--option tokens=3072 --draw K`, K = 0..3, written to PROFILE_DIR/A12x3k-drawK.kvprof; their hashes are checked
against the committed records docs/results/zen4/calibrate-A12x3k-drawK.json) at their default 32x preset, through
`kvpack.eval.retrieval_check.check`: HAYSTACKS haystacks of TOKENS tokens of the held-out draw 4's calibration
documents, the filler the documents run on (REPEAT 0) or the first REPEAT tokens of one document repeated. Writes
the per-haystack log-probabilities and each profile's mean difference to OUT, and prints those and the uncompressed
cache's mean key log-probability. Run from the repository root (about 10 minutes for 16 haystacks of 7,168 tokens on
2 Zen 4 cores):

    .venv/bin/python docs/results/levers/retrieval_check.py PROFILE_DIR REPEAT HAYSTACKS TOKENS OUT
"""

import json
import sys
import time
from pathlib import Path

from kvpack import codecs, models
from kvpack.cpu import model_name
from kvpack.eval.corpora import documents
from kvpack.eval.retrieval_check import check
from kvpack.spec import ModelSpec

folder, repeat, haystacks, tokens, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    Path(sys.argv[5])
profiles = [codecs.get("transform", profile=str(folder / f"A12x3k-draw{k}.kvprof")) for k in range(4)]
for k, codec in enumerate(profiles):
    record = json.loads(Path(f"docs/results/zen4/calibrate-A12x3k-draw{k}.json").read_text())
    if codec.profile_hash() != record["profile_hash"]:
        sys.exit(f"draw {k}: profile {codec.profile_hash()} is not the committed draw's {record['profile_hash']}")
model, tokenizer = models.load()
spec = ModelSpec.from_model(model, tokenizer)
held_out = documents(12, "calibration", ("stdlib", "pydoc"), 4)
start = time.perf_counter()
results = check(model, tokenizer, spec, profiles, [d.text for d in held_out], haystacks, tokens, repeat=repeat,
                on_progress=lambda n: print(f"haystack {n} of {haystacks}", flush=True))
rows = [{"draw": k, "profile_hash": codec.profile_hash(), "delta": r.delta, "interval": list(r.interval),
         "key_logprobs": r.coded, "key_logprobs_reference": r.reference}
        for k, (codec, r) in enumerate(zip(profiles, results, strict=True))]
out.write_text(json.dumps({"command": "python docs/results/levers/retrieval_check.py " + " ".join(sys.argv[1:]),
                           "machine": model_name(), "repeat": repeat, "haystacks": haystacks, "tokens": tokens,
                           "documents": [d.name for d in held_out], "seconds": time.perf_counter() - start,
                           "rows": rows}, indent=1))
reference = results[0].reference
print(f"uncompressed cache: mean key log-probability {sum(reference) / len(reference):+.3f} nats")
for row in rows:
    low, high = row["interval"]
    print(f"draw {row['draw']} [{row['profile_hash'][:8]}]: {row['delta']:+.3f} nats ({low:+.3f} to {high:+.3f})")
