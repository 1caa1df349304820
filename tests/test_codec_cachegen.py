"""`cachegen` codec and its profile: error bound, anchor/delta identity, profile identity, hostile input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROSE, make_kv
from kvpack import codecs
from kvpack.codecs.cachegen.calibrate import build_profile, build_profile_from_caches
from kvpack.codecs.cachegen.codec import CacheGen, error_bound, quantize_indices
from kvpack.codecs.cachegen.profile import GROUP_SIZE, CacheGenTables
from kvpack.entropy import split_escapes, unpack
from kvpack.entropy.tables import decode_varints
from kvpack.errors import CodecError, FormatError, ModelMismatchError, ProfileError, ProfileMismatchError
from kvpack.eval.corpora import Document
from kvpack.format import read_container, write_container
from kvpack.kv import KVCache
from kvpack.profile import Profile


def _within_bound(codec: CacheGen, kv: KVCache, out: KVCache) -> bool:
    bound_k, bound_v = error_bound(codec, out)
    pairs = zip((*kv.keys, *kv.values), (*out.keys, *out.values), (*bound_k, *bound_v), strict=True)
    return all(bool(((a.double() - b.double()).abs() <= e).all()) for a, b, e in pairs)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calibration = [make_kv(tokens=120, seed=s) for s in range(3)]
    return build_profile_from_caches(calibration, document_names=["synthetic"]).save(
        tmp_path_factory.mktemp("cachegen"))


@pytest.fixture(scope="module")
def other_profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    calibration = [make_kv(tokens=60, seed=s) for s in (7, 8)]
    return build_profile_from_caches(calibration).save(tmp_path_factory.mktemp("cachegen-other"))


def _codec(path: Path, **params: Any) -> CacheGen:
    codec = codecs.get("cachegen", profile=str(path), **params)
    assert isinstance(codec, CacheGen)
    return codec


def _rewrite(data: bytes, *, meta: dict[str, Any] | None = None, sections: dict[str, bytes] | None = None,
             count: int | None = None) -> bytes:
    container = read_container(data)
    header = {k: v for k, v in container.header.items() if k != "sections"}
    if meta is not None:
        header["meta"] = meta
    if count is not None:
        header["tokens"] = {**header["tokens"], "count": count}
    body = {name: bytes(view) for name, view in container.sections.items()} | (sections or {})
    return write_container(header, body)


@pytest.mark.parametrize("level", ["low", "medium", "high"])
@pytest.mark.parametrize("anchor_delta", [True, False])
def test_round_trip_within_the_error_bound(profile_path: Path, level: str, anchor_delta: bool) -> None:
    kv = make_kv(tokens=37, seed=11)  # 37: the last group is short
    codec = _codec(profile_path, level=level, anchor_delta=anchor_delta)
    data = codec.encode(kv)
    out = codecs.decode(data, codec=codec)
    assert out.spec == kv.spec and torch.equal(out.positions, kv.positions)
    assert all(k.dtype == torch.bfloat16 and k.shape == (2, 37, 8) for k in (*out.keys, *out.values))
    assert _within_bound(codec, kv, out)
    assert len(data) < kv.fp16_bytes


def test_anchor_delta_changes_only_the_coding(profile_path: Path) -> None:
    """Deltas are taken against the reconstructed anchor on the same bin lattice: decoded values are identical."""
    kv = make_kv(tokens=53, seed=3)
    for level in (0, 1, 2):
        with_delta = _codec(profile_path, level=level, anchor_delta=True)
        without = _codec(profile_path, level=level, anchor_delta=False)
        a, b = with_delta.decode(with_delta.encode(kv)), without.decode(without.encode(kv))
        assert a.equal(b)
    fine, coarse = (_codec(profile_path, level=lv).decode(_codec(profile_path, level=lv).encode(kv)) for lv in (2, 0))
    assert max(fine.max_abs_error(kv)) < max(coarse.max_abs_error(kv))


def test_symbols_and_escapes_follow_the_documented_layout(profile_path: Path) -> None:
    """Recompute the lanes with numpy from the bin indices and compare with what the encoder stored."""
    kv = make_kv(tokens=23, seed=5)
    kv.values[2][1, 4, 3] = 500.0  # far outside every window: an escape
    codec = _codec(profile_path, level=1, anchor_delta=True)
    t = codec.tables
    q, ok = quantize_indices(kv, t.mean, t.scale(1))
    assert ok
    anchors = np.arange(0, 23, GROUP_SIZE)
    others = np.setdiff1d(np.arange(23), anchors)
    lo, width = t.lo[1], t.width[1]
    values = []
    for r in range(t.rows):
        raw = q[r, anchors] - lo[r, 0]
        delta = q[r, others] - q[r, others // GROUP_SIZE * GROUP_SIZE] - lo[r, 1]
        for z, w in ((raw, width[r, 0]), (delta, width[r, 1])):
            values.append(np.where((z >= 0) & (z < w), z, -1 - np.where(z >= 0, 2 * z, -2 * z - 1)))
    symbols, escapes = split_escapes(np.concatenate(values).astype(np.int32), t.freqs[1].shape[1])
    container = read_container(codec.encode(kv))
    stored, _ = unpack(container.section("symbols"), max_symbols=symbols.size, freqs=t.freqs[1])
    assert np.array_equal(stored, symbols)
    raw_escapes = np.frombuffer(container.section("escapes"), np.uint8)
    stored_escapes, end = decode_varints(raw_escapes, 0, escapes.size, 2**31)
    assert end == raw_escapes.size and escapes.size >= 1
    assert np.array_equal(-1 - stored_escapes, escapes)
    assert container.header["meta"] == {"group_size": GROUP_SIZE, "escapes": int(escapes.size)}


def test_outliers_escape_and_stay_within_the_bound(profile_path: Path) -> None:
    kv = make_kv(tokens=30, seed=2)
    kv.keys[0][0, :, 1] = torch.linspace(-3000, 3000, 30).to(torch.bfloat16)
    kv.values[1][1, 0, 0] = 1e6
    codec = _codec(profile_path, level="high")
    data = codec.encode(kv)
    assert read_container(data).header["meta"]["escapes"] > 30
    assert _within_bound(codec, kv, codec.decode(data))


def test_unencodable_values_are_refused(profile_path: Path) -> None:
    codec = _codec(profile_path)
    for bad in (float("nan"), float("inf"), 3e38):
        kv = make_kv(tokens=12, seed=1)
        kv.values[1][0, 5, 2] = bad
        with pytest.raises(CodecError, match="layer 1 values of KV head 0"):
            codec.encode(kv)


@pytest.mark.parametrize("tokens", [0, 1, 10, 11])
def test_short_chunks(profile_path: Path, tokens: int) -> None:
    kv = make_kv(tokens=tokens, seed=tokens, start=100)
    codec = _codec(profile_path, level=0)
    out = codec.decode(codec.encode(kv))
    assert out.num_tokens == tokens and out.positions.tolist() == list(range(100, 100 + tokens))
    assert _within_bound(codec, kv, out)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_dtypes(tmp_path: Path, dtype: str) -> None:
    path = build_profile_from_caches([make_kv(tokens=40, seed=1, dtype=dtype)]).save(tmp_path)
    kv = make_kv(tokens=25, seed=4, dtype=dtype)
    codec = _codec(path, level=2)
    out = codec.decode(codec.encode(kv))
    assert out.keys[0].dtype == kv.spec.torch_dtype
    assert _within_bound(codec, kv, out)


def test_parameters_registry_and_profile_identity(profile_path: Path) -> None:
    high = codecs.get("cachegen", **codecs.parse_params([f"profile={profile_path}", "level=high",
                                                         "anchor_delta=false"]))
    assert high.params() == {"level": 2, "anchor_delta": False}  # the profile enters codec_id by its hash
    assert high.codec_id == _codec(profile_path, level=2, anchor_delta=False).codec_id
    profile = Profile.load(profile_path)
    assert high.profile_hash() == profile.hash == profile_path.stem.split("-")[1]
    data = high.encode(make_kv(tokens=5))
    assert read_container(data).header["codec"]["profile"] == profile.hash
    assert profile.meta["calibration"] == {"documents": ["synthetic"], "caches": 3, "tokens": 360}
    assert profile.arrays["window_lo"].shape == (3, 2 * 3 * 16, 2)
    for bad in ({"level": 3}, {"level": "best"}, {"level": True}, {"anchor_delta": 1}):
        with pytest.raises(CodecError):
            codecs.get("cachegen", profile=str(profile_path), **bad)
    with pytest.raises(ProfileError, match="cannot read calibration profile"):
        codecs.get("cachegen", profile=str(profile_path.parent / "missing.kvprof"))
    with pytest.raises(CodecError, match="profile=PATH"):
        codecs.get("cachegen", profile="")


def test_chunks_refuse_another_profile(profile_path: Path, other_profile_path: Path, tmp_path: Path) -> None:
    kv = make_kv(tokens=14)
    data = _codec(profile_path).encode(kv)
    with pytest.raises(ProfileMismatchError):
        codecs.decode(data, codec=_codec(other_profile_path))
    assert _codec(profile_path).codec_id != _codec(other_profile_path).codec_id
    moved = tmp_path / "moved.kvprof"  # the hash names the profile, not its path
    moved.write_bytes(profile_path.read_bytes())
    assert _codec(moved).codec_id == _codec(profile_path).codec_id
    assert codecs.decode(data, codec=_codec(moved)).equal(_codec(profile_path).decode(data))


def test_wrong_model_is_refused(profile_path: Path) -> None:
    codec = _codec(profile_path)
    foreign = make_kv(tokens=10, fingerprint="e" * 64)
    with pytest.raises(CodecError, match="built for model"):
        codec.encode(foreign)
    data = codec.encode(make_kv(tokens=10))
    with pytest.raises(ModelMismatchError):
        codecs.decode(data, foreign.spec, codec=codec)


def test_corrupted_payloads_raise_format_error(profile_path: Path) -> None:
    codec = _codec(profile_path, level=2)
    kv = make_kv(tokens=21, seed=6)
    kv.keys[1][0, 3, 3] = 900.0
    data = codec.encode(kv)
    container = read_container(data)
    meta = container.header["meta"]
    symbols, escapes = bytes(container.section("symbols")), bytes(container.section("escapes"))
    assert meta["escapes"] >= 1
    broken = [
        _rewrite(data, meta={**meta, "escapes": meta["escapes"] + 1}),
        _rewrite(data, meta={**meta, "escapes": 10**9}),
        _rewrite(data, meta={**meta, "escapes": -1}),
        _rewrite(data, meta={**meta, "group_size": 8}),
        _rewrite(data, sections={"escapes": escapes + b"\x00"}),
        _rewrite(data, sections={"escapes": b""}),
        _rewrite(data, sections={"symbols": symbols[:-2]}),
        _rewrite(data, sections={"symbols": symbols[:5]}),
        _rewrite(data, sections={"symbols": symbols[:-2] + bytes([symbols[-2] ^ 0x5A, symbols[-1]])}),
        _rewrite(data, count=22),
        _rewrite(data, count=10**6),
    ]
    for bad in broken:
        with pytest.raises(FormatError):
            codec.decode(bad)
    other_level = _codec(profile_path, level=0)
    with pytest.raises(FormatError):
        other_level.decode_payload(meta, container, kv.spec, 21, None)


def test_profile_validation(profile_path: Path) -> None:
    profile = Profile.load(profile_path)
    tables = CacheGenTables.from_profile(profile)
    assert tables.freqs[0].shape[0] == 2 * tables.rows and np.all(tables.freqs[0][:, -1] >= 1)
    arrays = dict(profile.arrays)
    width = arrays["window_width"].copy()
    width[1, 5, 0] += 1
    bad_std = arrays["std"].copy()
    bad_std[0, 0, 0] = 0.0
    for changed in ({"window_width": width}, {"std": bad_std}, {"bins": -arrays["bins"]},
                    {"mean": arrays["mean"][:1]}):
        forged = Profile(codec="cachegen", model_fingerprint=profile.model_fingerprint, meta=profile.meta,
                         arrays=arrays | changed)
        with pytest.raises(FormatError):
            CacheGenTables.from_profile(forged)
    with pytest.raises(FormatError, match="format"):
        CacheGenTables.from_profile(Profile(codec="cachegen", model_fingerprint="f", meta={}, arrays=arrays))
    with pytest.raises(FormatError, match="not 'cachegen'"):
        CacheGenTables.from_profile(Profile(codec="kvtc", model_fingerprint="f", meta=profile.meta, arrays=arrays))
    assert _codec(profile_path).tables is _codec(profile_path, level=2).tables  # compiled once per profile


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.integers(0, 45), seed=st.integers(0, 2**16), level=st.integers(0, 2),
       anchor_delta=st.booleans(), gain=st.sampled_from([1e-3, 1.0, 40.0]))
def test_error_bound_property(profile_path: Path, tokens: int, seed: int, level: int, anchor_delta: bool,
                              gain: float) -> None:
    kv = make_kv(tokens=tokens, seed=seed)
    kv = KVCache.from_layers(spec=kv.spec, keys=[(k.float() * gain).to(k.dtype) for k in kv.keys], values=kv.values,
                 positions=kv.positions)
    codec = _codec(profile_path, level=level, anchor_delta=anchor_delta)
    assert _within_bound(codec, kv, codec.decode(codec.encode(kv)))


@pytest.mark.model
def test_real_model_error_bound(smollm: tuple[Any, Any, Any], tmp_path: Path) -> None:
    model, tokenizer, spec = smollm
    calibration = [Document(name="prose", kind="prose", text=PROSE * 8),
                   Document(name="code", kind="code", text=Path(__file__).read_text())]
    profile = build_profile(model, tokenizer, spec, calibration, tokens=96)
    assert profile.meta["calibration"]["documents"] == ["prose", "code"]
    path = profile.save(tmp_path)
    from kvpack.inference import prefill

    ids = tokenizer(PROSE * 3, return_tensors="pt", add_special_tokens=False).input_ids[0][:64]
    kv, _ = prefill(model, spec, ids)
    for level in (0, 2):
        codec = _codec(path, level=level)
        data = codec.encode(kv)
        assert _within_bound(codec, kv, codec.decode(data, spec))
        assert kv.fp16_bytes / len(data) > 2


def test_bench_measures_size_speed_and_error(profile_path: Path) -> None:
    from kvpack.bench.cachegen import anchor_delta_stats, measure

    caches = [make_kv(tokens=40, seed=s) for s in (21, 22)]
    row = measure(_codec(profile_path, level=2, anchor_delta=False), caches, chunk=16)
    assert row["containers"] == 6 and row["level"] == 2 and row["anchor_delta"] is False
    assert 0 < row["max_error_over_bound"] <= 1 and row["ratio"] == row["fp16_bytes"] / row["stored_bytes"]
    stats = anchor_delta_stats(_codec(profile_path), caches)
    assert len(stats["groups"]) == 6 and stats["ideal_bits"]["anchor_delta"] > stats["ideal_bits"]["raw"] > 0
