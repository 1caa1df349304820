"""Seconds of one 512-token prefill of the bundled SmolLM2-135M in bfloat16 and in float32 (docs/transform.md,
calibration time on a host without native bf16). Run from the repository root:

    .venv/bin/python docs/results/zen3/prefill_dtype.py"""

import time

import torch

from kvpack import models

torch.manual_seed(0)
model, _ = models.load()
ids = torch.randint(0, 40000, (1, 512))
for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
    model.to(dtype)
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        start = time.perf_counter()
        model(ids)
    print(f"{dtype}: {time.perf_counter() - start:.2f} s for 512 tokens on {torch.get_num_threads()} threads")
