"""Calibration: PCA + allocation DP -> profile, from small synthetic caches (no model)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from conftest import PROSE, make_spec
from kvpack.codecs import CacheGen, Transform
from kvpack.codecs.cachegen import calibrate as cachegen_calibration
from kvpack.codecs.transform import retrieval
from kvpack.codecs.transform.calibrate import CalibrationConfig, _allocate, calibrate_from_caches
from kvpack.codecs.transform.features import feature_groups
from kvpack.codecs.transform.profile import profile_from
from kvpack.codecs.transform.quant import TYPE_DROP
from kvpack.codecs.transform.sensitivity import fisher_weights, prefill_and_fisher
from kvpack.kv import KVCache
from kvpack.profile import Profile
from kvpack.rope import rotate


def low_rank_caches(n: int = 3, tokens: int = 200, rank: int = 12, seed: int = 0,
                    positions: torch.Tensor | None = None, noise: float = 0.01) -> list[KVCache]:
    """Caches whose pre-RoPE K/V vectors live near a ``rank``-dim subspace shared by all (like real KV), plus white
    noise of standard deviation ``noise``; keys are rotated for ``positions`` (default ``0 .. tokens-1``)."""
    spec = make_spec(layers=3, heads=2, head_dim=16)
    dims = spec.elements_per_token
    gen = torch.Generator().manual_seed(0)  # the same subspace for every call: "one model"
    mix = torch.randn(rank, dims, generator=gen) * torch.logspace(0, -1.5, rank)[:, None]
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + 100 + i)
        x = torch.randn(tokens, rank, generator=g) @ mix * 3 + noise * torch.randn(tokens, dims, generator=g)
        per = x.reshape(tokens, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim).permute(1, 2, 3, 0, 4)
        pos = torch.arange(tokens, dtype=torch.int64) if positions is None else positions
        keys = [rotate(per[layer, 0], pos, spec.rope, spec.head_dim).to(spec.torch_dtype)
                for layer in range(spec.num_layers)]
        values = [per[layer, 1].to(spec.torch_dtype) for layer in range(spec.num_layers)]
        out.append(KVCache.from_layers(spec=spec, keys=keys, values=values, positions=pos))
    return out


def test_profile_presets_and_trim() -> None:
    caches = low_rank_caches()
    prof = calibrate_from_caches(caches, caches[0].spec, ratios=(4.0, 8.0, 16.0), default_ratio=8.0,
                                 reference_tokens=256)
    st = profile_from(Profile.from_bytes(prof.data))
    assert st.hash == prof.hash and sorted(st.presets) == ["16x", "4x", "8x"]
    infos = [st.presets[n].info for n in ("4x", "8x", "16x")]
    assert [i["ratio"] for i in infos] == sorted(i["ratio"] for i in infos)
    errors = [i["relative_error"] for i in infos]
    assert errors == sorted(errors) and errors[0] < 1e-3
    for info in infos:  # budgets are met (estimated ratio within 2% of nominal or above)
        assert info["ratio"] >= 0.98 * info["nominal_ratio"]
    # the basis is trimmed to the components some preset uses
    used = max(int(np.flatnonzero(a.block_type != TYPE_DROP).max()) + 1 for a in st.presets.values())
    assert st.bases[0].shape[0] <= used * 64 and st.bases[0].shape[1] == caches[0].spec.elements_per_token
    gram = st.bases[0] @ st.bases[0].T  # orthonormal up to the int8 rows' rounding (half a step of max / 127 per run)
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=6e-3, rtol=0)


def test_kvtc_recipe_separate_bases() -> None:
    caches = low_rank_caches()
    prof = calibrate_from_caches(caches, caches[0].spec, recipe="kvtc", ratios=(4.0, 8.0), default_ratio=4.0,
                                 reference_tokens=256)
    st = profile_from(prof)
    assert len(st.groups) == 2 and st.sink_format == "fp8" and prof.codec == "kvtc"
    for alloc in st.presets.values():
        assert set(alloc.info["types"]) <= {"drop", "int2", "int4", "fp8"}


def test_feature_groups_partition() -> None:
    k, v = feature_groups(3, 32, "kv")
    assert sorted(np.concatenate([k, v]).tolist()) == list(range(192))
    first, last = feature_groups(3, 32, "layers:2")  # runs of whole layers, K and V together, in feature order
    assert first.tolist() == list(range(128)) and last.tolist() == list(range(128, 192))
    assert [g.tolist() for g in feature_groups(3, 32, "layers:1")] == [list(range(192))]
    for bad in ("per-layer", "layers:0", "layers:4", "layers:", "layers:-1", "layers:2x"):
        with pytest.raises(ValueError, match="grouping"):
            feature_groups(3, 32, bad)


def test_weights_validated() -> None:
    caches = low_rank_caches(n=1)
    with pytest.raises(ValueError, match="weights"):
        calibrate_from_caches(caches, caches[0].spec, weights=np.ones(5))


def test_allocation_dp_is_optimal() -> None:
    rng = np.random.default_rng(0)
    bits = np.concatenate([np.zeros((4, 1)), rng.uniform(1, 10, (4, 3))], axis=1)
    err = np.concatenate([np.full((4, 1), 10.0), rng.uniform(0, 9, (4, 3))], axis=1)
    budget = 17.0
    (pick,) = _allocate(bits, err, [budget])
    best = min((sum(err[b, o] for b, o in enumerate(c)), c) for c in itertools.product(range(4), repeat=4)
               if sum(bits[b, o] for b, o in enumerate(c)) <= budget * (1 - 1e-3))
    assert sum(bits[b, o] for b, o in enumerate(pick)) <= budget
    assert sum(err[b, o] for b, o in enumerate(pick)) <= best[0] + 1e-9


def test_sink_format_is_a_calibration_choice(tmp_path: Path) -> None:
    """``sink_format="fp8"`` makes a transform profile store its sinks in fp8: the budgets count those bytes, the
    chunks hold them, and the sinks come back within e4m3's precision; any other name is refused."""
    from kvpack.codecs.transform import Transform
    from kvpack.format import read_container

    caches = low_rank_caches()
    made = {fmt: calibrate_from_caches(caches, caches[0].spec, ratios=(4.0,), default_ratio=4.0, reference_tokens=256,
                                       sinks=2, sink_format=fmt) for fmt in ("exact", "fp8")}
    assert [profile_from(p).sink_format for p in made.values()] == ["exact", "fp8"]
    kv = low_rank_caches(n=1, tokens=256, seed=5)[0]
    sections = {}
    for fmt, prof in made.items():
        codec = Transform(profile=str(prof.save(tmp_path / f"{fmt}.kvprof")), preset="4x")
        blob = codec.encode(kv)
        sections[fmt] = len(read_container(blob).section("sinks"))
        sinks = codec.decode(blob)[:2].data.float()
        assert torch.allclose(sinks, kv[:2].data.float(), rtol=0.07, atol=1e-3 * float(kv.data.abs().max()))
    dims = kv.spec.elements_per_token
    assert sections == {"exact": 2 * dims * 2, "fp8": 2 * dims + 4 * 2 * kv.spec.num_layers}
    with pytest.raises(ValueError, match="sink_format"):
        calibrate_from_caches(caches, caches[0].spec, ratios=(4.0,), default_ratio=4.0, sink_format="int4")


