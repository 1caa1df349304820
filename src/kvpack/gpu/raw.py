"""`raw` on a GPU: the ``kv`` section copied to the device as it is, then viewed (or converted) in place there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvpack.codecs.base import Codec
from kvpack.format import Container
from kvpack.gpu.transfer import to_device
from kvpack.spec import DTYPES, ModelSpec


def decode(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
           out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The buffer ``[layers, 2, kv_heads, tokens, head_dim]`` on ``device`` (section length checked by the codec's
    ``section_sizes`` already)."""
    stored = DTYPES[str(meta["dtype"])]
    data = to_device(container.section("kv"), device).view(stored).view(spec.buffer_shape(num_tokens))
    if out is not None:
        return out.copy_(data)
    return data if stored == spec.torch_dtype else data.to(spec.torch_dtype)
