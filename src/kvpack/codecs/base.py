"""The `Codec` interface: typed, validated parameters; `encode(KVCache) -> bytes`; `decode(bytes, spec) -> KVCache`.

A codec produces only its payload (a JSON-able ``meta`` dict and named byte sections); this module wraps it in the
container format with everything else a file needs to be decoded on its own: codec name, version and parameters,
the model spec, token count, positions and a hash of the token ids.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from kvpack.codecs import validate
from kvpack.codecs.validate import Size
from kvpack.errors import CodecError, FormatError, ModelMismatchError, ProfileMismatchError, TokenMismatchError
from kvpack.format import Container, read_container, write_container
from kvpack.kv import KVCache, token_ids_hash
from kvpack.spec import ModelSpec

KIND = "kvcache"
#: Metadata of a codec field that does not change the bitstream (the path of a profile, whose hash the header and
#: the chunk key hold already): :meth:`Codec.params`, and so the header and the chunk key, leave it out.
NOT_IN_BITSTREAM: Mapping[str, bool] = types.MappingProxyType({"kvpack.bitstream": False})


@dataclasses.dataclass(frozen=True)
class Payload:
    """What a codec stores: ``meta`` goes into the JSON header, ``sections`` after it (bytes, or byte views that
    :func:`kvpack.format.write_container` copies without an intermediate ``bytes``)."""

    meta: dict[str, Any]
    sections: Mapping[str, bytes | memoryview]


@dataclasses.dataclass(frozen=True)
class Codec(ABC):
    """Base of every codec: a frozen dataclass whose fields are its parameters (validated in ``__post_init__``)."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def params(self) -> dict[str, Any]:
        """The JSON-able parameters that, with name and version, fully determine the bitstream: every init field
        but those marked :data:`NOT_IN_BITSTREAM`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and f.metadata.get("kvpack.bitstream", True)}

    def profile_hash(self) -> str | None:
        """Hash of the calibration profile the codec needs, or ``None`` for codecs that need none."""
        return None

    def profile_nbytes(self) -> int | None:
        """Serialized size of that profile (stored once per model, reported apart from the ratio), or ``None``."""
        return None

    @property
    def codec_id(self) -> str:
        """Canonical identity (name, version, parameters, profile hash): part of every chunk key."""
        ident = {"name": self.name, "version": self.version, "params": self.params(), "profile": self.profile_hash()}
        return json.dumps(ident, sort_keys=True, separators=(",", ":"))

    @abstractmethod
    def encode_payload(self, kv: KVCache) -> Payload:
        """Compress ``kv`` into a :class:`Payload`."""

    @abstractmethod
    def section_sizes(self, meta: Mapping[str, Any], spec: ModelSpec, num_tokens: int) -> dict[str, Size]:
        """Validate ``meta`` and state the byte length of every section it implies for a cache of ``num_tokens``
        tokens of ``spec`` (``[num_layers, 2, num_kv_heads, num_tokens, head_dim]``), exactly or, for
        entropy-coded sections, as a range.

        Runs before :meth:`decode_payload`, which may then rely on the sections being present with those lengths and
        on no other section being present. Raises :class:`FormatError` for invalid meta. Must not allocate more
        than the meta itself.
        """

    @abstractmethod
    def decode_payload(self, meta: Mapping[str, Any], container: Container, spec: ModelSpec, num_tokens: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        """Rebuild the KV buffer ``[num_layers, 2, num_kv_heads, num_tokens, head_dim]`` in ``spec.dtype``.

        ``out``, when given, is a buffer of exactly that shape and dtype (possibly a token-slice view of a larger
        cache): a codec may write into it and return it, or return a tensor of its own, which the caller copies.
        Must raise :class:`FormatError` (never crash) on inconsistent sections.
        """

    def encode(self, kv: KVCache) -> bytes:
        """A complete, self-describing container for ``kv``."""
        if kv.num_tokens > validate.MAX_TOKENS or kv.num_tokens * kv.spec.elements_per_token > validate.MAX_ELEMENTS:
            raise CodecError(f"{kv.num_tokens} tokens of {kv.spec.elements_per_token} K/V elements exceed the "
                             f"per-container limits ({validate.MAX_TOKENS} tokens, {validate.MAX_ELEMENTS} "
                             "elements); store the cache in chunks")
        payload = self.encode_payload(kv)
        positions, sections = _positions_header(kv.positions)
        tokens = {"count": kv.num_tokens, "positions": positions,
                  "ids_hash": None if kv.token_ids is None else token_ids_hash(kv.token_ids)}
        header = {
            "kind": KIND,
            "codec": {"name": self.name, "version": self.version, "params": self.params(),
                      "profile": self.profile_hash()},
            "spec": kv.spec.to_json(),
            "tokens": tokens,
            "meta": payload.meta,
        }
        clash = set(sections) & set(payload.sections)
        if clash:
            raise CodecError(f"codec {self.name} used reserved section names {sorted(clash)}")
        return write_container(header, {**sections, **payload.sections})

    def warm_up(self, spec: ModelSpec, tokens: int) -> None:
        """Pay this codec's one-time setup now instead of in the first request that encodes or decodes (a calibrated
        codec preparing its projections, numba loading its compiled kernels, torch starting its threads): encode and
        decode ``tokens`` synthetic tokens of ``spec``, once in buffers of their own and once as a chunk of a longer
        buffer decoded into a slice of one (numba compiles its kernels per array layout)."""
        noise = torch.randn(spec.buffer_shape(2 * tokens), generator=torch.Generator().manual_seed(0)) / 2
        whole = KVCache(spec=spec, data=noise.to(spec.torch_dtype), positions=torch.arange(2 * tokens))
        self.decode(self.encode(whole[tokens:]), spec, out=KVCache.empty(spec, 2 * tokens)[tokens:])
        alone = KVCache.empty(spec, tokens, start_position=tokens)
        alone.data.copy_(whole.data[:, :, :, tokens:])
        self.decode(self.encode(alone), spec)

    def decode(self, data: bytes | memoryview, spec: ModelSpec | None = None,
               token_ids: torch.Tensor | Sequence[int] | None = None, out: KVCache | None = None,
               device: torch.device | str | None = None) -> KVCache:
        """Decode a container written by this codec (same name, version and parameters).

        With ``out`` (e.g. a slice of :meth:`KVCache.empty`), the tensors are written into its buffer and ``out`` is
        returned with the stored positions and token ids; its spec and token count must match the container.
        ``device``: where the decoded buffer goes (``out``'s device when omitted). A CUDA destination decodes with
        the GPU kernels of :mod:`kvpack.gpu` (same bytes, same validation; docs/gpu.md).
        """
        container = read_container(data)
        header = container.header
        info = _codec_info(header)
        if info["name"] != self.name or info["version"] != self.version or info["params"] != self.params():
            raise CodecError(
                f"container was written by codec {info['name']} v{info['version']} {info['params']}, not by "
                f"{self.name} v{self.version} {self.params()}; use kvpack.decode(data) to pick the codec from the file"
            )
        return self._decode_container(container, spec, token_ids, out, device)

    def _decode_container(self, container: Container, spec: ModelSpec | None,
                          token_ids: torch.Tensor | Sequence[int] | None, out: KVCache | None,
                          device: torch.device | str | None = None, kernels: bool = False) -> KVCache:
        header = container.header
        written_with = _codec_info(header).get("profile")
        if written_with != self.profile_hash():
            raise ProfileMismatchError(
                f"this chunk was encoded with calibration profile {written_with}, but the codec has "
                f"{self.profile_hash()}; decode it with the profile it names"
            )
        stored_spec = validate.header_spec(header.get("spec"))
        if spec is not None and spec.fingerprint != stored_spec.fingerprint:
            raise ModelMismatchError(
                f"this cache was made by model {stored_spec.name or '?'} (fingerprint {stored_spec.fingerprint[:12]}), "
                f"not by {spec.name or '?'} ({spec.fingerprint[:12]}); recompute it with the model you are using"
            )
        if spec is not None:
            validate.check_layout(stored_spec, spec)
        num_tokens, positions, ids_hash = _tokens_info(header, container)
        ids = None
        if token_ids is not None:
            ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
            if ids.numel() != num_tokens or (ids_hash is not None and token_ids_hash(ids) != ids_hash):
                raise TokenMismatchError("the token ids given are not the ones this cache was computed from")
        meta = header.get("meta")
        if not isinstance(meta, dict):
            raise FormatError("header has no codec meta object")
        the_spec = spec or stored_spec
        validate.element_count(the_spec, num_tokens)
        sizes = self.section_sizes(meta, the_spec, num_tokens)
        if "positions" in container.sections:
            sizes = {"positions": validate.exact(8 * num_tokens), **sizes}
        validate.check_sections(container, sizes)
        if out is not None and (out.spec.fingerprint != the_spec.fingerprint or out.num_tokens != num_tokens):
            raise ValueError(f"out= holds {out.num_tokens} tokens of model {out.spec.fingerprint[:12]}; this "
                             f"container holds {num_tokens} tokens of {the_spec.fingerprint[:12]}")
        target = None if out is None else out.data
        where = torch.device(device) if device is not None else None if target is None else target.device
        if target is not None and where != target.device:
            raise ValueError(f"out= is on {target.device}, device= says {where}")
        if kernels or (where is not None and where.type == "cuda"):  # the Triton decoders (`kernels`: tests, CPU)
            from kvpack.gpu import decode_payload

            data = decode_payload(self, meta, container, the_spec, num_tokens, target, where or torch.device("cpu"))
        else:
            data = self.decode_payload(meta, container, the_spec, num_tokens, target)
            data = data if where is None else data.to(where)
        if tuple(data.shape) != the_spec.buffer_shape(num_tokens) or data.dtype != the_spec.torch_dtype:
            raise CodecError(f"codec {self.name} decoded {tuple(data.shape)} {data.dtype}, expected "
                             f"{the_spec.buffer_shape(num_tokens)} {the_spec.torch_dtype}")  # a codec bug, not input
        if out is None:
            return KVCache(spec=the_spec, data=data, positions=positions, token_ids=ids)
        if data is not out.data:
            out.data.copy_(data)
        out.positions.copy_(positions)
        out.token_ids = ids
        return out


def _positions_header(positions: torch.Tensor) -> tuple[dict[str, Any], dict[str, bytes]]:
    n = positions.numel()
    start = int(positions[0]) if n else 0
    if n == 0 or torch.equal(positions, torch.arange(start, start + n, dtype=torch.int64)):
        return {"start": start}, {}
    return {"section": "positions"}, {"positions": positions.numpy().astype("<i8").tobytes()}


def _codec_info(header: Mapping[str, Any]) -> dict[str, Any]:
    if header.get("kind") != KIND:
        raise FormatError(f"container holds a {header.get('kind')!r}, not a KV cache")
    info = header.get("codec")
    if (not isinstance(info, dict) or not isinstance(info.get("name"), str) or not isinstance(info.get("params"), dict)
            or not isinstance(info.get("profile"), str | None)):
        raise FormatError("header has no valid codec description")
    validate.json_int(info.get("version"), "codec.version", 1, 1 << 16)
    return info


def _tokens_info(header: Mapping[str, Any], container: Container) -> tuple[int, torch.Tensor, str | None]:
    tokens = header.get("tokens")
    if not isinstance(tokens, dict):
        raise FormatError("header has no tokens object")
    positions, ids_hash = tokens.get("positions"), tokens.get("ids_hash")
    count = validate.json_int(tokens.get("count"), "tokens.count", 0, validate.MAX_TOKENS)
    if not isinstance(positions, dict) or len(positions) != 1 or not {"start", "section"} & set(positions):
        raise FormatError("header has no positions object ({\"start\": s} or {\"section\": \"positions\"})")
    if ids_hash is not None and not isinstance(ids_hash, str):
        raise FormatError("bad token ids hash")
    if "start" in positions:
        start = validate.json_int(positions["start"], "tokens.positions.start", 0, validate.MAX_POSITION - 1)
        return count, torch.arange(start, start + count, dtype=torch.int64), ids_hash
    if positions["section"] != "positions":
        raise FormatError(f"positions must be in the section named 'positions', not {positions['section']!r}")
    raw = container.section("positions")
    if len(raw) != 8 * count:
        raise FormatError(f"positions section has {len(raw)} bytes, expected {8 * count}")
    return count, torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64)), ids_hash


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator adding a codec to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"codec name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered codecs."""
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Codec]:
    """The registered class for ``name``; :class:`CodecError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; available: {', '.join(available())}") from None


def get(name: str, **params: Any) -> Codec:
    """Build codec ``name`` with ``params``; string values (from the CLI) are converted to the field types."""
    cls = codec_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(params) - fields
    if unknown:
        raise CodecError(f"codec {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(fields)}")
    try:
        converted = {k: _convert(v, hints[k]) if isinstance(v, str) else v for k, v in params.items()}
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"invalid parameters for codec {name!r}: {exc}") from None


def parse_params(pairs: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` (CLI ``--param``) into a dict of strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CodecError(f"parameter {pair!r} is not of the form name=value")
        out[key.strip()] = value.strip()
    return out


def _convert(value: str, hint: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if type(None) in options and value.lower() in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        elif option in (int, float, str):
            try:
                return option(value)
            except ValueError:
                continue
    raise ValueError(f"cannot read {value!r} as {hint}")


def decode(data: bytes | memoryview, spec: ModelSpec | None = None, *, codec: Codec | None = None,
           profile: str | None = None, token_ids: torch.Tensor | Sequence[int] | None = None,
           out: KVCache | None = None, device: torch.device | str | None = None) -> KVCache:
    """Decode any kvpack KV container, picking the codec named in its header.

    With ``spec`` the model fingerprint is checked (:class:`ModelMismatchError`). Codecs that need a calibration
    profile take its path as ``profile`` (or are passed whole as ``codec``); the header names the profile's hash,
    which must match. ``token_ids``, when given, are checked against the stored hash. ``out`` and ``device``: see
    :meth:`Codec.decode`.
    """
    container = read_container(data)
    return codec_for(container, codec, profile)._decode_container(container, spec, token_ids, out, device)


def codec_for(container: Container, codec: Codec | None = None, profile: str | None = None) -> Codec:
    """The codec that decodes ``container``: the one its header names (with ``profile`` where it needs one), or
    ``codec`` after checking that it is that one (:func:`decode`'s arguments and errors)."""
    info = _codec_info(container.header)
    if codec is None:
        if info.get("profile") and profile is None:
            raise CodecError(f"this chunk was encoded by {info['name']} with calibration profile {info['profile']}; "
                             "pass the profile's path to decode it: profile=PATH (CLI: --profile PATH)")
        cls = codec_class(info["name"])
        if cls.version != info["version"]:
            raise FormatError(f"codec {info['name']} v{info['version']} is not supported by this kvpack "
                              f"(it has v{cls.version}); upgrade kvpack or re-encode")
        validate.check_params(cls, info["params"])
        try:
            codec = cls(**info["params"], **({"profile": profile} if info.get("profile") else {}))
        except (TypeError, ValueError) as exc:
            raise FormatError(f"codec parameters in the header are invalid: {exc}") from None
        if codec.params() != info["params"]:  # an encoder records resolved parameters (e.g. transform's sinks)
            raise FormatError(f"codec parameters in the header {info['params']} are not the ones an encoder writes "
                              f"({codec.params()})")
    elif info["name"] != codec.name or info["version"] != codec.version or info["params"] != codec.params():
        raise CodecError(f"container was written by {info['name']} {info['params']}, not by the codec given")
    return codec


def encode(kv: KVCache, codec: Codec | str = "raw", **params: Any) -> bytes:
    """Encode ``kv`` with ``codec`` (an instance, or a registered name plus parameters)."""
    return (get(codec, **params) if isinstance(codec, str) else codec).encode(kv)
