"""Chunk keys: the documented byte encoding, determinism across processes, isolation, chaining, and the secret per
namespace (explicit, environment, secrets file, public default)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.keys import KEY_TAG, KeySpace, chunk_keys, default_secret, env_name, namespace_secret

KEYS_PY = Path(__file__).resolve().parents[1] / "src" / "kvpack" / "keys.py"
SPACE = {"namespace": "tenant-1", "model_fingerprint": "f" * 64, "codec_id": "raw:v1"}


def field(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def reference_keys(
    namespace: str, fingerprint: str, codec_id: str, ids: list[int], n: int, secret: bytes | None = None
) -> list[str]:
    """The encoding exactly as docs/store.md states it, written out independently."""
    if secret is None:  # the documented public default
        secret = hashlib.blake2b(field(b"kvpack/namespace-secret/v1") + field(namespace.encode()), digest_size=32)
        secret = secret.digest()
    out: list[str] = []
    parent = b""
    for start in range(0, len(ids) - n + 1, n):
        msg = field(b"kvpack/chunk-key/v2") + field(namespace.encode()) + field(fingerprint.encode())
        msg += field(codec_id.encode()) + field(parent) + field(struct.pack(f"<{n}q", *ids[start : start + n]))
        digest = hashlib.blake2b(msg, digest_size=32, key=secret).digest()
        out.append(digest.hex())
        parent = digest
    return out


@pytest.fixture(autouse=True)
def no_configured_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys in these tests use the public default unless a test configures a secret."""
    for name in list(os.environ):
        if name.startswith("KVPACK_KEY_SECRET_") or name == "KVPACK_SECRETS_FILE":
            monkeypatch.delenv(name)


def test_matches_the_documented_encoding() -> None:
    ids = list(range(1000, 1000 + 700))
    assert KEY_TAG == b"kvpack/chunk-key/v2"
    assert chunk_keys(**SPACE, token_ids=ids) == reference_keys("tenant-1", "f" * 64, "raw:v1", ids, 256)
    assert chunk_keys(**SPACE, token_ids=ids, chunk_tokens=100) == reference_keys(
        "tenant-1", "f" * 64, "raw:v1", ids, 100
    )


PINNED_KEY = "e98369a37337d7ffd4ab31745051bdd26694ad7325d8ccc4d19ef278848ae768"


def test_pinned_value() -> None:
    """A fixed input's key must never change (stored caches would silently become unreachable)."""
    keys = chunk_keys(
        namespace="ns", model_fingerprint="model", codec_id="codec", token_ids=[1, 2, 3, 4], chunk_tokens=2
    )
    assert keys == reference_keys("ns", "model", "codec", [1, 2, 3, 4], 2)
    secret = hashlib.blake2b(field(b"kvpack/namespace-secret/v1") + field(b"ns"), digest_size=32).digest()
    assert (
        keys[0]
        == hashlib.blake2b(
            b"".join(
                field(b) for b in (b"kvpack/chunk-key/v2", b"ns", b"model", b"codec", b"", struct.pack("<2q", 1, 2))
            ),
            digest_size=32,
            key=secret,
        ).hexdigest()
    )
    assert keys[0] == PINNED_KEY, "the encoding changed: stored caches would become unreachable"


CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("kvkeys", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["kvkeys"] = mod
spec.loader.exec_module(mod)
ids = list(range(5000, 5000 + 1100))
print(json.dumps([hash("salted"), mod.chunk_keys(namespace="tenant-1", model_fingerprint="f" * 64,
                                                   codec_id="raw:v1", token_ids=ids)]))
"""


def test_identical_across_processes_with_different_hash_seeds() -> None:
    """Two fresh interpreters with different PYTHONHASHSEED (Python's own hash differs) derive the same keys.

    The child loads keys.py by path so that it starts in a fraction of a second (no torch import).
    """
    outs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(KEYS_PY)], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    (hash_a, keys_a), (hash_b, keys_b) = outs
    assert hash_a != hash_b, "the children should really have differently salted hash()"
    assert keys_a == keys_b == chunk_keys(**SPACE, token_ids=list(range(5000, 6100)))
    assert len(keys_a) == 4


def test_only_full_chunks_get_keys() -> None:
    assert chunk_keys(**SPACE, token_ids=list(range(255))) == []
    assert len(chunk_keys(**SPACE, token_ids=list(range(256)))) == 1
    assert len(chunk_keys(**SPACE, token_ids=list(range(767)))) == 2
    assert chunk_keys(**SPACE, token_ids=[]) == []


def test_keys_name_prefixes() -> None:
    ids = list(range(1024))
    full = chunk_keys(**SPACE, token_ids=ids)
    assert chunk_keys(**SPACE, token_ids=ids[:600]) == full[:2]
    assert chunk_keys(**SPACE, token_ids=ids[:512] + [7] * 256)[:2] == full[:2]
    assert chunk_keys(**SPACE, token_ids=ids[:512] + [7] * 256)[2] != full[2]


def test_same_chunk_after_different_parents_differs() -> None:
    chunk = list(range(256))
    a = chunk_keys(**SPACE, token_ids=[1] * 256 + chunk)
    b = chunk_keys(**SPACE, token_ids=[2] * 256 + chunk)
    assert a[1] != b[1]
    space = KeySpace(**SPACE)
    assert space.chunk_key(a[0], chunk) == a[1]
    assert space.chunk_key(None, chunk) == chunk_keys(**SPACE, token_ids=chunk)[0]
    assert space.chunk_key(None, chunk) not in (a[1], b[1])


@pytest.mark.parametrize(
    "change",
    [
        {"namespace": "tenant-2"},
        {"model_fingerprint": "e" * 64},
        {"codec_id": "raw:v2"},
        {"chunk_tokens": 128},
    ],
)
def test_every_input_changes_every_key(change: dict[str, object]) -> None:
    ids = list(range(512))
    base = chunk_keys(**SPACE, token_ids=ids)
    changed = chunk_keys(**{**SPACE, **change}, token_ids=ids)  # type: ignore[arg-type]
    assert not set(base) & set(changed)


def test_one_token_changes_its_chunk_and_all_later_ones() -> None:
    ids = list(range(1024))
    base = chunk_keys(**SPACE, token_ids=ids)
    ids[300] += 1
    changed = chunk_keys(**SPACE, token_ids=ids)
    assert changed[0] == base[0]
    assert all(a != b for a, b in zip(base[1:], changed[1:], strict=True))


def test_fields_are_length_prefixed() -> None:
    """Moving characters between adjacent fields must not collide."""
    ids = list(range(256))
    a = chunk_keys(namespace="ab", model_fingerprint="c", codec_id="raw", token_ids=ids)
    b = chunk_keys(namespace="a", model_fingerprint="bc", codec_id="raw", token_ids=ids)
    assert a != b


def test_token_containers_agree() -> None:
    ids = list(range(40_000, 40_600))
    expected = chunk_keys(**SPACE, token_ids=ids)
    for variant in (
        np.array(ids, dtype=np.int64),
        np.array(ids, dtype=np.int32),
        np.array(ids, dtype=np.uint32),
        np.array(ids, dtype=">i8"),
        torch.tensor(ids),
        torch.tensor([ids], dtype=torch.int32),
        tuple(ids),
    ):
        assert chunk_keys(**SPACE, token_ids=variant) == expected


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"namespace": ""}, ValueError),
        ({"model_fingerprint": ""}, ValueError),
        ({"codec_id": "\ud800"}, ValueError),
        ({"chunk_tokens": 0}, ValueError),
        ({"chunk_tokens": 2.5}, ValueError),
        ({"token_ids": [1.5, 2.0]}, TypeError),
        ({"token_ids": [-1, 2]}, ValueError),
        ({"token_ids": [[1, 2], [3, 4]]}, ValueError),
        ({"token_ids": np.array([True, False])}, TypeError),
        ({"token_ids": np.array([2**63], dtype=np.uint64)}, ValueError),
    ],
)
def test_invalid_inputs(kwargs: dict[str, object], error: type[Exception]) -> None:
    args: dict[str, object] = {**SPACE, "token_ids": [1, 2, 3], "chunk_tokens": 2, **kwargs}
    with pytest.raises(error):
        chunk_keys(**args)  # type: ignore[arg-type]


def test_bad_parent_is_rejected() -> None:
    space = KeySpace(**SPACE)
    for parent in ("abc", "z" * 64):
        with pytest.raises(ValueError):
            space.chunk_key(parent, [1, 2])


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**40), max_size=40),
    n=st.integers(1, 8),
    ns=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=10),
)
def test_properties(ids: list[int], n: int, ns: str) -> None:
    space = KeySpace(namespace=ns, model_fingerprint="fp", codec_id="c", chunk_tokens=n)
    keys = space.keys(ids)
    assert len(keys) == len(ids) // n
    assert keys == reference_keys(ns, "fp", "c", ids, n)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert len(set(keys)) == len(keys)  # chained: even repeated chunks get distinct keys
    other = KeySpace(namespace=ns + "x", model_fingerprint="fp", codec_id="c", chunk_tokens=n).keys(ids)
    assert not set(keys) & set(other)


SECRET = bytes(range(32))


def test_a_secret_changes_every_key_and_follows_the_documented_encoding() -> None:
    ids = list(range(600))
    keyed = chunk_keys(**SPACE, token_ids=ids, secret=SECRET)
    assert keyed == reference_keys("tenant-1", "f" * 64, "raw:v1", ids, 256, secret=SECRET)
    assert not set(keyed) & set(chunk_keys(**SPACE, token_ids=ids))
    other = chunk_keys(**SPACE, token_ids=ids, secret=bytes(range(1, 33)))
    assert not set(keyed) & set(other), "same namespace name, different secrets: never the same key"


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_name("KVPACK_KEY_SECRET_", "tenant-1") == "KVPACK_KEY_SECRET_TENANT_1"
    monkeypatch.setenv("KVPACK_KEY_SECRET_TENANT_1", SECRET.hex())
    assert namespace_secret("tenant-1") == SECRET
    assert KeySpace(**SPACE).keys(list(range(256))) == chunk_keys(**SPACE, token_ids=list(range(256)), secret=SECRET)
    assert namespace_secret("tenant-2") == default_secret("tenant-2")


def test_secret_from_the_secrets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets_file = tmp_path / "secrets.toml"
    secrets_file.write_text(f'[namespaces."tenant-1"]\nkey_secret = "{SECRET.hex()}"\n')
    monkeypatch.setenv("KVPACK_SECRETS_FILE", str(secrets_file))
    assert namespace_secret("tenant-1") == SECRET
    assert namespace_secret("other") == default_secret("other")
    monkeypatch.setenv("KVPACK_KEY_SECRET_TENANT_1", bytes(range(1, 33)).hex())  # the environment wins
    assert namespace_secret("tenant-1") == bytes(range(1, 33))


@pytest.mark.parametrize("text", ["nothex", "00" * 15, "00" * 65, ""])
def test_bad_secrets_are_refused(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPACK_KEY_SECRET_TENANT_1", text)
    if text:
        with pytest.raises(ValueError, match="hex"):
            KeySpace(**SPACE)
    with pytest.raises(ValueError):
        KeySpace(**SPACE, secret=b"short")


@pytest.mark.parametrize("content", ["[namespaces", "namespaces = 3", '[namespaces]\n"tenant-1" = 5'])
def test_bad_secrets_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    bad = tmp_path / "secrets.toml"
    bad.write_text(content)
    monkeypatch.setenv("KVPACK_SECRETS_FILE", str(bad))
    with pytest.raises(ValueError, match="secrets file"):
        namespace_secret("tenant-1")
    monkeypatch.setenv("KVPACK_SECRETS_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="cannot read"):
        namespace_secret("tenant-1")


def test_the_secret_is_not_in_the_repr() -> None:
    space = KeySpace(**SPACE, secret=SECRET)
    assert SECRET.hex() not in repr(space) and repr(SECRET) not in repr(space)
