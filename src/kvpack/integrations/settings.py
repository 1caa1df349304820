"""`ConnectorConfig`: the settings of the vLLM connector, read from ``kv_connector_extra_config`` (no vLLM needed).

Example (vLLM's ``--kv-transfer-config``)::

    {"kv_connector": "KvpackConnector", "kv_connector_module_path": "kvpack.integrations.vllm",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {"store": "file:///var/cache/kvpack", "codec": "lossless"}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpack.keys import DEFAULT_CHUNK_TOKENS


@dataclass(frozen=True)
class ConnectorConfig:
    """What the connector stores where.

    Attributes:
        store: a store URL for :func:`kvpack.store.open` (``file:///path``, ``redis://...``, ``tiered://...``);
            ``file://`` is the default cache directory.
        codec: a registered codec name (``raw``, ``lossless``, ``fp8``, ``kivi``, ...).
        codec_params: the codec's parameters, as :func:`kvpack.codecs.get` takes them.
        namespace: isolates tenants (:mod:`kvpack.keys`).
        chunk_tokens: tokens per stored chunk; a multiple of vLLM's block size.
        model_fingerprint: the model's identity in the keys; by default a digest of the checkpoint's config, KV
            dtype and weight files (give one for remote or very large checkpoints).
        max_pending_saves: chunks gathered but not yet encoded and stored; a full queue makes the step wait.
    """

    store: str = "file://"
    codec: str = "raw"
    codec_params: dict[str, Any] = field(default_factory=dict)
    namespace: str = "default"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    model_fingerprint: str | None = None
    max_pending_saves: int = 64

    def __post_init__(self) -> None:
        for name in ("store", "codec", "namespace"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"kv_connector_extra_config.{name} must be a non-empty string")
        if not isinstance(self.codec_params, dict) or not all(isinstance(k, str) for k in self.codec_params):
            raise ValueError("kv_connector_extra_config.codec_params must be an object of parameter names to values")
        for name in ("chunk_tokens", "max_pending_saves"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"kv_connector_extra_config.{name} must be a positive integer, got {value!r}")
        if self.model_fingerprint is not None and (not isinstance(self.model_fingerprint, str)
                                                   or not self.model_fingerprint):
            raise ValueError("kv_connector_extra_config.model_fingerprint must be a non-empty string")

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Build from vLLM's ``kv_connector_extra_config``; an unknown key is a :class:`ValueError` naming the
        known ones (a typo must not silently fall back to a default store)."""
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvpack's vLLM connector has no setting(s) {unknown} in kv_connector_extra_config; "
                             f"it takes {sorted(known)}")
        return cls(**extra)
