"""Quality benchmark of the `transform` and `kvtc` codecs side by side (BENCHMARKS.md protocol).

``python -m kvpack.bench.transform --profile P [--kvtc-profile Q] --presets 20x,32x,48x [--docs 6] [--prefix 1536]
[--cont 512] [--passkey 2048] [--json out.json]``: one :func:`kvpack.eval.evaluate` call over every setting, so each
document's reference (original cache, logits) is computed once and shared. Prints the standard table and writes the
JSON rows (ratio, Δppl code/prose, KL, top-1, greedy, passkey, MB/s, machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvpack.codecs.base import Codec
from kvpack.codecs.transform import KVTC, Transform


def settings(profile: str | None, kvtc_profile: str | None, presets: list[str],
             kvtc_presets: list[str]) -> list[Codec]:
    """The codec settings to compare: transform at ``presets``, kvtc at ``kvtc_presets``."""
    codecs: list[Codec] = [Transform(profile=profile, preset=p) for p in presets] if profile else []
    if kvtc_profile:
        codecs += [KVTC(profile=kvtc_profile, preset=p) for p in kvtc_presets]
    return codecs


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kvpack import models
    from kvpack.bench.rows import print_rows
    from kvpack.eval import documents, evaluate
    from kvpack.spec import ModelSpec

    codecs = settings(args.profile, args.kvtc_profile, args.presets.split(","),
                      (args.kvtc_presets or args.presets).split(","))
    model, tokenizer = models.load()
    spec = ModelSpec.from_model(model, tokenizer)
    rows = evaluate(model, tokenizer, spec, codecs, documents(args.docs), prefix=args.prefix, cont=args.cont,
                    passkey_tokens=args.passkey, passkey_trials=args.trials)
    for row, codec in zip(rows, codecs, strict=True):
        if isinstance(codec, Transform):
            alloc = codec.allocation()
            row.update(preset=alloc.name, calibration_kl=alloc.info.get("kl"),
                       profile_bytes=codec.profile_nbytes())
    print_rows(rows, title=f"transform codecs ({rows[0]['machine']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="transform profile (kvpack calibrate)")
    parser.add_argument("--kvtc-profile", help="profile calibrated with recipe=kvtc")
    parser.add_argument("--presets", default="20x,32x,48x")
    parser.add_argument("--kvtc-presets", default=None, help="presets of the kvtc rows (default: --presets)")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--prefix", type=int, default=1536)
    parser.add_argument("--cont", type=int, default=512)
    parser.add_argument("--passkey", type=int, default=None)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", default=None)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
