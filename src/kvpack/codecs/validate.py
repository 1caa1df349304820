"""Validation of a KV container's header before any codec allocates: types, bounds, shapes and section lengths.

A container's checksums prove only that nobody corrupted it by accident: a writer with access to a shared store can
write any header with valid CRCs. So every field a decoder uses is checked here first, as safetensors' ``validate()``
does for its header (spec and bounds in docs/format.md, "What the reader checks, and its bounds"):

* integers are JSON integers (never booleans, which Python's ``isinstance(True, int)`` lets through, and which would
  reach numba kernels as a new type signature: seconds of compilation per forged file), within stated ranges;
* the header's model spec is well-typed (:func:`header_spec`); with a trusted spec given, its layout must agree;
* the cache's element count ``tokens * 2 * layers * kv_heads * head_dim`` is at most :data:`MAX_ELEMENTS`,
  computed in Python integers (no overflow), so the tensors a decode may allocate are bounded before it starts;
* every section a codec's meta implies is present with a length in the range the codec states for it
  (:class:`Size`, from :meth:`kvpack.codecs.base.Codec.section_sizes`), and no other section is present.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from kvpack.errors import FormatError
from kvpack.format import Container
from kvpack.spec import DTYPES, ROPE_TYPES, ModelSpec

#: Most tokens one container may declare.
MAX_TOKENS = 1 << 20
#: Most K/V elements one container may declare (``tokens * 2 * layers * kv_heads * head_dim``): 2 GiB of bf16,
#: 4 GiB of fp32. Llama-3-70B (163,840 elements per token) fits 6,553 tokens.
MAX_ELEMENTS = 1 << 30
#: Largest layers, KV heads or head dim a header spec may declare (:class:`kvpack.spec.ModelSpec`'s own bound).
MAX_DIM = 1 << 16
#: Bound on absolute token positions (and sliding windows): ``start < MAX_POSITION``.
MAX_POSITION = 1 << 40


def json_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int if it is a JSON integer (not a bool) in ``[lo, hi]``; :class:`FormatError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}: the header is forged or "
                          "corrupted; re-encode the cache")
    return int(value)


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FormatError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _json_scalar_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_json_scalar_or_list(v) for v in value)
    return value is None or isinstance(value, bool | str) or (isinstance(value, int | float) and
                                                              math.isfinite(value))


def header_spec(obj: Any) -> ModelSpec:
    """The model spec of a header, every field type- and range-checked; :class:`FormatError` otherwise."""
    if not isinstance(obj, dict):
        raise FormatError("header has no model spec object")
    layers = json_int(obj.get("num_layers"), "spec.num_layers", 1, MAX_DIM)
    json_int(obj.get("num_kv_heads"), "spec.num_kv_heads", 1, MAX_DIM)
    json_int(obj.get("head_dim"), "spec.head_dim", 1, MAX_DIM)
    if not isinstance(obj.get("dtype"), str) or obj["dtype"] not in DTYPES:
        raise FormatError(f"spec.dtype must be one of {sorted(DTYPES)}, got {obj.get('dtype')!r}")
    if not isinstance(obj.get("fingerprint"), str) or not isinstance(obj.get("name", ""), str):
        raise FormatError("spec.fingerprint and spec.name must be strings")
    windows = obj.get("sliding_windows")
    if not isinstance(windows, list) or len(windows) != layers:
        raise FormatError(f"spec.sliding_windows must be a list of {layers} entries")
    for w in windows:
        if w is not None:
            json_int(w, "a sliding window", 1, MAX_POSITION)
    _check_rope(obj.get("rope"), "spec.rope")
    if "layer_ropes" in obj:
        ropes = obj["layer_ropes"]
        if not isinstance(ropes, list) or len(ropes) != layers:
            raise FormatError(f"spec.layer_ropes must be a list of {layers} entries")
        for rope in ropes:
            _check_rope(rope, "spec.layer_ropes[]")
    return ModelSpec.from_json(obj)


def _check_rope(rope: Any, label: str) -> None:
    if not isinstance(rope, dict) or rope.get("type") not in ROPE_TYPES or not isinstance(rope.get("params"), dict):
        raise FormatError(f"{label} must be an object with a type in {ROPE_TYPES} and a params object")
    if _finite(rope.get("theta"), f"{label}.theta") <= 0:
        raise FormatError(f"{label}.theta must be positive")
    if not 0 < _finite(rope.get("partial_rotary_factor"), f"{label}.partial_rotary_factor") <= 1:
        raise FormatError(f"{label}.partial_rotary_factor must be in (0, 1]")
    if not all(isinstance(k, str) and _json_scalar_or_list(v) for k, v in rope["params"].items()):
        raise FormatError(f"{label}.params must map names to finite numbers, strings, booleans, null or lists")


def check_layout(stored: ModelSpec, trusted: ModelSpec) -> None:
    """A header spec with the trusted spec's fingerprint must also have its layout; :class:`FormatError` if not."""
    fields = ("num_layers", "num_kv_heads", "head_dim", "dtype")
    if any(getattr(stored, f) != getattr(trusted, f) for f in fields):
        raise FormatError(
            f"the header claims model {trusted.fingerprint[:12]} with layout "
            f"{[getattr(stored, f) for f in fields]}, but that model's is {[getattr(trusted, f) for f in fields]}: "
            "the header is forged or corrupted"
        )
    if stored.layer_ropes != trusted.layer_ropes:  # e.g. a Gemma 3 cache written before kvpack read its per-layer RoPE
        raise FormatError("the header describes this model's RoPE per layer differently from the model itself: the "
                          "cache was written by another kvpack version; recompute it")


