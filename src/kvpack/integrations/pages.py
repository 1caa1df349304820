"""Paged KV layouts of serving engines, converted to and from kvpack's canonical ``[2, kv_heads, tokens, head_dim]``.

An engine keeps each attention layer's cache in fixed-size blocks ("pages") of ``block_size`` tokens; a request owns
a list of block ids (its block table), and token ``t`` of the request lives in block ``block_ids[t // block_size]``
at slot ``t % block_size``. How a block's bytes are arranged depends on the engine's attention backend and, on CPU,
on the instruction set. Stored chunks are always canonical, so they are the same on every machine; only the
conversion here knows a layout.

Layouts:

``vec``
    vLLM's CPU attention backend with its portable kernels (AVX2/AVX-512 hosts, and any fp32 cache): one tensor per
    layer ``[num_blocks, kv_heads, block_size, 2 * head_dim]``. Each ``(block, head)`` slab holds the block's keys
    column-major (``K[t, d]`` at element ``d * block_size + t``), then its values row-major (``V[t, d]`` at
    ``block_size * head_dim + t * head_dim + d``).

Anything else (vLLM's ``amx`` prepacked tiles on AMX bf16 hosts, GPU backends) is refused with
:class:`~kvpack.errors.UnsupportedModelError`, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvpack.errors import UnsupportedModelError

LAYOUTS = ("vec",)


@dataclass(frozen=True)
class PageLayout:
    """How one layer's paged KV is arranged: ``name`` (one of :data:`LAYOUTS`), KV heads, head dim, block size."""

    name: str
    num_kv_heads: int
    head_dim: int
    block_size: int

    def __post_init__(self) -> None:
        if self.name not in LAYOUTS:
            raise UnsupportedModelError(
                f"kvpack cannot read or write the paged KV layout {self.name!r}; it converts {', '.join(LAYOUTS)}. "
                "On vLLM's CPU backend, run with the portable kernels (an fp32 cache or a host without AMX) or "
                "disable the kvpack connector")
        for attr in ("num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 16:
                raise ValueError(f"PageLayout.{attr} must be a positive int <= 65536, got {value!r}")

    def page_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape of one layer's pages: ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` for ``vec``."""
        return (num_blocks, self.num_kv_heads, self.block_size, 2 * self.head_dim)

    def check(self, pages: torch.Tensor) -> None:
        """:class:`UnsupportedModelError` unless ``pages`` is a contiguous tensor of :meth:`page_shape`."""
        if pages.dim() != 4 or tuple(pages.shape) != self.page_shape(pages.shape[0]) or not pages.is_contiguous():
            raise UnsupportedModelError(
                f"expected contiguous {self.name!r} pages {list(self.page_shape(pages.shape[0] if pages.dim() else 0))}"
                f" [num_blocks, kv_heads, block_size, 2*head_dim], got {list(pages.shape)}; this attention backend "
                "lays its cache out differently and kvpack does not convert it")

    def _views(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``pages``: keys ``[blocks, heads, head_dim, block_size]``, values ``[blocks, heads, block_size,
        head_dim]`` (same memory)."""
        self.check(pages)
        halves = pages.view(pages.shape[0], self.num_kv_heads, 2, self.block_size * self.head_dim)
        keys = halves[:, :, 0].unflatten(-1, (self.head_dim, self.block_size))
        values = halves[:, :, 1].unflatten(-1, (self.block_size, self.head_dim))
        return keys, values

    def _slots(self, block_ids: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= start <= stop <= block_ids.numel() * self.block_size:
            raise ValueError(f"tokens [{start}, {stop}) are outside the {block_ids.numel()} blocks of "
                             f"{self.block_size} tokens given")
        t = torch.arange(start, stop, dtype=torch.int64)
        return block_ids.to(torch.int64)[t // self.block_size], t % self.block_size

    def gather(self, layers: Sequence[torch.Tensor], block_ids: torch.Tensor, start: int, stop: int,
               out: torch.Tensor) -> torch.Tensor:
        """Copy tokens ``[start, stop)`` of a request out of every layer's pages into ``out``
        ``[num_layers, 2, kv_heads, stop - start, head_dim]`` (e.g. a :class:`~kvpack.kv.KVCache` buffer)."""
        blocks, slots = self._slots(block_ids, start, stop)
        for i, pages in enumerate(layers):
            keys, values = self._views(pages)
            out[i, 0].copy_(keys[blocks, :, :, slots].permute(1, 0, 2))  # [tokens, heads, dim] -> [heads, tokens, dim]
            out[i, 1].copy_(values[blocks, :, slots, :].permute(1, 0, 2))
        return out

    def scatter(self, layers: Sequence[torch.Tensor], block_ids: torch.Tensor, start: int,
                kv: torch.Tensor) -> None:
        """Write ``kv`` ``[num_layers, 2, kv_heads, tokens, head_dim]`` into every layer's pages as tokens
        ``[start, start + tokens)`` of the request whose block table is ``block_ids``."""
        blocks, slots = self._slots(block_ids, start, start + kv.shape[3])
        for i, pages in enumerate(layers):
            keys, values = self._views(pages)
            keys[blocks, :, :, slots] = kv[i, 0].permute(1, 0, 2).to(pages.dtype)
            values[blocks, :, slots, :] = kv[i, 1].permute(1, 0, 2).to(pages.dtype)
