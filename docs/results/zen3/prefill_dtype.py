"""Seconds of a forward pass of the bundled SmolLM2-135M over 512, 16, 8, 4 and 1 tokens: in bfloat16 with torch's own
kernels, in bfloat16 with float32 matmuls (``kvpack.models.Float32MatmulLinear``, here forced at every row count:
``kvpack.models.load`` uses it on a CPU without bf16 matrix instructions, from ``FLOAT32_FROM_ROWS`` rows on) and in
float32 (docs/transform.md, calibration time on such a host; the ``kvpack.models`` docstring). Run from the
repository root:

    .venv/bin/python docs/results/zen3/prefill_dtype.py"""

import time

import torch

from kvpack import cpu, models

torch.manual_seed(0)
ids = torch.randint(0, 40000, (1, 512))
print(f"{cpu.model_name()}, native bf16 matmul: {cpu.native_bf16_matmul()}, {torch.get_num_threads()} threads")
models.FLOAT32_FROM_ROWS = 1
for label, dtype, float32_matmuls in (("bfloat16, torch's kernels", torch.bfloat16, False),
                                      ("bfloat16, float32 matmuls", torch.bfloat16, True),
                                      ("float32", torch.float32, False)):
    model, _ = models.load(dtype=dtype, float32_matmuls=float32_matmuls)
    times = []
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        for tokens, repeats in ((512, 1), (16, 5), (8, 5), (4, 5), (1, 5)):
            start = time.perf_counter()
            for _ in range(repeats):
                model(ids[:, :tokens])
            times.append(f"{(time.perf_counter() - start) / repeats * 1000:.0f} ms for {tokens}")
    print(f"{label}: {', '.join(times)} tokens")