def element_count(spec: ModelSpec, num_tokens: int) -> int:
    """``num_tokens * spec.elements_per_token``; :class:`FormatError` above :data:`MAX_ELEMENTS`."""
    count = num_tokens * spec.elements_per_token  # Python integers: no overflow
    if count > MAX_ELEMENTS:
        raise FormatError(f"the header declares {num_tokens} tokens of {spec.elements_per_token} K/V elements: "
                          f"{count} elements, more than the per-container limit of {MAX_ELEMENTS}")
    return count


def check_params(cls: type, params: Mapping[str, Any]) -> None:
    """Codec parameters from a header must each have a JSON type their field accepts (a bool is no int, an int is
    a float); :class:`FormatError` otherwise. Unknown names are left to the constructor."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for name, value in params.items():
        if name not in fields:
            continue
        hint = hints[name]
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
            typing.get_origin(hint) is typing.Union else (hint,)
        if not any(_has_type(value, option) for option in options):
            raise FormatError(f"codec parameter {name}={value!r} in the header is not of type {hint}")


def _has_type(value: Any, option: Any) -> bool:
    if option is type(None):
        return value is None
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if option is str:
        return isinstance(value, str)
    return False


@dataclasses.dataclass(frozen=True)
class Size:
    """The byte lengths a section may have: ``lo .. hi`` inclusive (``exact(n)``: exactly ``n``)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"bad section size range [{self.lo}, {self.hi}]")


def exact(n: int) -> Size:
    """A section of exactly ``n`` bytes."""
    return Size(n, n)


def check_sections(container: Container, sizes: Mapping[str, Size]) -> None:
    """Every section in ``sizes`` present with a length in its range, and no other section.

    A container read from a prefix (``container.complete`` false) may lack sections at the end, but its header's
    section table must still list every section, and those present must be the table's first ones.
    """
    extra = sorted(set(container.sections) - set(sizes))
    if extra:
        raise FormatError(f"container has sections {extra} that its codec does not write: the file is forged or "
                          "was written by another codec")
    if not container.complete:
        listed = [entry.get("name") for entry in container.header.get("sections", []) if isinstance(entry, dict)]
        if sorted(map(str, listed)) != sorted(sizes) or list(container.sections) != listed[: len(container.sections)]:
            raise FormatError(f"the section table lists {listed}, but the codec writes {sorted(sizes)} and a prefix "
                              "holds the table's first sections: the header is forged or corrupted")
    for name, size in sizes.items():
        if name not in container.sections:
            if container.complete:
                raise FormatError(f"container has no section {name!r}; the file is incomplete or was written by "
                                  "another codec")
            continue
        length = len(container.sections[name])
        if not size.lo <= length <= size.hi:
            expected = size.lo if size.lo == size.hi else f"{size.lo}..{size.hi}"
            raise FormatError(f"section {name!r} has {length} bytes; the header's shapes imply {expected}: the "
                              "file is forged or corrupted")


__all__ = ["MAX_DIM", "MAX_ELEMENTS", "MAX_POSITION", "MAX_TOKENS", "Size", "check_layout", "check_params",
           "check_sections", "element_count", "exact", "header_spec", "json_int"]
