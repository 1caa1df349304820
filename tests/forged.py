"""Forged containers: CRC-valid kvpack files whose header or sections lie, and a sandboxed decoder to feed them to.

A writer with access to a shared store can write any bytes with valid checksums, so the container format's CRCs
prove nothing about the header. This module builds such files from real encodings of small synthetic caches, for
every registered codec (docs/format.md, "Forged containers"):

* :func:`sources`: one clean container per codec (calibrated codecs get a small profile built here);
* :func:`attacks`: the named attacks, each a header or section edit that makes the container lie (a count, a
  shape, a dtype, a position, a codec parameter, a meta field, a section length, a profile hash);
* :func:`rewrite`: re-serialize a container after such an edit, with fresh, valid checksums;
* :class:`Sandbox`: a worker process that decodes what it is sent under an address-space limit (``RLIMIT_AS``) and
  reports the outcome as one JSON line; the parent enforces a per-case timeout and restarts the worker after a
  crash or a hang, so a bad case cannot take the test run with it.

Run as a script (``python tests/forged.py``) it is that worker.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvpack.kv import KVCache

#: Address space the worker may add to what it holds after start-up and warm-up (its decodes must fit in this).
HEADROOM_BYTES = 2 << 30
#: Wall-clock limit of one decode in the worker, enforced by the parent.
CASE_SECONDS = 20.0

Header = dict[str, Any]
Sections = dict[str, bytes]
Edit = Callable[[Header, Sections], None]


@dataclass(frozen=True)
class Source:
    """A clean container of codec ``codec`` and what decoding it needs (``profile``: a path, or ``None``)."""

    codec: str
    data: bytes
    profile: str | None
    spec_json: dict[str, Any]


@dataclass(frozen=True)
class Attack:
    """A named forgery: ``edit`` changes a parsed header (without its section table) and the sections in place."""

    name: str
    edit: Edit


# --------------------------------------------------------------------------------------------- building the corpus


def build_profiles(profile_dir: Path) -> dict[str, str]:
    """Small calibration profiles for the codecs that need one (:data:`PROFILED`), written to ``profile_dir``:
    ``{codec name: path}``. Shared with the codec conformance suite."""
    from conftest import make_kv
    from kvpack.codecs.cachegen.calibrate import build_profile_from_caches
    from kvpack.codecs.transform.calibrate import calibrate_from_caches
    from test_calibrate import low_rank_caches

    out = {"cachegen": str(build_profile_from_caches([make_kv(tokens=60, seed=s) for s in range(2)])
                           .save(profile_dir))}
    caches = low_rank_caches(n=2, tokens=120)
    for recipe in ("transform", "kvtc"):
        profile = calibrate_from_caches(caches, caches[0].spec, recipe=recipe, ratios=(4.0,), default_ratio=4.0,
                                        reference_tokens=128)
        out[recipe] = str(profile.save(profile_dir / f"{recipe}.kvprof"))
    return out


#: Codecs whose profile fixes the model: their caches come from the profile's synthetic model.
PROFILED = ("cachegen", "transform", "kvtc")


def sample_cache(codec: str, tokens: int, seed: int = 3, start: int = 3, **spec_kwargs: Any) -> KVCache:
    """A synthetic cache that ``codec`` can encode: for :data:`PROFILED` codecs one of the model its profile was
    built on (``spec_kwargs`` ignored), else :func:`conftest.make_kv` with ``spec_kwargs``."""
    import torch

    from conftest import make_kv
    from test_calibrate import low_rank_caches

    if codec in ("transform", "kvtc"):
        positions = torch.arange(start, start + tokens, dtype=torch.int64)
        kv = low_rank_caches(n=1, tokens=tokens, seed=seed, positions=positions)[0]
        kv.token_ids = torch.randint(0, 50000, (tokens,), generator=torch.Generator().manual_seed(seed))
        return kv
    if codec == "cachegen":
        return make_kv(tokens=tokens, seed=seed, start=start)
    return make_kv(tokens=tokens, seed=seed, start=start, **spec_kwargs)


def codec_params(codec: str, profiles: Mapping[str, str]) -> dict[str, Any]:
    """Parameters the corpus and the conformance suite build ``codec`` with (its profile, for :data:`PROFILED`)."""
    params: dict[str, Any] = {"profile": profiles[codec]} if codec in PROFILED else {}
    if codec == "kivi":
        params["residual"] = 5  # every optional section present
    return params


def sources(profile_dir: Path) -> list[Source]:
    """One clean container per registered codec, of a small synthetic cache with a sink token and a residual, so
    that every optional section is present (profiles are written to ``profile_dir``)."""
    from kvpack.codecs import available, get

    profiles = build_profiles(profile_dir)
    out = []
    for name in available():
        kv = sample_cache(name, 40 if name in ("transform", "kvtc") else 37)
        data = get(name, **codec_params(name, profiles)).encode(kv)
        out.append(Source(codec=name, data=data, profile=profiles.get(name), spec_json=kv.spec.to_json()))
    return out


def rewrite(data: bytes, edit: Edit) -> bytes:
    """``data`` after ``edit`` of its header and sections, re-serialized with valid checksums."""
    from kvpack.format import read_container, write_container

    container = read_container(data)
    header = copy.deepcopy({k: v for k, v in container.header.items() if k != "sections"})
    sections = {name: bytes(view) for name, view in container.sections.items()}
    edit(header, sections)
    return write_container(header, sections)


def _set(path: tuple[str, ...], value: Any) -> Edit:
    """An edit setting ``header[path[0]][path[1]]... = value``."""
    def edit(header: Header, _: Sections) -> None:
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = copy.deepcopy(value)
    return edit


def _delete(path: tuple[str, ...]) -> Edit:
    """An edit removing ``header[path[0]]...[path[-1]]``."""
    def edit(header: Header, _: Sections) -> None:
        node = header
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


def _section(name: str, change: Callable[[bytes], bytes] | None) -> Edit:
    """An edit replacing section ``name`` by ``change(its bytes)`` (``b""`` if absent), or removing it (``None``)."""
    def edit(_: Header, sections: Sections) -> None:
        if change is None:
            del sections[name]
        else:
            sections[name] = change(sections.get(name, b""))
    return edit


def _constant(body: bytes) -> Callable[[bytes], bytes]:
    """A section change that replaces whatever was there by ``body``."""
    return lambda _: body


def _each(*edits: Edit) -> Edit:
    def edit(header: Header, sections: Sections) -> None:
        for e in edits:
            e(header, sections)
    return edit


#: Values no integer header field accepts: the wrong JSON type, out of every range, or a bool posing as an int
#: (Python's ``isinstance(True, int)``; a bool reaching a numba kernel compiles a new specialization for seconds).
BAD_INTS: tuple[Any, ...] = (True, False, -1, 1 << 62, 1 << 70, 1.5, "16", None, [], {})
#: Values no float field accepts.
BAD_FLOATS: tuple[Any, ...] = (float("nan"), float("inf"), -1.0, 0.0, "x", True, None, [])


def _spec_attacks(spec: Mapping[str, Any]) -> Iterator[Attack]:
    layers = spec["num_layers"]
    for field in ("num_layers", "num_kv_heads", "head_dim"):
        for value in (*BAD_INTS, 0, 1 << 16, (1 << 16) + 1):
            yield Attack(f"spec.{field}={value!r}", _set(("spec", field), value))
        yield Attack(f"spec.{field} doubled", _set(("spec", field), 2 * spec[field]))
    deep = _set(("spec", "sliding_windows"), [None] * (1 << 16))
    yield Attack("spec: 65536^3 elements per token (overflows int64 with 2^20 tokens)",
                 _each(_set(("spec", "num_layers"), 1 << 16), _set(("spec", "num_kv_heads"), 1 << 16),
                       _set(("spec", "head_dim"), 1 << 16), deep, _set(("tokens", "count"), 1 << 20)))
    yield Attack("spec: SmolLM2 shape with 2^20 tokens (the 24 GB lossless allocation)",
                 _each(_set(("spec", "num_layers"), 30), _set(("spec", "num_kv_heads"), 3),
                       _set(("spec", "head_dim"), 64), _set(("spec", "sliding_windows"), [None] * 30),
                       _set(("tokens", "count"), 1 << 20)))
    for value in ("float64", "int8", "", None, True, 16):
        yield Attack(f"spec.dtype={value!r}", _set(("spec", "dtype"), value))
    for windows in ([None] * (layers + 1), [None] * (layers - 1), ["x"] * layers, [True] * layers,
                    [-1] * layers, [0] * layers, [1.5] * layers, None, "full"):
        yield Attack(f"spec.sliding_windows={str(windows)[:30]}", _set(("spec", "sliding_windows"), windows))
    for value in BAD_FLOATS:
        yield Attack(f"spec.rope.theta={value!r}", _set(("spec", "rope", "theta"), value))
    for value in (*BAD_FLOATS, 1.5):
        yield Attack(f"spec.rope.partial_rotary_factor={value!r}", _set(("spec", "rope", "partial_rotary_factor"),
                                                                        value))
    yield Attack("spec.rope.type=unknown", _set(("spec", "rope", "type"), "spiral"))
    yield Attack("spec.rope.params=list", _set(("spec", "rope", "params"), [1, 2]))
    yield Attack("spec.fingerprint=int", _set(("spec", "fingerprint"), 7))
    yield Attack("spec=list", _set(("spec",), [1, 2, 3]))
    yield Attack("spec missing", _delete(("spec",)))


def _token_attacks(count: int) -> Iterator[Attack]:
    for value in (*BAD_INTS, count + 1, count - 1, 0, 1 << 20, (1 << 20) + 1):
        yield Attack(f"tokens.count={value!r}", _set(("tokens", "count"), value))
    for value in (*BAD_INTS, 1 << 40, (1 << 63) - 1):
        yield Attack(f"tokens.positions.start={value!r}", _set(("tokens", "positions"), {"start": value}))
    yield Attack("tokens.positions names a missing section", _set(("tokens", "positions"), {"section": "positions"}))
    for size in (0, 8 * count - 8, 8 * count + 8, 8 * count + 1):
        def short(header: Header, sections: Sections, size: int = size) -> None:
            header["tokens"]["positions"] = {"section": "positions"}
            sections["positions"] = bytes(size)
        yield Attack(f"positions section of {size} bytes", short)
    yield Attack("tokens.positions=list", _set(("tokens", "positions"), [0, 1]))
    yield Attack("tokens.positions={}", _set(("tokens", "positions"), {}))
    yield Attack("tokens.ids_hash=int", _set(("tokens", "ids_hash"), 5))
    yield Attack("tokens=list", _set(("tokens",), []))


def _codec_attacks(source_codec: str, params: Mapping[str, Any], profile: str | None) -> Iterator[Attack]:
    yield Attack("kind=profile", _set(("kind",), "profile"))
    yield Attack("codec.name=unknown", _set(("codec", "name"), "gzip"))
    other = "lossless" if source_codec != "lossless" else "raw"
    yield Attack(f"codec.name={other} (sections of another codec)", _set(("codec", "name"), other))
    for value in (2, 0, True, "1", None):
        yield Attack(f"codec.version={value!r}", _set(("codec", "version"), value))
    yield Attack("codec.params has an unknown field", _set(("codec", "params", "zzz"), 1))
    yield Attack("codec.params=list", _set(("codec", "params"), []))
    for field, value in params.items():
        if isinstance(value, bool):
            bad: tuple[Any, ...] = (1, "x", [], {}, None)
        elif isinstance(value, int):
            bad = (*BAD_INTS, "x")
        else:  # a string, a float or None: values of no parameter's type
            bad = ([], {}, True)
        for b in bad:
            if b != value and not (isinstance(b, float) and isinstance(value, float)):
                yield Attack(f"codec.params.{field}={b!r}", _set(("codec", "params", field), b))
    if profile is None:
        yield Attack("codec.profile names a profile this codec has none of", _set(("codec", "profile"), "ab" * 16))
    else:
        yield Attack("codec.profile=another hash", _set(("codec", "profile"), "0" * 64))
        yield Attack("codec.profile=null", _set(("codec", "profile"), None))
        yield Attack("codec.profile=int", _set(("codec", "profile"), 12))


def _meta_attacks(meta: Mapping[str, Any]) -> Iterator[Attack]:
    yield Attack("meta=list", _set(("meta",), []))
    yield Attack("meta=null", _set(("meta",), None))
    for field, value in meta.items():
        yield Attack(f"meta.{field} missing", _delete(("meta", field)))
        if isinstance(value, int) and not isinstance(value, bool):
            bad: tuple[Any, ...] = (*BAD_INTS, value + 1, (1 << 20) - 1)
        elif isinstance(value, str):
            bad = (value + "x", 1, None, True, [])
        else:
            bad = ("x", None, [])
        for b in bad:
            if b != value:
                yield Attack(f"meta.{field}={b!r}", _set(("meta", field), b))


def _section_attacks(sections: Mapping[str, bytes]) -> Iterator[Attack]:
    for name, body in sections.items():
        yield Attack(f"section {name} missing", _section(name, None))
        yield Attack(f"section {name} + 1 byte", _section(name, lambda b: b + b"\x00"))
        yield Attack(f"section {name} doubled", _section(name, lambda b: b * 2 + b"\x01"))
        if body:
            yield Attack(f"section {name} - 1 byte", _section(name, lambda b: b[:-1]))
            yield Attack(f"section {name} emptied", _section(name, lambda b: b""))
    yield Attack("unknown extra section", _section("zzz", lambda b: b"\x00" * 16))


def _stream_attacks(sections: Mapping[str, bytes]) -> Iterator[Attack]:
    """rANS blobs (those that carry their tables) re-packed with the same symbol count but a lane layout or a table
    count the shapes do not imply: one-symbol lanes alternating between tables (a decoder that accepted them would
    rebuild a 32K-slot table per lane) and 4096 tables (the reader allocates 1 KiB per table)."""
    import numpy as np

    from kvpack.entropy import PROB_SCALE, pack, parse
    from kvpack.errors import FormatError

    for name, body in sections.items():
        try:
            stream = parse(body, max_symbols=1 << 40)
        except FormatError:  # not a blob, or one whose tables live in a profile
            continue
        total = int(stream.lane_starts[-1])
        n_tables, alphabet = stream.freqs.shape
        if total == 0 or n_tables < 2:
            continue
        zeros = np.zeros(total, np.uint8)
        for tables in (n_tables, 4096):
            freqs = np.zeros((tables, alphabet), np.uint32)
            freqs[:, 0] = PROB_SCALE
            lanes = np.arange(total + 1, dtype=np.int64)
            blob = pack(zeros, lanes, (np.arange(total) % tables).astype(np.int32), freqs)
            yield Attack(f"section {name}: {total} one-symbol lanes over {tables} tables",
                         _section(name, _constant(blob)))


def _consistent_lies(source: Source, header: Mapping[str, Any]) -> Iterator[Attack]:
    """Lies that keep the sections the lengths they were: only the content of the sections can give them away."""
    meta = header["meta"]
    count = header["tokens"]["count"]
    if {"sink_tokens", "residual_tokens"} <= set(meta):  # kivi: the extra tokens claimed exact (the slow case)
        extra = (1 << 20) - count
        yield Attack("kivi: 2^20 tokens, the extra ones claimed as sink tokens",
                     _each(_set(("tokens", "count"), 1 << 20),
                           _set(("meta", "sink_tokens"), meta["sink_tokens"] + extra)))
        assert meta["sink_tokens"] == 1, "the source must have one sink token, so that `true` has the right count"
        yield Attack("kivi: sink_tokens=true (a bool in a numba kernel)", _set(("meta", "sink_tokens"), True))
    spec = header["spec"]
    if source.codec == "cachegen" and spec["num_kv_heads"] % 2 == 0:  # raw bytes cannot tell; its profile can
        yield Attack("spec: heads halved, head_dim doubled (same elements per token)",
                     _each(_set(("spec", "num_kv_heads"), spec["num_kv_heads"] // 2),
                           _set(("spec", "head_dim"), spec["head_dim"] * 2)))


def attacks(source: Source) -> list[Attack]:
    """Every named attack on ``source`` that a decoder must refuse with a typed error (header or sections lie)."""
    from kvpack.format import read_container

    container = read_container(source.data)
    header = container.header
    sections = {name: bytes(view) for name, view in container.sections.items()}
    out = [*_spec_attacks(header["spec"]), *_token_attacks(header["tokens"]["count"]),
           *_codec_attacks(source.codec, header["codec"]["params"], source.profile), *_meta_attacks(header["meta"]),
           *_section_attacks(sections), *_stream_attacks(sections), *_consistent_lies(source, header)]
    names = [a.name for a in out]
    assert len(set(names)) == len(names), "attack names must be unique"
    return out


# --------------------------------------------------------------------------------------------- the sandbox


@dataclass(frozen=True)
class Outcome:
    """What decoding one case did: ``error`` is the exception's class name (``None``: decoded), ``typed`` whether it
    is a :class:`kvpack.errors.KvpackError`; ``crashed``: the worker died or ran past :data:`CASE_SECONDS`."""

    error: str | None
    typed: bool
    message: str
    seconds: float
    crashed: bool = False


class Sandbox:
    """A worker process (this file as a script) decoding containers under ``RLIMIT_AS``, one request at a time.

    Use as a context manager. :meth:`decode` sends one container and waits at most ``timeout`` seconds; a worker
    that crashes (out of memory, a segfault) or hangs is killed and replaced, and the outcome says so.
    """

    def __init__(self, warm: list[Source]) -> None:
        self._warm = warm
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self._stop()

    @property
    def pid(self) -> int | None:
        """The worker's process id, or ``None`` before the first decode."""
        return None if self._proc is None else self._proc.pid

    def _start(self) -> subprocess.Popen[bytes]:
        tests = str(Path(__file__).parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._proc = proc
        for source in self._warm:  # compile the decoders and start numba's threads before the limit applies
            self._send(proc, source.data, source.profile, None)
        self._send(proc, b"", None, None, limit=True)
        return proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], data: bytes, profile: str | None, spec: dict[str, Any] | None,
              limit: bool = False, timeout: float = 600.0, prefix_of: dict[str, Any] | None = None) -> Outcome:
        assert proc.stdin is not None and proc.stdout is not None
        request = {"data": base64.b64encode(data).decode(), "profile": profile, "spec": spec, "limit": limit,
                   "prefix_of": prefix_of}
        start = time.monotonic()
        try:
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return Outcome(None, False, "worker died", 0.0, crashed=True)
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line:
            return Outcome(None, False, f"no answer within {timeout} s (or the worker died: rc {proc.poll()})",
                           time.monotonic() - start, crashed=True)
        reply = json.loads(line)
        return Outcome(reply["error"], reply["typed"], reply["message"], reply["seconds"])

    def decode(self, data: bytes, profile: str | None = None, spec: dict[str, Any] | None = None,
               timeout: float = CASE_SECONDS, prefix_of: dict[str, Any] | None = None) -> Outcome:
        """Decode ``data`` in the worker (``kvpack.decode(data, spec, profile=profile)``; with ``prefix_of``, the
        ``codec`` object of a header, through that codec's ``decode_prefix``) and report the outcome."""
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        outcome = self._send(proc, data, profile, spec, timeout=timeout, prefix_of=prefix_of)
        if outcome.crashed:
            self._stop()
        return outcome


