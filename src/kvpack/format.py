"""Container format v1: the byte layout of every codec output, calibration profile and store entry.

Layout (little-endian throughout; spec in docs/format.md)::

    offset  size  field
    0       8     magic  b"\\x89KVPACK\\n"
    8       2     format version (1)
    10      2     flags (0; reserved)
    12      4     header length H in bytes (<= MAX_HEADER_BYTES)
    16      8     total file length in bytes
    24      4     CRC-32 of bytes [0, 24) followed by the H header bytes
    28      H     header: UTF-8 JSON object
    28+H    ...   sections, back to back, in the order of the header's section table

The header's ``sections`` list gives for each section its ``name``, ``offset`` (from the start of the section area),
``length`` and ``crc32``. Sections tile the section area exactly: no gaps, no overlap, nothing after the last one.
So every byte of a file is covered by a checksum, and the reader checks every one of them, every length and every
offset before it hands out a single section.

Bounds: the reader allocates nothing but the header it parsed (at most ``MAX_HEADER_BYTES``) and zero-copy views
into the input. No pickle, ever.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from isal import isal_zlib

from kvpack.errors import FormatError

MAGIC = b"\x89KVPACK\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_SECTIONS = 4096
_PREFIX = struct.Struct("<8sHHIQ")
_CRC = struct.Struct("<I")
PREFIX_BYTES = _PREFIX.size + _CRC.size  # 28


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (zlib polynomial) of ``data``, the same value as ``zlib.crc32``, computed with ISA-L (package
    ``isal``), several times faster than the standard library's on x86: every byte of a container is checksummed on
    encode and decode, so this is on the codecs' hot path (``kvpack bench speed`` measures them)."""
    return isal_zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class Container:
    """A parsed, fully verified container: its JSON header and zero-copy views of its sections."""

    header: dict[str, Any]
    sections: dict[str, memoryview]
    #: Whether every section of the file is here (a container read from a prefix of its bytes may lack some).
    complete: ClassVar[bool] = True

    def section(self, name: str) -> memoryview:
        """The bytes of section ``name``; a missing section is a :class:`FormatError`."""
        try:
            return self.sections[name]
        except KeyError:
            raise FormatError(
                f"container has no section {name!r} (has {sorted(self.sections)}); the file is incomplete "
                "or was written by another codec"
            ) from None


def write_container(header: Mapping[str, Any], sections: Mapping[str, bytes | memoryview]) -> bytes:
    """Serialize ``header`` (JSON-able; must not contain ``sections``) and named byte sections into one container."""
    if "sections" in header:
        raise ValueError("header key 'sections' is reserved for the section table")
    if len(sections) > MAX_SECTIONS:
        raise ValueError(f"at most {MAX_SECTIONS} sections, got {len(sections)}")
    table = []
    offset = 0
    for name, data in sections.items():
        length = len(data) if isinstance(data, bytes) else data.nbytes
        table.append({"name": name, "offset": offset, "length": length, "crc32": crc32(data)})
        offset += length
    head = json.dumps({**header, "sections": table}, separators=(",", ":"), sort_keys=True).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head)} bytes exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    total = PREFIX_BYTES + len(head) + offset
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), total)
    parts = [prefix, _CRC.pack(crc32(prefix + head)), head]
    return b"".join([*parts, *sections.values()])


def _unpack_prefix(view: memoryview, what: str) -> tuple[int, int, int, int]:
    """``(version, flags, header length, total length)`` from the prefix at the start of ``view`` (bytes), once its
    length (``what`` names it in the error) and magic bytes are checked; raises :class:`FormatError`."""
    if len(view) < PREFIX_BYTES:
        raise FormatError(f"{len(view)} bytes is too short for a kvpack {what} (at least {PREFIX_BYTES})")
    magic, version, flags, head_len, total = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise FormatError("not a kvpack container (bad magic bytes); was this file written by kvpack?")
    return version, flags, head_len, total


def header_bytes(prefix: bytes | memoryview) -> int:
    """How many leading bytes of a container hold its prefix and JSON header, from its first :data:`PREFIX_BYTES`.

    For readers that fetch a container in ranges (a progressive loader reads the header, then only the sections it
    needs). Raises :class:`FormatError` for bytes that do not start a container or a header over the limit.
    """
    view = memoryview(prefix).cast("B")
    _, _, head_len, _ = _unpack_prefix(view, "container prefix")
    if head_len > MAX_HEADER_BYTES:
        raise FormatError(f"header length {head_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    return int(PREFIX_BYTES + head_len)


def read_header(data: bytes | memoryview, *, prefix: bool = False) -> dict[str, Any]:
    """Parse and verify the prefix and JSON header (not the sections); raises :class:`FormatError`.

    With ``prefix``, ``data`` may be the first bytes of a longer container (a progressive read), as long as it holds
    the whole header.
    """
    view = memoryview(data).cast("B")
    version, flags, head_len, total = _unpack_prefix(view, "container")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"container format version {version} is not supported (this kvpack reads version {FORMAT_VERSION}); "
            "upgrade kvpack or re-encode the cache"
        )
    if flags != 0:
        raise FormatError(f"unknown container flags {flags:#x}")
    if head_len > MAX_HEADER_BYTES:
        raise FormatError(f"header length {head_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if total != len(view) and not (prefix and total > len(view)):
        raise FormatError(
            f"container declares {total} bytes but {len(view)} were given: the file is truncated or has trailing "
            "bytes"
        )
    if PREFIX_BYTES + head_len > min(total, len(view)):
        raise FormatError("header runs past the end of the container (or of the bytes given)")
    (stored_crc,) = _CRC.unpack_from(view, _PREFIX.size)
    head = view[PREFIX_BYTES : PREFIX_BYTES + head_len]
    if crc32(bytes(view[: _PREFIX.size]) + bytes(head)) != stored_crc:
        raise FormatError("header checksum mismatch: the container is corrupted")
    try:
        header = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # only reachable with a forged checksum
        raise FormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    return header


def read_container(data: bytes | memoryview) -> Container:
    """Parse ``data`` and verify every length, offset and checksum; raises :class:`FormatError` on any defect."""
    view = memoryview(data).cast("B")
    header = read_header(view)
    head_len = _PREFIX.unpack_from(view, 0)[3]
    area = view[PREFIX_BYTES + head_len :]
    table = header.get("sections")
    if not isinstance(table, list) or len(table) > MAX_SECTIONS:
        raise FormatError("header has no valid section table")
    sections: dict[str, memoryview] = {}
    expected = 0
    for entry in table:
        if not isinstance(entry, dict):
            raise FormatError("section table entry is not an object")
        name, offset, length, crc = (entry.get(k) for k in ("name", "offset", "length", "crc32"))
        if not isinstance(name, str) or name in sections:
            raise FormatError(f"bad or duplicate section name {name!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length, crc)):
            raise FormatError(f"section {name!r} has a bad offset, length or checksum field")
        assert isinstance(offset, int) and isinstance(length, int)
        if offset != expected or offset + length > len(area):
            raise FormatError(f"section {name!r} at [{offset}, {offset + length}) does not tile the section area")
        body = area[offset : offset + length]
        if crc32(body) != crc:
            raise FormatError(f"section {name!r} checksum mismatch: the container is corrupted")
        sections[name] = body
        expected = offset + length
    if expected != len(area):
        raise FormatError(f"{len(area) - expected} bytes after the last section: the container is corrupted")
    return Container(header=header, sections=sections)


def verify(data: bytes | memoryview) -> None:
    """Check that ``data`` is an intact container (every checksum) without decoding it; raises :class:`FormatError`."""
    read_container(data)
