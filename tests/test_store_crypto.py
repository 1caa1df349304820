"""EncryptedStore: AES-256-GCM envelopes, key rotation, and every way an entry can fail to open (wrong or missing
key, tampering, an envelope moved to another key or namespace, a plain entry) is a counted miss, never a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpack.store
from kvpack.errors import StoreError
from kvpack.format import read_container, write_container
from kvpack.store import DiskStore, EncryptedStore, KeyRing, MemoryStore, TieredStore
from stores import entry

K1, K2, K3 = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))


@pytest.fixture(autouse=True)
def no_configured_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVPACK_SECRETS_FILE", raising=False)
    monkeypatch.delenv("KVPACK_ENCRYPTION_KEYS_TENANT_A", raising=False)


def sealed(inner: MemoryStore, namespace: str = "tenant-a", **keys: bytes) -> EncryptedStore:
    current = next(iter(keys))
    return EncryptedStore(inner, namespace, KeyRing(keys=keys, current=current), close_inner=False)


def test_round_trip_and_the_envelope_on_the_backend() -> None:
    inner = MemoryStore()
    store = sealed(inner, k1=K1)
    secret = b"the prompt was: transfer $1M to account 42 " * 20
    data = entry(secret)
    store.put("k", data)
    assert store.get("k") == data
    raw = inner.get("k")
    assert raw is not None and secret[:20] not in raw
    header = read_container(raw).header
    assert header["envelope"] == "kvpack/aes-256-gcm/v1" and header["key_id"] == "k1" and len(header["nonce"]) == 24
    store.put("k2", data)
    assert read_container(inner.get("k2") or b"").header["nonce"] != header["nonce"], "a fresh nonce per entry"
    st_ = store.stats()
    assert (st_.hits, st_.puts, st_.missing_keys, st_.auth_failures, st_.unsealed_entries) == (1, 2, 0, 0, 0)
    assert st_.entries == 2
    assert store.get_range("k", 5, 20) == data[5:20]
    assert store.exists_many(["k", "nope"]) == [True, False]
    assert store.delete("k") and not inner.contains("k")


def test_rotation_old_entries_stay_readable_new_ones_use_the_new_key() -> None:
    inner = MemoryStore()
    old, new = entry(b"old"), entry(b"new")
    sealed(inner, k1=K1).put("a", old)
    rotated = sealed(inner, k2=K2, k1=K1)  # k2 current, k1 still opens
    assert rotated.get("a") == old
    rotated.put("b", new)
    assert read_container(inner.get("b") or b"").header["key_id"] == "k2"
    retired = sealed(inner, k2=K2)  # k1 removed once its entries aged out
    assert retired.get("a") is None and retired.get("b") == new
    assert retired.stats().missing_keys == 1
    assert inner.contains("a"), "an entry another process may still open is not deleted"


def test_wrong_key_with_the_same_id_is_a_counted_miss() -> None:
    inner = MemoryStore()
    sealed(inner, k1=K1).put("a", entry(b"x"))
    impostor = sealed(inner, k1=K3)
    assert impostor.get("a") is None
    assert impostor.stats().auth_failures == 1 and impostor.stats().misses == 1


def reseal(blob: bytes, **changes: object) -> bytes:
    """The envelope rebuilt as a valid container (CRCs fixed) with header fields or the sealed bytes changed."""
    container = read_container(blob)
    header = {k: v for k, v in container.header.items() if k != "sections"}
    sealed_bytes = bytes(container.section("sealed"))
    if "flip" in changes:
        i = int(str(changes.pop("flip")))
        sealed_bytes = sealed_bytes[:i] + bytes([sealed_bytes[i] ^ 1]) + sealed_bytes[i + 1 :]
    header.update(changes)
    return write_container(header, {"sealed": sealed_bytes})


@pytest.mark.parametrize(
    ("change", "counter"),
    [
        ({"flip": 0}, "auth_failures"),
        ({"flip": -1}, "auth_failures"),  # the tag
        ({"nonce": "00" * 12}, "auth_failures"),
        ({"key_id": "k9"}, "missing_keys"),
        ({"key_id": 5}, "unsealed_entries"),
        ({"nonce": "zz"}, "unsealed_entries"),
        ({"envelope": "rot13"}, "unsealed_entries"),
    ],
)
def test_tampered_envelopes_are_counted_misses(change: dict[str, object], counter: str) -> None:
    inner = MemoryStore()
    store = sealed(inner, k1=K1)
    store.put("a", entry(b"secret" * 50))
    envelope = inner.get("a")
    assert envelope is not None
    if change.get("flip") == -1:
        change = {"flip": len(read_container(envelope).section("sealed")) - 1}
    inner.put("a", reseal(envelope, **change))
    assert store.get("a") is None
    assert getattr(store.stats(), counter) == 1


def test_an_envelope_moved_to_another_key_or_namespace_does_not_open() -> None:
    inner = MemoryStore()
    a = sealed(inner, "tenant-a", k1=K1)
    b = sealed(inner, "tenant-b", k1=K1)  # even with the same key bytes and id
    a.put("x", entry(b"tenant a's chunk"))
    envelope = inner.get("x")
    assert envelope is not None
    inner.put("y", envelope)
    assert a.get("y") is None and a.stats().auth_failures == 1
    assert b.get("x") is None and b.stats().auth_failures == 1
    assert a.get("x") == entry(b"tenant a's chunk")


def test_a_plain_entry_where_an_envelope_belongs_is_refused() -> None:
    inner = MemoryStore()
    store = sealed(inner, k1=K1)
    inner.put("p", entry(b"injected by someone with write access"))
    assert store.get("p") is None and store.stats().unsealed_entries == 1


def test_damaged_envelope_is_caught_by_the_inner_store() -> None:
    inner = MemoryStore()
    store = sealed(inner, k1=K1)
    store.put("a", entry(b"z" * 100))
    envelope = inner.get("a") or b""
    inner._entries["a"] = envelope[:-1] + bytes([envelope[-1] ^ 1])  # a bit flip: the container CRC catches it
    assert store.get("a") is None
    assert inner.stats().corrupt_entries == 1 and store.stats().auth_failures == 0


def test_key_ring_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPACK_ENCRYPTION_KEYS_TENANT_A", f"new:{K2.hex()}, old:{K1.hex()}")
    ring = KeyRing.load("tenant-a")
    assert ring.current == "new" and ring.keys == {"new": K2, "old": K1}
    assert K1.hex() not in repr(ring) and K2.hex() not in repr(ring)
    store = EncryptedStore(MemoryStore(), "tenant-a")
    assert store.keyring == ring
    store.close()


def test_key_ring_from_the_secrets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(
        '[namespaces."tenant-a"]\nencryption_key = "2026-12"\n'
        f'encryption_keys = {{ "2026-06" = "{K1.hex()}", "2026-12" = "{K2.hex()}" }}\n'
    )
    ring = KeyRing.load("tenant-a", secrets_file)
    assert ring.current == "2026-12" and set(ring.keys) == {"2026-06", "2026-12"}
    monkeypatch.setenv("KVPACK_SECRETS_FILE", str(secrets_file))
    assert KeyRing.load("tenant-a") == ring
    with pytest.raises(StoreError, match="no encryption keys for namespace 'tenant-b'"):
        KeyRing.load("tenant-b")


@pytest.mark.parametrize(
    "value",
    ["", "k1", f"k1:{K1.hex()[:-2]}", f"k1:{'zz' * 32}", f"bad id:{K1.hex()}", f"k1:{K1.hex()},k2"],
)
def test_bad_key_rings_raise_without_showing_keys(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KVPACK_ENCRYPTION_KEYS_TENANT_A", value)
    with pytest.raises(StoreError) as info:
        KeyRing.load("tenant-a")
    assert K1.hex()[:16] not in str(info.value)


def test_key_ring_validation() -> None:
    with pytest.raises(ValueError):
        KeyRing(keys={}, current="a")
    with pytest.raises(ValueError):
        KeyRing(keys={"a": b"short"}, current="a")
    with pytest.raises(ValueError):
        KeyRing(keys={"a": K1}, current="b")


def test_missing_cryptography_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(StoreError, match=r"kvpack\[crypto\]"):
        EncryptedStore(MemoryStore(), "tenant-a", KeyRing(keys={"k": K1}, current="k"))


def test_toml_encrypts_every_tier_but_memory(tmp_path: Path) -> None:
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(f'[namespaces.tenant-a]\nencryption_key = "k"\nencryption_keys = {{ k = "{K1.hex()}" }}\n')
    config = tmp_path / "tiered.toml"
    config.write_text(
        f'tiers = ["memory://", "file://{tmp_path}/disk?fsync=0"]\n'
        f'[encryption]\nnamespace = "tenant-a"\nsecrets_file = "{secrets_file}"\n'
    )
    with kvpack.store.open(str(config)) as store:
        assert isinstance(store, TieredStore)
        fast, disk = store.tiers
        assert isinstance(fast, MemoryStore)
        assert isinstance(disk, EncryptedStore) and isinstance(disk.inner, DiskStore)
        data = entry(b"chunk")
        store.put("k", data)
        assert store.flush(timeout=10)
        on_disk = disk.inner.entry_path("k").read_bytes()
        assert json.dumps("envelope")[1:-1].encode() in on_disk and b"chunk" not in on_disk
        assert store.get("k") == data
    config.write_text('tiers = ["memory://"]\n[encryption]\nnamespace = "tenant-b"\n')
    with pytest.raises(StoreError, match="no encryption keys"):
        kvpack.store.open(str(config))
    config.write_text('tiers = ["memory://"]\n[encryption]\nname = "x"\n')
    with pytest.raises(StoreError, match=r"\[encryption\]"):
        kvpack.store.open(str(config))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=3000), damage=st.integers(min_value=0))
def test_any_payload_round_trips_and_any_flip_is_a_miss(payload: bytes, damage: int) -> None:
    inner = MemoryStore()
    store = sealed(inner, k1=K1)
    data = entry(payload)
    store.put("k", data)
    assert store.get("k") == data
    envelope = inner.get("k") or b""
    n = len(read_container(envelope).section("sealed"))
    inner.put("k", reseal(envelope, flip=damage % n))
    assert store.get("k") is None
    assert store.stats().auth_failures == 1