def _serve() -> None:
    """The worker loop: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import kvpack
    from kvpack.codecs import get
    from kvpack.errors import KvpackError
    from kvpack.spec import ModelSpec

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the reply channel
    for line in sys.stdin:
        request = json.loads(line)
        if request["limit"]:
            with open("/proc/self/status") as status:
                size = next(int(x.split()[1]) * 1024 for x in status if x.startswith("VmSize:"))
            resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM_BYTES, size + HEADROOM_BYTES))
            reply: dict[str, Any] = {"error": None, "typed": True, "message": f"limit {size + HEADROOM_BYTES}",
                                     "seconds": 0.0}
        else:
            data = base64.b64decode(request["data"])
            spec = None if request["spec"] is None else ModelSpec.from_json(request["spec"])
            start = time.monotonic()
            try:
                codec = request["prefix_of"]
                if codec is None:
                    kv = kvpack.decode(data, spec, profile=request["profile"])
                else:
                    kv = get(codec["name"], **codec["params"], profile=request["profile"]).decode_prefix(data,
                                                                                                       spec=spec)
                reply = {"error": None, "typed": True, "message": f"{kv.num_tokens} tokens"}
            except Exception as exc:  # the point of the worker: report any exception, typed or not
                reply = {"error": type(exc).__name__, "typed": isinstance(exc, KvpackError), "message": str(exc)[:500]}
            reply["seconds"] = time.monotonic() - start
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
