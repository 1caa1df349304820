"""float32 GFLOP/s of transform's decode projection shape, `[T, 2816] x [2816, 11520]` (the default profile's 32x
components on the Zen 3 of docs/codecs.md), and the fp16-KV MB/s that would cap a decode made of that GEMM alone
(23,040 bytes per token). Run from the repository root:

    .venv/bin/python docs/results/zen3/gemm_fp32.py"""

import time

import torch

for tokens in (256, 1536):
    a, b = torch.randn(tokens, 2816), torch.randn(2816, 11520)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    seconds = (time.perf_counter() - start) / 10
    print(f"T={tokens}: {2 * tokens * 2816 * 11520 / seconds / 1e9:.0f} GFLOP/s, "
          f"{tokens * 23040 / seconds / 1e6:.0f} MB/s of fp16 KV if the GEMM were all")
