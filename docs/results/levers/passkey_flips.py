"""Trial-by-trial comparison of the passkey answers of two `kvpack bench codecs --passkey` runs on the same
haystacks (the same `--passkey` length and `--trials`, so the same seed): checks that the uncompressed cache answered
the same trials in both runs, then prints, for every pair of rows, the trials only the first answers, only the
second, and the exact McNemar p-value (`kvpack.eval.passkey.mcnemar_p`); then the same for the key's teacher-forced
log-probability, a continuous measure: the mean per-trial difference (each row against the uncompressed cache, then
between rows) with its 95% interval (`kvpack.eval.passkey.paired_interval`).
Run from the repository root:

    .venv/bin/python docs/results/levers/passkey_flips.py A.json B.json
"""

import json
import sys
from itertools import combinations
from pathlib import Path

from kvpack.eval.passkey import mcnemar_p, paired_interval

rows = [(f"{path} row {i}", row) for path in sys.argv[1:]
        for i, row in enumerate(json.loads(Path(path).read_text())["rows"]) if row.get("passkey_hits")]
references = {tuple(row["passkey_hits_reference"]) for _, row in rows}
if len(references) != 1:
    sys.exit("the uncompressed cache answered different trials: not the same haystacks")
print(f"uncompressed: {sum(next(iter(references)))} of {len(next(iter(references)))} in every run")
for (a, ra), (b, rb) in combinations(rows, 2):
    pairs = list(zip(ra["passkey_hits"], rb["passkey_hits"], strict=True))
    gained, lost = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
    print(f"{a} ({sum(ra['passkey_hits'])}) vs {b} ({sum(rb['passkey_hits'])}): +{gained}/-{lost}, "
          f"p = {mcnemar_p(gained, lost):.2f}")


def paired(x: list[float], y: list[float]) -> str:
    mean, low, high = paired_interval(x, y)
    return f"{mean:+.3f} nats (95% interval {low:+.3f} to {high:+.3f})"


scored = [(a, row) for a, row in rows if "passkey_key_logprobs" in row]  # pages before per-trial log-probs: hits only
for a, row in rows:
    if "passkey_key_logprobs" not in row:
        print(f"key log p, {a}: no per-trial log-probabilities on that page")
for a, ra in scored:
    print(f"key log p, {a} - uncompressed: {paired(ra['passkey_key_logprobs'], ra['passkey_key_logprobs_reference'])}")
for (a, ra), (b, rb) in combinations(scored, 2):
    print(f"key log p, {a} - {b}: {paired(ra['passkey_key_logprobs'], rb['passkey_key_logprobs'])}")