def test_a_price_per_component_codes_fewer_at_the_same_bits() -> None:
    """``component_cost`` drops blocks that buy less error than their price; each preset records its component
    count (the decode GEMM's inner dimension), and the budgets still hold."""
    caches = low_rank_caches()
    made = {cost: profile_from(calibrate_from_caches(caches, caches[0].spec, ratios=(4.0, 8.0, 16.0),
                                                     default_ratio=8.0, reference_tokens=256, component_cost=cost))
            for cost in (0.0, 1e-4)}
    for name, free in made[0.0].presets.items():
        priced = made[1e-4].presets[name]
        for st, alloc in ((made[0.0], free), (made[1e-4], priced)):
            coded = np.flatnonzero(alloc.block_type != TYPE_DROP)
            assert alloc.info["components"] == sum(st.block_span(int(b))[2] for b in coded)
        assert priced.info["components"] <= free.info["components"]
        assert priced.info["ratio"] >= 0.98 * priced.info["nominal_ratio"]
        assert free.info["relative_error"] <= priced.info["relative_error"] <= free.info["relative_error"] + 1e-3
    assert sum(a.info["components"] for a in made[1e-4].presets.values()) < \
        sum(a.info["components"] for a in made[0.0].presets.values())  # the noise blocks the low rank leaves out
    for bad in (-1e-6, 1.0, float("nan"), "1e-6"):
        with pytest.raises(ValueError, match="component_cost"):
            calibrate_from_caches(caches, caches[0].spec, ratios=(4.0,), component_cost=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("options", "message"), [
    ({"tokens": -5}, "tokens must be an integer in 16"),
    ({"tokens": True}, "tokens must be an integer"),
    ({"cont": 0}, "cont must be an integer in 1"),
    ({"fisher_docs": 1.5}, "fisher_docs must be an integer"),
    ({"max_tokens": 8}, "max_tokens must be an integer in 16"),
    ({"sinks": 1536}, "sinks must be an integer in 0..tokens - 1"),
    ({"sinks": -1}, "sinks must be an integer"),
    ({"weighting": "mse"}, "weighting must be 'fisher' or 'uniform'"),
    ({"measure_kl": "false"}, "measure_kl must be true or false"),
    ({"rounding": 0.6}, "rounding must be a number in [0, 0.5]"),
    ({"rounding": float("nan")}, "rounding must be a number"),
    ({"ratios": (8.0, 8.0)}, "ratios must be distinct numbers"),
    ({"ratios": (0.5,)}, "ratios must be distinct numbers in (1, 4096]"),
    ({"ratios": "10,20"}, "ratios must be distinct numbers"),
    ({"default_ratio": "32x"}, "default_ratio must be a number above 1"),
    ({"grouping": "layers:0"}, "grouping must be 'joint', 'kv' or 'layers:G'"),
    ({"grouping": 3}, "grouping must be a string"),
    ({"sink_format": "int4"}, "sink_format must be 'exact' or 'fp8'"),
    ({"basis_format": "fp32"}, "basis_format must be one of"),
    ({"component_cost": 1.0}, "component_cost must be a number in [0, 1)"),
    ({"retrieval": -1}, "retrieval must be an integer in 0"),
    ({"retrieval_tokens": 8}, "retrieval_tokens must be an integer in 16"),
    ({"retrieval_share": 1.5}, "retrieval_share must be a number in [0, 1]"),
    ({"retrieval": 2, "weighting": "uniform"}, "retrieval needs weighting=fisher"),
    ({"bogus": 1, "other": 2}, "has no setting 'bogus', 'other'; its settings: tokens"),
])
def test_transform_calibration_settings_are_checked_when_made(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Transform.calibration_config(options)


def test_calibration_settings_keep_their_defaults_and_take_good_values() -> None:
    assert Transform.calibration_config({}) == CalibrationConfig()
    made = Transform.calibration_config({"ratios": [8, 16], "default_ratio": 16, "grouping": "layers:2",
                                           "rounding": 0, "sinks": 0, "sink_format": "fp8"})
    assert made.ratios == (8.0, 16.0) and made.grouping == "layers:2" and made.rounding == 0
    assert CacheGen.calibration_config({}) == cachegen_calibration.CalibrationConfig()
    assert CacheGen.calibration_config({"tokens": 256}).tokens == 256
    for options, message in (({"tokens": 5}, "tokens must be an integer in 10"), ({"margin": -1}, "margin must be"),
                             ({"smoothing": 0}, "smoothing must be"), ({"bins": [[1.0]]}, "bins must be"),
                             ({"bins": "wide"}, "bins must be"), ({"level": 1}, "has no setting 'level'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            CacheGen.calibration_config(options)


@settings(max_examples=40, deadline=None)
@given(seed=hst.integers(0, 2**16), share=hst.floats(0.0, 1.0), scale=hst.floats(1e-6, 1e6))
def test_fisher_weights_mix_two_sensitivities_scaled_alike(seed: int, share: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    cont, ret = torch.rand(40, generator=gen) + 1e-3, torch.rand(40, generator=gen) ** 4 + 1e-6
    alone = fisher_weights(cont)
    np.testing.assert_allclose(fisher_weights(cont * scale), alone, rtol=1e-6)  # only the shape of a Fisher counts
    mixed = fisher_weights(cont, ret * scale, share)
    np.testing.assert_allclose(mixed**2 - 1e-3, (1 - share) * (alone**2 - 1e-3) + share * (fisher_weights(ret)**2
                                                                                           - 1e-3), rtol=1e-6)
    np.testing.assert_allclose(fisher_weights(cont, ret, 0.0), alone)
    assert (mixed >= np.sqrt(1e-3) * (1 - 1e-9)).all()


def test_retrieval_haystacks_hide_one_key_in_the_calibration_text(smollm: tuple[Any, Any, Any]) -> None:
    _, tokenizer, _ = smollm
    texts = [PROSE * 8, "def f(x):\n    return x + 1\n" * 20]
    made = retrieval.haystacks(tokenizer, texts, 3, 200, seed=5)
    question = tokenizer(retrieval.QUESTION, add_special_tokens=False).input_ids
    again = retrieval.haystacks(tokenizer, texts, 3, 200, seed=5)  # deterministic
    assert [(ids.tolist(), q) for ids, q in made] == [(ids.tolist(), q) for ids, q in again]
    depths = set()
    for ids, q in made:
        assert q == len(question) and ids[200 : 200 + q].tolist() == question
        text = tokenizer.decode(ids[:200])
        key = tokenizer.decode(ids[200 + q :]).strip()
        assert re.fullmatch(r"\d{5}", key) and text.count(f"The secret number is {key}.") == 1
        depths.add(text.index("The secret number"))
    assert len(depths) > 1
    with pytest.raises(ValueError, match="fewer than the 5000 a retrieval haystack needs"):
        retrieval.haystacks(tokenizer, texts, 1, 5000)
    with pytest.raises(ValueError, match="no room around its"):
        retrieval.haystacks(tokenizer, texts, 1, 16)
    for i, (ids, q) in enumerate(retrieval.haystacks(tokenizer, texts, 2, 200, seed=5, repeat=10)):
        key = tokenizer.decode(ids[200 + q :]).strip()
        needle = tokenizer(retrieval.NEEDLE.format(key=key), add_special_tokens=False).input_ids
        hay = ids[:200].tolist()
        at = next(j for j in range(200) if hay[j : j + len(needle)] == needle)
        span = tokenizer(texts[i], add_special_tokens=False).input_ids[:10]  # text i's first 10 tokens, repeated
        assert hay[:at] + hay[at + len(needle) :] == (span * 20)[: 200 - len(needle)]
    with pytest.raises(ValueError, match="fewer than the 5000 a repeated filler repeats"):
        retrieval.haystacks(tokenizer, texts, 1, 200, repeat=5000)


def test_retrieval_fisher_differentiates_the_answer_alone(smollm: tuple[Any, Any, Any]) -> None:
    model, tokenizer, spec = smollm
    texts = [PROSE * 8]
    (ids, q), = retrieval.haystacks(tokenizer, texts, 1, 128)
    f = retrieval.retrieval_fisher(model, tokenizer, spec, texts, 1, 128, sinks=1)
    assert f.shape == (spec.elements_per_token,) and bool(torch.isfinite(f).all()) and float(f.min()) >= 0
    torch.testing.assert_close(f, prefill_and_fisher(model, spec, ids, 128, 1, scored_from=q - 1)[2])
    whole = prefill_and_fisher(model, spec, ids, 128, 1)[2]  # the question's tokens scored too
    assert not torch.allclose(f / f.mean(), whole / whole.mean(), rtol=0.05)
