"""In-process A/B of the lossless codec's split, row statistics and merge kernels: those of commit 05db8c3 (before
they were rewritten) against the working tree's, on the bf16 KV of the first 1,024 tokens of two eval documents
(one code, one prose) in 256-token chunks. The kernels are called on the arguments the codec passes them
(captured from one encode and decode of every chunk); outputs are checked identical; every kernel is timed with
`kvpack.bench.timing.round_medians` (primed, interleaved rounds, medians), on one thread and on two. Run from the
repository root (it reads the old module with `git show`):

    .venv/bin/python docs/results/zen3/lossless_kernels_ab.py
"""

import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

import kvpack.codecs.base as base
import kvpack.codecs.lossless as new
from kvpack import models
from kvpack.bench.timing import round_medians
from kvpack.codecs import get
from kvpack.codecs.common import as_words
from kvpack.cpu import model_name
from kvpack.eval.corpora import documents
from kvpack.eval.quality import tokenize
from kvpack.inference import prefill
from kvpack.spec import ModelSpec

OLD = "05db8c3"
ROUNDS = 15

source = subprocess.run(["git", "show", f"{OLD}:src/kvpack/codecs/lossless.py"], capture_output=True, text=True,
                        check=True).stdout
path = Path(tempfile.mkdtemp()) / "lossless_old.py"  # a file: numba caches kernels next to it
path.write_text(source)
spec_of = importlib.util.spec_from_file_location("lossless_old", path)
assert spec_of is not None and spec_of.loader is not None
old = importlib.util.module_from_spec(spec_of)
sys.modules["lossless_old"] = old
register = base.register
base.register = lambda cls: cls  # type: ignore[assignment]  # its codec class is not registered a second time
try:
    spec_of.loader.exec_module(old)
finally:
    base.register = register

calls: dict[str, list[Any]] = {"stats": [], "split": [], "merge": []}
kernels, stats = new._kernels, new._row_stats


def capturing_kernels(dtype: str, shift: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    split, merge = kernels(dtype, shift)
    return (lambda *a: calls["split"].append((dtype, shift, a)) or split(*a),
            lambda *a: calls["merge"].append((dtype, shift, a)) or merge(*a))


def capturing_stats(narrow: bool) -> Callable[..., Any]:
    return lambda *a: calls["stats"].append((narrow, a)) or stats(narrow)(*a)


model, tokenizer = models.load()
spec = ModelSpec.from_model(model, tokenizer)
codec = get("lossless")
new._kernels, new._row_stats = capturing_kernels, capturing_stats  # type: ignore[assignment]
for doc in documents(2):
    ids, _ = tokenize(tokenizer, doc, 1024, 0)
    for chunk in prefill(model, spec, ids, step=256)[0].chunks(256):
        codec.decode(codec.encode(chunk), spec)
new._kernels, new._row_stats = kernels, stats  # type: ignore[assignment]


def old_split() -> list[Any]:
    return [old._kernels(d, s)[0](*a[:7]) for d, s, a in calls["split"]]


def new_split() -> list[Any]:
    out = []
    for d, s, a in calls["split"]:
        symbols = np.empty_like(a[7])
        out.append((symbols, *kernels(d, s)[0](*a[:7], symbols, as_words(symbols))))
    return out


def old_merge() -> list[np.ndarray]:
    spans = [np.zeros_like(a[0]) for _, _, a in calls["merge"]]
    for span, (d, s, a) in zip(spans, calls["merge"], strict=True):
        assert old._kernels(d, s, a[2] < old.ESCAPE)[1](span, *a[1:5], *a[6:])
    return spans


def new_merge() -> list[np.ndarray]:
    spans = [np.zeros_like(a[0]) for _, _, a in calls["merge"]]
    for span, (d, s, a) in zip(spans, calls["merge"], strict=True):
        assert kernels(d, s)[1](span, *a[1:])
    return spans


pairs = {
    "split": (old_split, new_split),
    "row statistics": (lambda: [old._row_stats(*a) for _, a in calls["stats"]],
                       lambda: [stats(n)(*a) for n, a in calls["stats"]]),
    "merge": (old_merge, new_merge),
}
for name, (before, after) in pairs.items():  # identical outputs
    for x, y in zip(before(), after(), strict=True):
        if name == "split":
            x = (x[0].reshape(-1), *x[1:])
        for u, v in zip(x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,), strict=True):
            assert np.array_equal(u, v), name
print(f"{model_name()}; {len(calls['merge'])} chunks of 256 tokens (bf16); medians of {ROUNDS} primed rounds (ms)")
for threads in (1, 2):
    numba.set_num_threads(threads)
    fns = [fn for pair in pairs.values() for fn in pair]
    times = round_medians(fns, ROUNDS, primed=True)
    for i, name in enumerate(pairs):
        print(f"{threads} thread(s), {name}: {OLD} {1e3 * times[2 * i][0]:.1f} -> now {1e3 * times[2 * i + 1][0]:.1f}")
