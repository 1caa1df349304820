"""Every Triton kernel of the GPU decoders compiles for NVIDIA Hopper (sm_90: H100, H200), down to
a cubin, on a machine without a GPU: Triton's compiler and its bundled ptxas need no device. The interpreter tests
check what the kernels compute; this checks that the compiled kernels build (types, casts, constexpr globals), which
the interpreter does not. Runs in a subprocess: the pytest process selected the interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvpack.entropy import rans_triton
from kvpack.gpu import fp8, kivi, lossless

ROWS = {"out": "*i16", "symbols": "*u8", "row_offset": "*i64"}
CASES = [
    (rans_triton._decode_lanes_kernel,
     {"words": "*i16", "word_offsets": "*i64", "lane_starts": "*i64", "lane_table": "*i32", "cum": "*i32",
      "lookup": "*u8", "out": "*u8", "bad": "*i8", "n_lanes": "i32", "max_len": "i32"},
     [{"SEARCH": search, "BLOCK": rans_triton.LANES_PER_PROGRAM} for search in (False, True)]),
    (lossless._merge_kernel,
     {**ROWS, "base": "*u8", "flip": "*u8", "escapes": "*i32", "esc_start": "*i64", "raw": "*u8", "bad": "*i8",
      "tokens": "i32", "dim": "i32", "row_bytes": "i32"},
     [{"EXP": 8, "K": 1, "LOW": 6, "SHIFT": 0, "WHOLE": 0, "PART": 6, "BLOCK_D": 128},
      {"EXP": 5, "K": 2, "LOW": 8, "SHIFT": 0, "WHOLE": 1, "PART": 0, "BLOCK_D": 128}]),
    (fp8._dequant_kernel,
     {**ROWS, "scales": "*fp32", "flips": "*u8", "values": "*fp32", "tokens": "i32", "dim": "i32"},
     [{"KIND": kind, "BLOCK_T": fp8.BLOCK_TOKENS, "BLOCK_D": 128} for kind in (1, 2)]),
    (kivi._dequant_kernel,
     {**ROWS, "table": "*fp32", "heads": "i32", "tokens": "i32", "first": "i32", "count": "i32", "dim": "i32",
      "group": "i32", "n_groups": "i32", "levels": "i32"},
     [{"VALUES": v, "KIND": 1, "BLOCK_T": kivi.BLOCK_TOKENS, "BLOCK_D": 128} for v in (0, 1)]),
]
for arch in (90,):
    for fn, signature, variants in CASES:
        for constants in variants:
            sig = {**signature, **{name: "constexpr" for name in constants}}
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants),
                                    target=GPUTarget("cuda", arch, 32))
            assert kernel.asm["cubin"], (fn, constants)
print("compiled")
'''


def test_kernels_compile_for_nvidia_gpus(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "0",
            "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
