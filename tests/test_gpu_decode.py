"""The GPU decoders (kvpack.gpu) read exactly the CPU's bytes: bit-identical values for raw, lossless, fp8 and kivi,
on small caches. Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before anything is imported), so every commit checks them; the interpreter is slow, hence the
tiny shapes (its cost grows with the longest rANS lane)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from numba import njit

import kvpack
from conftest import make_kv
from forged import Source, attacks, rewrite
from kvpack import gpu
from kvpack.codecs.common import float_bits
from kvpack.errors import CodecError, FormatError, KvpackError
from kvpack.gpu.floats import to_bits
from kvpack.kv import KVCache, int_view

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(int_view(a.cpu().contiguous()), int_view(b.cpu().contiguous()))


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("raw", {}, "bfloat16"),
    ("raw", {"dtype": "float16"}, "float32"),
    ("zstd", {}, "bfloat16"),
    ("lossless", {}, "bfloat16"),
    ("lossless", {"classes": 2}, "float16"),
    ("lossless", {"classes": 1}, "float32"),
    ("fp8", {}, "bfloat16"),
    ("fp8", {}, "float16"),
    ("kivi", {"bits": 2, "group": 4}, "bfloat16"),
    ("kivi", {"bits": 4, "group": 3, "residual": 1}, "float16"),
]


@pytest.mark.parametrize(("name", "params", "dtype"), CASES, ids=lambda v: str(v))
def test_gpu_decode_is_bit_identical_to_cpu(name: str, params: dict[str, Any], dtype: str) -> None:
    kv = make_kv(tokens=6, layers=1, heads=2, head_dim=8, dtype=dtype, start=2)
    if dtype != "float32":  # zeros, tiny and huge values: lossless escapes; fp16 subnormals after rounding
        kv.data[0, 0, 0, 3, :4] = torch.tensor([0.0, -0.0, 1e-6, 3e4]).to(kv.data.dtype)
    data = kvpack.encode(kv, name, **params)
    cpu = kvpack.decode(data)
    dev = gpu.decode(data, kv.spec, device=DEVICE, token_ids=kv.token_ids)
    assert dev.data.device.type == DEVICE and dev.data.dtype == kv.data.dtype
    assert same_bits(dev.data, cpu.data)
    assert torch.equal(dev.positions, cpu.positions) and torch.equal(dev.token_ids, kv.token_ids)


def test_gpu_decode_into_a_token_slice_of_a_larger_cache() -> None:
    kv = make_kv(tokens=4, layers=1, heads=2, head_dim=8)
    data = kvpack.encode(kv, "fp8")
    whole = KVCache.empty(kv.spec, 10, device=DEVICE)
    whole.data.zero_()
    gpu.decode(data, device=DEVICE, out=whole[3:7])
    assert same_bits(whole.data[:, :, :, 3:7], kvpack.decode(data).data)
    assert not whole.data[:, :, :, :3].any() and not whole.data[:, :, :, 7:].any()


def flip_word(data: bytes, section: str) -> bytes:
    """``data`` with the last two bytes of ``section`` (rANS words) changed, checksums recomputed."""
    def edit(_: dict[str, Any], sections: dict[str, bytes]) -> None:
        body = sections[section]
        sections[section] = body[:-2] + bytes([body[-2] ^ 0x5A, body[-1] ^ 0x01])
    return rewrite(data, edit)


def test_gpu_lossless_merge_refuses_escapes_in_the_wrong_tile() -> None:
    """Escape counts moved from one tile to the next (same total, so every size check passes): only the merge can
    tell, and the kernel refuses it as the CPU does."""
    kv = make_kv(tokens=6, layers=1, heads=2, head_dim=8)
    kv.data[0, 0, 0, 3, :4] = 0.0  # zeros in a row of large values: escapes in the first tile
    data = kvpack.encode(kv, "lossless")

    def edit(_: dict[str, Any], sections: dict[str, bytes]) -> None:
        counts = bytearray(sections["escapes"])
        assert counts[0] > 0 and counts[0] < 128 and counts[1] < 127  # one-byte varints
        counts[0] -= 1
        counts[1] += 1
        sections["escapes"] = bytes(counts)

    forged = rewrite(data, edit)
    with pytest.raises(FormatError, match="escapes"):
        kvpack.decode(forged)
    with pytest.raises(FormatError, match="escapes"):
        gpu.decode(forged, device=DEVICE)


@pytest.mark.parametrize("name", ["lossless", "fp8", "kivi"])
def test_gpu_decoders_refuse_what_the_cpu_refuses(name: str) -> None:
    """Forged headers and sections fail the validation that runs before any kernel, corrupted rANS words fail the
    kernels' own checks: with the error the CPU raises, or, where rANS cannot tell, with the CPU's exact values."""
    kv = make_kv(tokens=6, layers=1, heads=2, head_dim=8, start=3)  # one sink token (kivi's forgeries need it)
    data = kvpack.encode(kv, name)
    cases = [rewrite(data, attack.edit) for attack in attacks(Source(name, data, None, kv.spec.to_json()))
             if attack.name.startswith(("tokens", "section symbols", "section rows", "meta"))]
    cases += [flip_word(data, "symbols")]
    for case in cases:
        try:
            expected = kvpack.decode(case)
        except KvpackError as cpu_error:
            with pytest.raises(type(cpu_error)):
                gpu.decode(case, device=DEVICE)
        else:
            assert same_bits(gpu.decode(case, device=DEVICE).data, expected.data)


def test_cpu_without_the_interpreter_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    data = kvpack.encode(make_kv(tokens=4), "fp8")
    with pytest.raises(CodecError, match="CUDA"):
        gpu.decode(data, device="cpu")


@pytest.fixture(scope="module")
def cachegen_profile(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvpack.codecs.cachegen.calibrate import build_profile_from_caches

    profile = build_profile_from_caches([make_kv(tokens=60, seed=s) for s in range(2)])
    return str(profile.save(tmp_path_factory.mktemp("cachegen")))


@pytest.mark.parametrize("anchor_delta", [True, False])
def test_gpu_cachegen_is_bit_identical_to_cpu(cachegen_profile: str, anchor_delta: bool) -> None:
    """cachegen's lanes (one table each: the binary-search lookup) and its float64 reconstruction, identical."""
    kv = make_kv(tokens=23, seed=5)
    kv.data[1, 0, 1, 4, 2] = 40.0  # far outside its table's window: escapes
    codec = kvpack.codecs.get("cachegen", profile=cachegen_profile, anchor_delta=anchor_delta)
    data = codec.encode(kv)
    cpu = codec.decode(data)
    dev = gpu.decode(data, device=DEVICE, codec=codec)
    assert same_bits(dev.data, cpu.data)
    with pytest.raises(FormatError):
        gpu.decode(flip_word(data, "symbols"), device=DEVICE, codec=codec)


