"""rANS lane decoding in Triton: the layout of ``docs/entropy.md`` decoded with one GPU thread per lane.

The blob is parsed and every array checked on the CPU first (:func:`kvpack.entropy.rans.check_lanes`, the same
checks :func:`kvpack.entropy.decode_lanes` runs); then one Triton program decodes ``BLOCK`` lanes, each element of
its vectors one lane running the decoding loop of the spec: state ``x`` (32 bits), ``slot = x mod M``, the symbol
whose range holds the slot, ``x = f * (x >> 15) + slot - cum``, one 16-bit word refill when ``x < L``. Words are
read at ``min(p, end - 1)`` (a corrupted lane cannot read outside its words) and a lane is corrupted unless it
starts at ``x >= L`` and ends at ``x == L`` with every word consumed: the CPU decoder's rule, so both accept and
refuse exactly the same lanes and produce the same symbols.

Tables (:class:`kvpack.entropy.models.Model`) become device arrays once per model (cached on the model object):
``cum`` int32 ``[n_tables, 257]`` (cumulative frequencies, ``M`` past the alphabet) and, for few tables
(``n_tables * M <= LOOKUP_BYTES``, as the CPU decoder), the exact slot -> symbol rows ``uint8 [n_tables, M]``; with
many tables (cachegen: one per lane) the symbol is found by an 8-step binary search over the ``cum`` row.

Triton reads ``TRITON_INTERPRET`` when this module is imported: with ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors through Triton's interpreter (how the tests check them on machines without a GPU).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from kvpack.entropy.models import LOOKUP_BYTES, Model
from kvpack.entropy.rans import STATE_LOWER, LaneStream, check_lanes
from kvpack.entropy.tables import MAX_ALPHABET, PROB_BITS, PROB_SCALE
from kvpack.errors import FormatError

__all__ = ["LANES_PER_PROGRAM", "decode_stream", "device_tables", "interpreting"]

#: Lanes per Triton program (one lane per element of the program's vectors).
LANES_PER_PROGRAM = 128
# the format's constants, as Triton kernels may read globals only when they are constexpr
_COLUMNS = tl.constexpr(MAX_ALPHABET + 1)
_M = tl.constexpr(PROB_SCALE)
_BITS = tl.constexpr(PROB_BITS)
_L = tl.constexpr(STATE_LOWER)


def interpreting() -> bool:
    """Whether Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _decode_lanes_kernel(  # type: ignore[no-untyped-def]
        words, word_offsets, lane_starts, lane_table, cum, lookup, out, bad, n_lanes, max_len, SEARCH: tl.constexpr,
        BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_lanes
    s0 = tl.load(lane_starts + lane, mask=live, other=0)
    n = tl.load(lane_starts + lane + 1, mask=live, other=0) - s0
    w0 = tl.load(word_offsets + lane, mask=live, other=0)
    w1 = tl.load(word_offsets + lane + 1, mask=live, other=0)
    table = tl.load(lane_table + lane, mask=live, other=0).to(tl.int64)
    row = table * _COLUMNS
    used = live & (n > 0)
    lo = tl.load(words + w0, mask=used, other=0).to(tl.int64) & 0xFFFF
    hi = tl.load(words + w0 + 1, mask=used, other=0).to(tl.int64) & 0xFFFF
    x = lo | (hi << 16)
    x0 = x
    p = w0 + 2
    last = tl.maximum(w1 - 1, 0)
    for j in range(0, max_len):
        act = used & (j < n)
        slot = x & (_M - 1)
        if SEARCH:
            s = tl.zeros_like(slot)
            for k in tl.static_range(0, 8):
                probe = tl.load(cum + row + s + (128 >> k), mask=act, other=_M)
                s = tl.where(probe <= slot, s + (128 >> k), s)
        else:
            s = tl.load(lookup + table * _M + slot, mask=act, other=0).to(tl.int64)
        c = tl.load(cum + row + s, mask=act, other=0).to(tl.int64)
        f = tl.load(cum + row + s + 1, mask=act, other=0).to(tl.int64) - c
        y = f * (x >> _BITS) + slot - c
        refill = act & (y < _L)
        w = tl.load(words + tl.minimum(p, last), mask=refill, other=0).to(tl.int64) & 0xFFFF
        y = tl.where(refill, (y << 16) | w, y)
        x = tl.where(act, y, x)
        p = tl.where(refill, p + 1, p)
        tl.store(out + s0 + j, s.to(tl.uint8), mask=act)
    ok = (x0 >= _L) & (x == _L) & (p == w1)
    tl.store(bad + lane, (used & (ok == 0)).to(tl.int8), mask=live)


_TABLES: weakref.WeakKeyDictionary[Model, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = \
    weakref.WeakKeyDictionary()


def device_tables(model: Model, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cum int32 [n_tables, 257], lookup uint8 [n_tables, M] or None)`` of ``model`` on ``device`` (built once
    per model and device; ``None``: decode by binary search, for models with many tables)."""
    cached = _TABLES.setdefault(model, {})
    key = str(device)
    if key not in cached:
        freqs = model.freqs.astype(np.int64)
        n_tables, alphabet = freqs.shape
        cum = np.full((n_tables, MAX_ALPHABET + 1), PROB_SCALE, np.int32)
        cum[:, 0] = 0
        cum[:, 1 : alphabet + 1] = np.cumsum(freqs, axis=1)
        cum[freqs.sum(axis=1) == 0, :] = PROB_SCALE  # unusable rows: no nonempty lane may use them (checked)
        lookup = None
        if n_tables * PROB_SCALE <= LOOKUP_BYTES:
            symbols = np.tile(np.arange(alphabet, dtype=np.uint8), n_tables)
            rows = np.repeat(symbols, freqs.reshape(-1))
            full = np.zeros((n_tables, PROB_SCALE), np.uint8)
            full[freqs.sum(axis=1) > 0] = rows.reshape(-1, PROB_SCALE)
            lookup = torch.from_numpy(full).to(device)
        cached[key] = (torch.from_numpy(cum).to(device), lookup)
    return cached[key]


def decode_stream(stream: LaneStream, device: torch.device | str, *, search: bool | None = None) -> torch.Tensor:
    """Decode a parsed blob (:func:`kvpack.entropy.parse`) on ``device``: uint8 ``[N]``, the symbols
    :func:`kvpack.entropy.decode_lanes` returns for the same stream.

    ``search`` forces the binary-search (True) or lookup (False) symbol lookup (default: by table count, as above).

    Raises:
        FormatError: the arrays are inconsistent (checked on the CPU before any kernel) or a lane is corrupted.
    """
    device = torch.device(device)
    words, offsets, starts, table_of, model = check_lanes(stream.words, stream.word_offsets, stream.lane_starts,
                                                          stream.lane_table, stream.freqs)
    n_lanes = starts.size - 1
    out = torch.empty(int(starts[-1]), dtype=torch.uint8, device=device)
    if n_lanes == 0 or out.numel() == 0:
        return out
    cum, lookup = device_tables(model, device)
    use_search = lookup is None if search is None else search
    if lookup is None and not use_search:
        raise ValueError("this model has too many tables for the lookup decoder")
    bad = torch.zeros(n_lanes, dtype=torch.int8, device=device)
    args: list[Any] = [torch.from_numpy(words.view(np.int16)).to(device), torch.from_numpy(offsets).to(device),
                       torch.from_numpy(starts).to(device), torch.from_numpy(table_of.astype(np.int32)).to(device),
                       cum, cum if lookup is None else lookup, out, bad, n_lanes, int(np.diff(starts).max())]
    grid = (triton.cdiv(n_lanes, LANES_PER_PROGRAM),)
    _decode_lanes_kernel[grid](*args, SEARCH=use_search, BLOCK=LANES_PER_PROGRAM)
    flagged = torch.nonzero(bad).flatten()
    if flagged.numel():
        raise FormatError(f"rANS lane {int(flagged[0])} is corrupted (its words do not decode exactly)")
    return out
