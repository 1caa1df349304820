"""Container format v1: golden files pin the bytes; mutated files raise only typed errors."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack
from conftest import make_kv
from kvpack.errors import FormatError, KvpackError
from kvpack.format import MAGIC, crc32, read_container, write_container

GOLDEN = Path(__file__).parent / "golden"


def golden_cases() -> dict[str, bytes]:
    """The inputs behind the golden files, rebuilt deterministically."""
    bf16 = make_kv(tokens=6, seed=7, layers=2, heads=1, head_dim=4)
    fp32 = make_kv(tokens=3, seed=8, layers=1, heads=2, head_dim=2, dtype="float32", start=100)
    gapped = make_kv(tokens=3, seed=9, layers=1, heads=1, head_dim=2, dtype="float16")
    gapped.positions = torch.tensor([0, 5, 9])
    return {
        "raw_bf16.kvp": kvpack.encode(bf16, "raw"),
        "raw_fp32_to_fp16.kvp": kvpack.encode(fp32, "raw", dtype="float16"),
        "raw_fp16_positions.kvp": kvpack.encode(gapped, "raw"),
    }


@pytest.mark.parametrize("name", sorted(golden_cases()))
def test_golden_files_pin_the_format(name: str) -> None:
    produced = golden_cases()[name]
    stored = (GOLDEN / name).read_bytes()
    assert produced == stored, f"{name}: the encoder's bytes changed; the container format v1 must not change"
    decoded = kvpack.decode(stored)
    again = kvpack.decode(produced)
    assert decoded.equal(again)


def test_raw_fp16_downcast_is_explicit() -> None:
    kv = make_kv(tokens=5, dtype="float32")
    out = kvpack.decode(kvpack.encode(kv, "raw", dtype="float16"))
    assert out.keys[0].dtype == torch.float32
    assert torch.equal(out.keys[0], kv.keys[0].half().float())


def test_foreign_and_future_inputs() -> None:
    with pytest.raises(FormatError, match="magic"):
        read_container(b"PK\x03\x04" + bytes(40))
    data = bytearray(kvpack.encode(make_kv(tokens=2)))
    data[8] = 2
    with pytest.raises(FormatError, match="version 2"):
        read_container(bytes(data))
    with pytest.raises(FormatError, match="too short"):
        read_container(MAGIC)
    profile_like = write_container({"kind": "profile"}, {"x": b"1"})
    with pytest.raises(FormatError, match="not a KV cache"):
        kvpack.decode(profile_like)


BASE = kvpack.encode(make_kv(tokens=3, seed=1, layers=2, heads=1, head_dim=4))
OTHER = kvpack.encode(make_kv(tokens=5, seed=2, layers=1, heads=2, head_dim=4, dtype="float16"))


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(BASE)
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "bytes", "extend"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "splice":
        cut = draw(st.integers(0, len(data)))
        start = draw(st.integers(0, len(OTHER)))
        return bytes(data[:cut]) + OTHER[start:]
    if kind == "bytes":
        i = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data[i : i + len(patch)] = patch
        return bytes(data[: len(BASE)])
    return bytes(data) + draw(st.binary(min_size=1, max_size=32))


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations())
def test_every_corrupted_byte_is_detected(mutated: bytes) -> None:
    if mutated in (BASE, OTHER):  # a splice can rebuild a whole valid file: nothing is corrupted then
        return
    with pytest.raises(KvpackError) as info:
        kvpack.decode(mutated)
    assert isinstance(info.value, FormatError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        kvpack.decode(MAGIC + data)


@pytest.mark.parametrize("level", [1, 19])
def test_zstd_is_bit_exact_and_bounded(level: int) -> None:
    kv = make_kv(tokens=40)
    data = kvpack.encode(kv, "zstd", level=level)
    assert kvpack.decode(data, token_ids=kv.token_ids).equal(kv)
    with pytest.raises(kvpack.CodecError):
        kvpack.codecs.get("zstd", level=0)


@given(st.binary(max_size=4096), st.integers(0, 64))
def test_crc32_is_zlibs(data: bytes, skip: int) -> None:
    """The containers' checksum (ISA-L) is zlib's CRC-32, on bytes and on memoryviews into them."""
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[skip:]) == zlib.crc32(data[skip:])
