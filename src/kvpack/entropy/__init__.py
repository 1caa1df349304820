"""Entropy coding: interleaved rANS over many independent lanes with per-lane frequency tables.

``rans`` holds the coder (CPU, numba) and its blob format; ``tables`` the frequency tables (quantization,
serialization) and the escape scheme for values outside an alphabet. Layout spec: ``docs/entropy.md``.
``workers`` sets how numba's threads wait and which threading layer it uses; it must run before any kernel does.
"""

from kvpack.entropy import workers  # noqa: F401  (first: before any numba kernel starts the threading layer)
from kvpack.entropy.rans import (
    MIN_PACKED_BYTES,
    LaneStream,
    decode_lanes,
    encode_lanes,
    max_packed_bytes,
    pack,
    parse,
    unpack,
)
from kvpack.entropy.tables import (
    PROB_BITS,
    PROB_SCALE,
    counts_to_tables,
    merge_escapes,
    pack_tables,
    quantize_freqs,
    split_escapes,
    unpack_tables,
)

__all__ = [
    "MIN_PACKED_BYTES",
    "PROB_BITS",
    "PROB_SCALE",
    "LaneStream",
    "counts_to_tables",
    "decode_lanes",
    "encode_lanes",
    "max_packed_bytes",
    "merge_escapes",
    "pack",
    "pack_tables",
    "parse",
    "quantize_freqs",
    "split_escapes",
    "unpack",
    "unpack_tables",
]
