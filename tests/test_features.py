"""The fused CPU kernels of `kvpack.codecs.transform.features` against the torch expressions they replace: equal bit
for bit, for every RoPE kind, both cache dtypes they serve, both vector precisions and strided output buffers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kvpack.codecs.transform.features as F
from conftest import make_spec
from kvpack.kv import KVCache
from kvpack.spec import RopeSpec
from test_rope import CASES, _llama

ROPES = {name: _llama(params)[1] for name, params in CASES.items()} | {
    "partial": RopeSpec(theta=10000.0, partial_rotary_factor=0.5),
    "none": RopeSpec(type="none"),
}


def _spec(case: str, dtype: str):  # type: ignore[no-untyped-def]
    spec = make_spec(layers=3, heads=2, head_dim=64, dtype=dtype)
    if case == "per-layer":  # two RoPEs of different rotary widths, interleaved over the layers
        return dataclasses.replace(spec, rope=ROPES["llama3"], layer_ropes=(ROPES["llama3"], ROPES["partial"],
                                                                              ROPES["llama3"]))
    return dataclasses.replace(spec, rope=ROPES[case])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", [*ROPES, "per-layer"])
def test_fused_kernels_equal_the_torch_expressions(case: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(case, dtype)
    tokens = 40
    gen = torch.Generator().manual_seed(3)
    data = (torch.randn(spec.buffer_shape(tokens), generator=gen) * torch.logspace(-30, 30, 64)).to(spec.torch_dtype)
    positions = torch.cat([torch.arange(tokens - 4), torch.tensor([1000, 5000, 9999, 31000])]).to(torch.int64)
    kv = KVCache(spec=spec, data=data, positions=positions)
    rows = torch.arange(tokens) % 3 != 0
    x = F.features(kv, rows)
    # float32 vectors with exact bf16 ties and the values next to them, to check rounding to nearest even
    ties = x.clone().view(torch.int32)
    ties[:, ::5] = (ties[:, ::5] & ~0xFFFF) | 0x8000
    ties[:, 1::5] = (ties[:, 1::5] & ~0xFFFF) | 0x7FFF
    ties[:, 2::5] = (ties[:, 2::5] & ~0xFFFF) | 0x18000
    vectors = (x, x.bfloat16(), ties.view(torch.float32))
    slots = rows.nonzero().squeeze(1)

    def placed() -> list[torch.Tensor]:
        out = []
        for v in vectors:
            whole = torch.zeros(spec.buffer_shape(tokens), dtype=spec.torch_dtype)
            F.place(v, positions[rows], spec, whole, slots)
            wider = torch.zeros(spec.buffer_shape(tokens + 9), dtype=spec.torch_dtype)  # a strided view
            F.place(v, positions[rows], spec, wider[:, :, :, 5 : 5 + tokens], slots)
            out += [whole, wider]
        return out

    fused = placed()
    monkeypatch.setattr(F, "_span", lambda t: None)
    reference = F.features(kv, rows)
    assert torch.equal(_bits(x), _bits(reference))
    for a, b in zip(fused, placed(), strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert fused[0].abs().sum() > 0
    assert torch.equal(fused[0][:, :, :, slots].float(), fused[1][:, :, :, 5 + slots].float())
    for wider in fused[1::2]:  # writing into a token slice of a longer cache touches only the slice
        assert not wider[:, :, :, :5].any() and not wider[:, :, :, 5 + tokens :].any()
    longer = torch.zeros(spec.buffer_shape(tokens + 9), dtype=spec.torch_dtype)
    longer[:, :, :, 5 : 5 + tokens] = data
    sliced = KVCache(spec=spec, data=longer[:, :, :, 5 : 5 + tokens], positions=positions)
    monkeypatch.undo()
    assert torch.equal(_bits(F.features(sliced, rows)), _bits(x))  # and reading from one


def test_place_rounds_to_bf16_like_torch_at_the_edges() -> None:
    """Ties, the largest finite values, overflow to infinity and NaN through the copy path (values)."""
    spec = dataclasses.replace(make_spec(layers=1, heads=1, head_dim=8), rope=RopeSpec(type="none"))
    words = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F7FFF, 0x7F7F8000, 0xFF7FFFFF, 0x00008000,
                          0x80018000] * 2, dtype=torch.int64).to(torch.int32)
    x = words.view(torch.float32)[None]
    out = torch.zeros(spec.buffer_shape(1), dtype=torch.bfloat16)
    F.place(x, torch.zeros(1, dtype=torch.int64), spec, out, torch.zeros(1, dtype=torch.int64))
    assert torch.equal(_bits(out.reshape(-1)), _bits(x[0].bfloat16()))
    nan = torch.full((1, 16), float("nan"))
    F.place(nan, torch.zeros(1, dtype=torch.int64), spec, out, torch.zeros(1, dtype=torch.int64))
    assert out.isnan().all()
