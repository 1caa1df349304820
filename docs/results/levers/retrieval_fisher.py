"""Where the two sensitivities of SmolLM2-135M's cache lie: the continuation Fisher that `kvpack calibrate` measures by
default (its last 2 of 6 `stdlib,pydoc` calibration documents, 1,536 + 256 tokens) against the retrieval Fisher that
`--option retrieval=8` adds (8 haystacks of 4,096 tokens of the same documents,
`kvpack.codecs.transform.retrieval`). Each is scaled to sum 1; the JSON keeps every layer's share and the share of
its keys, and the correlation of the two log-Fishers over all features. Run from the repository root (about 4
minutes on 2 cores):

    .venv/bin/python docs/results/levers/retrieval_fisher.py
"""

import json
from pathlib import Path

import numpy as np
import torch

from kvpack import models
from kvpack.codecs.transform.calibrate import CalibrationConfig, _doc_ids
from kvpack.codecs.transform.retrieval import retrieval_fisher
from kvpack.codecs.transform.sensitivity import prefill_and_fisher
from kvpack.cpu import model_name
from kvpack.eval.corpora import documents
from kvpack.spec import ModelSpec

cfg = CalibrationConfig(retrieval=8)
model, tokenizer = models.load("smollm2-135m")
spec = ModelSpec.from_model(model, tokenizer)
texts = [d.text for d in documents(6, "calibration", sources=("stdlib", "pydoc"))]
ids = _doc_ids(tokenizer, texts, cfg.tokens, cfg.cont)[-cfg.fisher_docs:]
continuation = torch.stack([prefill_and_fisher(model, spec, i, cfg.tokens, 1)[2] for i in ids]).mean(0).double()
retrieval = retrieval_fisher(model, tokenizer, spec, texts, cfg.retrieval, cfg.retrieval_tokens, 1).double()


def shares(f: torch.Tensor) -> dict[str, list[float]]:
    per = (f / f.sum()).reshape(spec.num_layers, 2, -1).sum(-1)  # [layer, K/V]
    return {"layer": [round(float(x), 4) for x in per.sum(1)],
            "keys_of_layer": [round(float(x), 4) for x in per[:, 0] / per.sum(1)]}


record = {"command": "python docs/results/levers/retrieval_fisher.py", "machine": model_name(),
          "continuation": shares(continuation), "retrieval": shares(retrieval),
          "log_fisher_correlation": round(float(np.corrcoef(continuation.clamp_min(1e-30).log().numpy(),
                                                            retrieval.clamp_min(1e-30).log().numpy())[0, 1]), 3)}
out = Path("docs/results/levers/retrieval-fisher.json")
out.write_text(json.dumps(record, indent=1) + "\n")
top = sorted(range(spec.num_layers), key=lambda layer: -record["retrieval"]["layer"][layer])[:4]
for layer in top:
    print(f"layer {layer}: retrieval {record['retrieval']['layer'][layer]:.3f}, "
          f"continuation {record['continuation']['layer'][layer]:.3f}")
print(f"wrote {out}")