@pytest.mark.parametrize("recipe", ["transform", "kvtc"])
def test_gpu_transform_matches_cpu(tmp_path: Path, recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """transform: identical symbols and coefficients; values within the GEMM's rounding (on a CPU, under the
    interpreter, the same float32 GEMM: identical)."""
    from kvpack.codecs.transform.codec import PROJECTION_ENV

    monkeypatch.setenv(PROJECTION_ENV, "float32")  # the GPU decoder multiplies in float32
    from kvpack.codecs.transform.calibrate import calibrate_from_caches
    from kvpack.entropy import parse
    from kvpack.entropy.rans_triton import decode_stream
    from kvpack.format import read_container
    from test_calibrate import low_rank_caches

    caches = low_rank_caches(n=2, tokens=120)  # as tests/forged.py builds its profiles
    profile = calibrate_from_caches(caches, caches[0].spec, recipe=recipe, ratios=(4.0,), default_ratio=4.0,
                                    reference_tokens=128)
    path = profile.save(tmp_path / f"{recipe}.kvprof")
    kv = low_rank_caches(n=1, tokens=10, seed=7, positions=torch.arange(2, 12))[0]
    codec = kvpack.codecs.get(recipe, profile=str(path))
    data = codec.encode(kv)
    blob = read_container(data).section("e0")
    if len(blob):
        stream = parse(blob, max_symbols=1 << 20, freqs=codec.state().model)
        symbols, _ = kvpack.entropy.unpack(blob, max_symbols=1 << 20, freqs=codec.state().model)
        assert torch.equal(decode_stream(stream, DEVICE).cpu(), torch.from_numpy(symbols))
    cpu = codec.decode(data)
    dev = gpu.decode(data, device=DEVICE, codec=codec)
    if DEVICE == "cpu":
        assert same_bits(dev.data, cpu.data)
    else:  # GEMM and RoPE rounding differ on a GPU: within a few units of the cache dtype's last place
        assert torch.allclose(dev.data.float().cpu(), cpu.data.float(), rtol=2**-6, atol=1e-3)


def test_decode_device_argument_dispatch() -> None:
    """``kvpack.decode(device=)``: a CPU device keeps the CPU decoders; CUDA goes to kvpack.gpu (refused clearly
    without CUDA); ``out=`` on another device than ``device=`` is an error."""
    kv = make_kv(tokens=4, layers=1)
    data = kvpack.encode(kv, "fp8")
    assert same_bits(kvpack.decode(data, device="cpu").data, kvpack.decode(data).data)
    with pytest.raises(ValueError, match="device"):
        kvpack.decode(data, out=KVCache.empty(kv.spec, 4), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(CodecError, match="CUDA"):
            kvpack.decode(data, device="cuda")


@triton.jit
def _apply_to_bits(u, out, n, KIND: tl.constexpr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(u + i, mask=i < n, other=0)
    tl.store(out + i, to_bits(x, KIND), mask=i < n)


@njit
def _float_bits_cpu(u, kind):  # type: ignore[no-untyped-def]
    out = np.empty_like(u)
    for i in range(u.size):
        out[i] = float_bits(u[i], kind)
    return out


def test_gpu_rounding_matches_the_cpu_bit_for_bit() -> None:
    """kvpack.gpu.floats.to_bits against the CPU kernels' float_bits on every kind of float32: normals, subnormals of
    the targets, overflow to inf, ties, infinities and NaN payloads of both signs."""
    rng = np.random.default_rng(0)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x477FF000,
                        0x477FEFFF, 0x38800000, 0x387FFFFF, 0x33000000, 0x32FFFFFF, 0x33000001, 0x3F808000,
                        0x3F818000, 0x3F80FFFF, 0x7F7FFFFF], np.int64)
    exponents = rng.integers(96, 144, 4000) << 23  # around fp16's subnormal and normal range
    u = np.concatenate([special, rng.integers(0, 1 << 32, 4000), exponents | rng.integers(0, 1 << 23, 4000),
                        (exponents | rng.integers(0, 1 << 23, 4000)) | (1 << 31)]).astype(np.int64)
    for kind in (1, 2):
        out = torch.empty(u.size, dtype=torch.int64, device=DEVICE)
        _apply_to_bits[(triton.cdiv(u.size, 1024),)](torch.from_numpy(u).to(DEVICE), out, u.size, KIND=kind,
                                                      BLOCK=1024)
        assert np.array_equal(out.cpu().numpy(), _float_bits_cpu(u, kind)), kind
