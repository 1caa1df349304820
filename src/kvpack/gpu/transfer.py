"""Host bytes and arrays to a device, without an extra host copy where torch allows it."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch


def to_device(data: bytes | memoryview | np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8 tensor on ``device`` holding ``data``'s bytes (little-endian views are made by the caller)."""
    if sys.byteorder != "little":  # the sections are little-endian; so are CUDA devices
        raise RuntimeError("the GPU decoders assume a little-endian host")
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # a read-only view of the input: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(raw)
    return host.to(device, copy=True)


def array(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array on ``device`` (same dtype), for the kernels to read: on the CPU it may share ``a``'s memory,
    which may be read-only (a view of the container's bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
