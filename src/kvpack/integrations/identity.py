"""The identity of a model as vLLM serves it, computed with or without vLLM.

kvpack's vLLM connector keys chunks (and binds calibrated codecs' profiles) with :func:`checkpoint_fingerprint`:
SHA-256 over a tag, the HF config's digest, the KV dtype, the quantization method and the checkpoint's weight files
(names and contents) when the model is a local directory, or the model id and revision for a hub id. The connector
calls it with what vLLM resolved (``vllm_config.model_config``); ``kvpack calibrate --for-vllm DTYPE`` calls it with
the same checkpoint's config read by transformers (the two configs have the same digest: checked in
``tests/test_vllm.py``), so a profile calibrated in transformers is bound to the model vLLM serves, and the codec's
own check (the profile's model is the chunk's model) stays exact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

from kvpack.codecs import CalibratedCodec, Codec
from kvpack.errors import ModelMismatchError, UnsupportedModelError
from kvpack.spec import ModelSpec, config_digest

FINGERPRINT_TAG = "kvpack/vllm-model/v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
#: The dtypes vLLM serves a model in (``--dtype``), as kvpack names them.
VLLM_DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=8)
def _weights_digest(directory: str, listing: tuple[tuple[str, int, int], ...]) -> str:
    """BLAKE2b over the weight files of a checkpoint directory (names and contents); ``listing`` (name, size,
    mtime) keys the per-process cache."""
    digest = hashlib.blake2b(digest_size=32)
    for name, size, _ in listing:
        digest.update(f"{name}|{size}|".encode())
        with open(Path(directory) / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_fingerprint(hf_config: Any, dtype: str, quantization: str | None, model: str,
                           revision: str | None = None) -> str:
    """The fingerprint of ``model`` (a local checkpoint directory or a hub id) served in ``dtype`` (``float32``,
    ``bfloat16``, ...) with ``quantization`` (vLLM's method name, ``None`` for none); ``hf_config`` is its
    transformers config."""
    path = Path(model)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        listing = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        weights = _weights_digest(str(path.resolve()), listing)
    else:
        weights = f"{model}@{revision}"
    digest = hashlib.sha256()
    for part in (FINGERPRINT_TAG, config_digest(hf_config), dtype, str(quantization), weights):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def spec_for_vllm(spec: ModelSpec, checkpoint: str, dtype: str) -> ModelSpec:
    """``spec`` (a model loaded by transformers from the local ``checkpoint`` directory) with the fingerprint the
    connector computes when vLLM serves that checkpoint in ``dtype`` (``kvpack calibrate --for-vllm``): a profile
    calibrated under it is bound to the model vLLM serves."""
    from transformers import AutoConfig

    if not Path(checkpoint).is_dir():
        raise ValueError(f"--for-vllm binds a profile to the checkpoint directory vLLM serves: give that directory as "
                         f"--model (got {checkpoint!r}; `make vllm-venv` writes SmolLM2's to "
                         ".venv-vllm/models/smollm2-135m)")
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"--for-vllm takes the dtype vLLM serves the model in, one of {VLLM_DTYPES}; got {dtype!r}")
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    if getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{checkpoint} is a quantized checkpoint: kvpack cannot tell which quantization "
                                    "method vLLM will name for it, so it cannot bind a profile to it")
    return dataclasses.replace(spec, fingerprint=checkpoint_fingerprint(config, dtype, None, checkpoint))


def check_profile(codec: Codec, spec: ModelSpec) -> None:
    """A calibrated codec's profile must be bound to ``spec``'s model (the one vLLM serves), or every save would
    fail: :class:`ModelMismatchError` saying how to make one (the connector raises it at start-up)."""
    if not isinstance(codec, CalibratedCodec):
        return
    bound = codec.calibration.model_fingerprint
    if bound != spec.fingerprint:
        raise ModelMismatchError(
            f"the {codec.name} profile is bound to model {bound[:12]}, but vLLM serves {spec.fingerprint[:12]} "
            f"({spec.name}, {spec.dtype}). Calibrate one for this checkpoint and dtype: `kvpack calibrate --codec "
            f"{codec.name} --model CHECKPOINT_DIR --for-vllm {spec.dtype} -o P.kvprof` (docs/vllm.md)")
