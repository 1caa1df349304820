"""The CPU description printed with every result table tells hosts of one bare model name apart by their vector
instructions (an AVX2-only and an AVX-512 BF16 EPYC differ several times in bf16 compute)."""

from __future__ import annotations

import pytest

from kvpack import cpu


@pytest.mark.parametrize(("flags", "shown"), [("fpu avx2 fma", "AMD EPYC (AVX2)"),
                                             ("avx2 avx512f avx512bw", "AMD EPYC (AVX-512)"),
                                             ("avx2 avx512f avx512_bf16", "AMD EPYC (AVX-512 BF16)"),
                                             ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMD EPYC (AMX)"),
                                             ("fpu sse2", "AMD EPYC")])
def test_model_name_says_the_vector_instructions(monkeypatch: pytest.MonkeyPatch, flags: str, shown: str) -> None:
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("processor\t: 0", "model name\t: AMD EPYC", f"flags\t\t: {flags}"))
    assert cpu.model_name() == shown
