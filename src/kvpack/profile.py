"""`Profile`: a per-model calibration artifact (PCA bases, bit allocations, symbol tables) for codecs that need one.

A profile is a container (``"kind": "profile"``) whose header names the codec it serves, the model fingerprint and
codec-specific JSON ``meta``, and whose sections hold named numeric arrays (dtype and shape in the header). It is
named by its hash: BLAKE2b-128 of its bytes. Chunks record that hash, and a codec given another profile refuses to
decode them (:class:`~kvpack.errors.ProfileMismatchError`).

:meth:`Profile.open` reads a profile file once per version of the file and shares it by hash; what a codec builds
from it (validated arrays, entropy models) is kept on it with :meth:`Profile.compiled`, so coding a chunk touches
no file and rebuilds no table.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kvpack.errors import FormatError, ProfileError
from kvpack.format import read_container, write_container

KIND = "profile"
#: Array dtypes a profile may hold (little-endian numpy type strings).
DTYPES = ("<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "|i1", "<u4", "<u2", "|u1")
MAX_DIMS = 4
#: Profiles kept in memory by :meth:`Profile.open` (a transform profile is ~100 MB).
CACHED = 8
T = TypeVar("T")
_LOCK = threading.RLock()
_BY_HASH: OrderedDict[str, Profile] = OrderedDict()


@dataclass(frozen=True, eq=False)
class Profile:
    """Calibration data of one codec for one model: JSON ``meta`` plus named arrays."""

    codec: str
    model_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    _compiled: dict[object, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, array in self.arrays.items():
            if array.dtype.newbyteorder("<").str not in DTYPES or array.ndim > MAX_DIMS:
                raise ValueError(f"profile array {name!r}: dtype {array.dtype} / {array.ndim} dims not storable")

    @cached_property
    def data(self) -> bytes:
        """The serialized profile (container format)."""
        layout = {name: {"dtype": a.dtype.newbyteorder("<").str, "shape": list(a.shape)}
                  for name, a in self.arrays.items()}
        header = {"kind": KIND, "codec": self.codec, "model_fingerprint": self.model_fingerprint,
                  "meta": self.meta, "arrays": layout}
        sections = {name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
                    for name, a in self.arrays.items()}
        return write_container(header, sections)

    @cached_property
    def hash(self) -> str:
        """BLAKE2b-128 hex digest of :attr:`data`: the profile's name."""
        return hashlib.blake2b(self.data, digest_size=16).hexdigest()

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Profile:
        """Parse a serialized profile; every defect raises :class:`FormatError`."""
        container = read_container(data)
        header = container.header
        if header.get("kind") != KIND:
            raise FormatError(f"container holds a {header.get('kind')!r}, not a calibration profile")
        layout = header.get("arrays")
        codec, fingerprint, meta = header.get("codec"), header.get("model_fingerprint"), header.get("meta")
        if not (isinstance(layout, dict) and isinstance(codec, str) and isinstance(fingerprint, str)
                and isinstance(meta, dict)):
            raise FormatError("profile header is missing codec, model_fingerprint, meta or arrays")
        arrays = {}
        for name, info in layout.items():
            dtype, shape = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else (None, None)
            if dtype not in DTYPES or not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
                    isinstance(s, int) and s >= 0 for s in shape):
                raise FormatError(f"profile array {name!r} has a bad dtype or shape")
            raw = container.section(name)
            if len(raw) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise FormatError(f"profile array {name!r}: {len(raw)} bytes do not match shape {shape} {dtype}")
            arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))
        profile = cls(codec=codec, model_fingerprint=fingerprint, meta=meta, arrays=arrays)
        profile.__dict__["data"] = bytes(data)
        return profile

    def save(self, path: str | Path) -> Path:
        """Write the profile to ``path`` (a directory gets ``<codec>-<hash>.kvprof`` inside it); returns the file."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{self.codec}-{self.hash}.kvprof"
        target.write_bytes(self.data)
        return target

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Profile:
        """The profile at ``path``, read once per version of the file (path, size, modification time) and shared by
        hash with every other path holding the same bytes; :class:`ProfileError` if it cannot be read or parsed."""
        resolved = Path(path).resolve()
        try:
            st = resolved.stat()
        except OSError as exc:
            raise ProfileError(f"cannot read calibration profile {str(path)!r}: {exc.strerror}; make one with "
                               "`kvpack calibrate --codec NAME`") from None
        return _read(str(resolved), st.st_size, st.st_mtime_ns)

    def compiled(self, key: object, build: Callable[[Profile], T]) -> T:
        """``build(self)``, run once per ``key`` and kept on this profile (what a codec derives from it: validated
        arrays, entropy models)."""
        with _LOCK:
            if key not in self._compiled:
                self._compiled[key] = build(self)
            return self._compiled[key]


@functools.lru_cache(maxsize=CACHED)
def _read(path: str, size: int, mtime_ns: int) -> Profile:
    """Parse the file at ``path`` (the size and time key the cache); the one profile object per hash."""
    try:
        profile = Profile.from_bytes(Path(path).read_bytes())
    except OSError as exc:
        raise ProfileError(f"cannot read calibration profile {path!r}: {exc.strerror}") from None
    except FormatError as exc:
        raise ProfileError(f"{path} is not a calibration profile ({exc}); make one with `kvpack calibrate`") from None
    with _LOCK:
        shared = _BY_HASH.setdefault(profile.hash, profile)
        _BY_HASH.move_to_end(profile.hash)
        while len(_BY_HASH) > CACHED:
            _BY_HASH.popitem(last=False)
    return shared
