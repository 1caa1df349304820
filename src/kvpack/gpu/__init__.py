"""GPU decoders: every codec's bytes decoded into a CUDA ``KVCache`` buffer, bit for bit what the CPU decodes.

``kvpack.decode(data, device="cuda")`` (or ``out=`` a CUDA cache) lands here after the codec's usual validation
(:mod:`kvpack.codecs.validate`, the section sizes, the rANS stream checks), which runs on the CPU before any kernel.
One module per codec holds its kernels (Triton, :mod:`kvpack.entropy.rans_triton` for the rANS lanes); ``zstd`` has
no GPU decoder here: it decompresses on the CPU and copies. The kernels are documented in ``docs/gpu.md``.

:func:`decode` forces these decoders on any device: on CPU tensors they run under Triton's interpreter, which must be
selected (``TRITON_INTERPRET=1``) before this package is first imported; that is how the tests check them without a
GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvpack.codecs.base import Codec, codec_for
from kvpack.errors import CodecError
from kvpack.format import Container, read_container
from kvpack.kv import KVCache
from kvpack.spec import ModelSpec

__all__ = ["GPU_CODECS", "decode", "decode_payload"]

#: Codecs with a decoder in this package (module ``kvpack.gpu.<name>``); the others decode on the CPU and copy.
GPU_CODECS = ("cachegen", "fp8", "kivi", "lossless", "raw", "transform")


def _kernels_ready(device: torch.device) -> None:
    try:
        from kvpack.entropy.rans_triton import interpreting
    except ImportError as exc:
        raise CodecError(f"the GPU decoders need triton ({exc}); CUDA builds of torch include it, or pip install "
                         "triton") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CodecError(f"decoding to {device} needs a CUDA device, and torch finds none here")
    if device.type != "cuda" and not interpreting():
        raise CodecError(f"the GPU decoders run on CUDA devices, not {device}; on a CPU they run only under Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before kvpack.gpu is imported), for tests")


def decode_payload(codec: Codec, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                   out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """:meth:`Codec.decode_payload` on ``device``: the buffer ``[layers, 2, kv_heads, tokens, head_dim]`` there
    (``out``, when given, is on ``device``). Called by :meth:`Codec._decode_container` after validation."""
    if codec.name not in GPU_CODECS:
        data = codec.decode_payload(meta, container, spec, num_tokens, None)
        return data.to(device) if out is None else out.copy_(data)
    _kernels_ready(device)
    module = importlib.import_module(f"kvpack.gpu.{codec.name}")
    result: torch.Tensor = module.decode(codec, meta, container, spec, num_tokens, out, device)
    return result


def decode(data: bytes | memoryview, spec: ModelSpec | None = None, *, device: torch.device | str,
           codec: Codec | None = None, profile: str | None = None,
           token_ids: torch.Tensor | Sequence[int] | None = None, out: KVCache | None = None) -> KVCache:
    """:func:`kvpack.decode` through the GPU decoders on ``device`` (a CUDA device, or the CPU under Triton's
    interpreter); same arguments and errors."""
    container = read_container(data)
    return codec_for(container, codec, profile)._decode_container(container, spec, token_ids, out, device,
                                                                   kernels=True)
