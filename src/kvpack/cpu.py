"""What this machine's CPU is and can do: its model name (printed with every result table) and whether it multiplies
bfloat16 matrices natively, which decides the precision of the transform codec's decode projection
(:func:`kvpack.codecs.transform.codec.projection_dtype`). Read from ``/proc/cpuinfo``; elsewhere the platform's
processor name and no flags."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def model_name() -> str:
    """The CPU's model name and its widest vector instructions, e.g. ``AMD EPYC (AVX2)``: virtual machines often
    report a bare family name, under which AVX2-only and AVX-512 BF16 hosts (several times apart in bf16 compute)
    would look the same in a result table."""
    fallback = platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), fallback)
    have = flags()
    vector = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"),
                                             ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in have), None)
    return f"{name} ({vector})" if vector else name


def flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ``amx_bf16``, ...); empty where unknown."""
    line = next((line for line in _cpuinfo() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16_matmul() -> bool:
    """Whether the CPU has bfloat16 matrix or dot-product instructions (AMX-BF16 or AVX512-BF16), with which oneDNN
    multiplies bf16 matrices several times faster than float32; without them bf16 is emulated and slower."""
    return bool({"amx_bf16", "avx512_bf16"} & flags())
