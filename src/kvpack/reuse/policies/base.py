"""The `RepairPolicy` interface and its registry: which tokens of an assembled cache to recompute.

A prompt assembled from separately cached segments (:mod:`kvpack.reuse.segments`) holds, for every token after the
part that sits in its own caching context, K/V computed without the segments before it. A policy picks the tokens to
recompute (:func:`kvpack.reuse.recompute.recompute`); their fresh K/V replace the loaded ones, all other tokens keep
what was loaded. Policies are frozen dataclasses whose fields are their parameters, validated in ``__post_init__``,
registered by name like codecs (:func:`register`, :func:`get`, :func:`available`).
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvpack.errors import KvpackError
from kvpack.kv import KVCache
from kvpack.reuse.recompute import recompute


class PolicyError(KvpackError):
    """A repair policy was asked for with an unknown name or invalid parameters."""


@dataclass(frozen=True)
class RepairJob:
    """What a policy chooses from.

    ``kv`` is the assembled cache of the prompt's reused part (``data [layers, 2, kv_heads, tokens, head_dim]``,
    keys re-rotated to their positions); ``candidates`` the sorted int64 token indices ``[c]`` whose K/V were
    computed in another context (the moved segments' tokens; the exact prefix is never a candidate); ``segments``
    the ``(start, stop)`` token ranges of the moved segments within ``kv`` (clipped to the candidates);
    ``required`` the sorted token indices ``[e]`` that are recomputed whatever the policy chooses (edited tokens,
    which have no loaded K/V; never candidates); ``query`` the token ids ``[q]`` of the prompt after ``kv`` (its
    uncached tail, e.g. the question), for query-aware policies.
    """

    model: Any
    kv: KVCache
    candidates: torch.Tensor
    segments: tuple[tuple[int, int], ...]
    required: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    query: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def fresh(self, tokens: torch.Tensor) -> torch.Tensor:
        """Recomputed K/V of the sorted, distinct ``tokens`` (``[layers, 2, kv_heads, len(tokens), head_dim]``,
        see :func:`~kvpack.reuse.recompute.recompute`); the ``required`` tokens are recomputed with them (they have
        no loaded K/V to attend to)."""
        union = torch.cat([tokens, self.required]).unique()
        out = recompute(self.model, self.kv, union)
        return out if union.numel() == tokens.numel() else out[:, :, :, torch.searchsorted(union, tokens)]


@dataclass(frozen=True)
class Repair:
    """Fresh K/V, layer by layer: ``tokens[l]`` the sorted int64 token indices ``[m_l]`` recomputed at layer ``l``,
    ``kv[l]`` their K/V there ``[2, kv_heads, m_l, head_dim]``. Most policies recompute one set at every layer;
    CacheBlend's gradual filtering narrows it layer by layer."""

    tokens: tuple[torch.Tensor, ...]
    kv: tuple[torch.Tensor, ...]

    @classmethod
    def everywhere(cls, tokens: torch.Tensor, fresh: torch.Tensor) -> Repair:
        """``tokens [m]`` recomputed at every layer, ``fresh [layers, 2, kv_heads, m, head_dim]``."""
        return cls(tokens=(tokens,) * fresh.shape[0], kv=tuple(fresh.unbind(0)))

    def apply(self, kv: KVCache) -> None:
        """Write the fresh K/V into ``kv``'s rows (every other row keeps what was loaded)."""
        for layer, (tokens, fresh) in enumerate(zip(self.tokens, self.kv, strict=True)):
            if tokens.numel():
                kv.data[layer, :, :, tokens] = fresh

    @property
    def recomputed(self) -> torch.Tensor:
        """The tokens recomputed at every layer (sorted)."""
        common = self.tokens[0]
        for tokens in self.tokens[1:]:
            common = common[torch.isin(common, tokens)]
        return common

    @property
    def token_layers(self) -> int:
        """How many (token, layer) pairs were recomputed: the compute spent, in units of one token through one
        layer."""
        return sum(t.numel() for t in self.tokens)


@dataclass(frozen=True)
class RepairPolicy(ABC):
    """Base of every repair policy: a frozen dataclass whose fields are its parameters."""

    name: ClassVar[str]
    #: False for policies that recompute everything after the exact prefix: segments are then not even loaded.
    reuses_segments: ClassVar[bool] = True

    @abstractmethod
    def select(self, job: RepairJob) -> torch.Tensor:
        """Sorted, distinct int64 token indices ``[r]``, a subset of ``job.candidates``, recomputed at every layer."""

    def repair(self, job: RepairJob) -> Repair:
        """The fresh K/V this policy puts in ``job.kv``: by default :meth:`select`'s tokens and ``job.required``,
        recomputed at every layer. Policies whose set changes from layer to layer override it."""
        chosen = self.select(job)
        if not bool(torch.isin(chosen, job.candidates).all()):
            raise PolicyError(f"repair policy {self.name} chose tokens outside the moved segments")
        chosen = torch.cat([chosen, job.required]).unique()
        return Repair.everywhere(chosen, job.fresh(chosen))

    def params(self) -> dict[str, Any]:
        """The policy's parameters (for reports and benchmarks)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_fraction(policy: str, label: str, value: Any, what: str = "") -> None:
    """Raise :class:`PolicyError` unless parameter ``label`` of ``policy`` is a number (not a bool) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{policy}: {label} must be a fraction in [0, 1]{what}, got {value!r}")


def check_int(policy: str, label: str, value: Any, positive: bool, what: str = "") -> None:
    """Raise :class:`PolicyError` unless parameter ``label`` of ``policy`` is an int (not a bool), positive or
    non-negative."""
    if not isinstance(value, int) or isinstance(value, bool) or value < int(positive):
        raise PolicyError(f"{policy}: {label} must be a {'positive' if positive else 'non-negative'} int{what}, got "
                          f"{value!r}")


def top_tokens(candidates: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` of ``candidates [c]`` with the highest ``scores [c]``, sorted."""
    return candidates[scores.topk(count).indices].sort().values


_REGISTRY: dict[str, type[RepairPolicy]] = {}


def register(cls: type[RepairPolicy]) -> type[RepairPolicy]:
    """Class decorator adding a policy to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"repair policy name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered repair policies."""
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> RepairPolicy:
    """Build policy ``name`` with ``params`` (strings, e.g. from a command line, are converted to the field types)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise PolicyError(f"unknown repair policy {name!r}; available: {', '.join(available())}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise PolicyError(f"repair policy {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(fields)}")
    try:
        return cls(**{k: hints[k](v) if isinstance(v, str) else v for k, v in params.items()})
    except (TypeError, ValueError) as exc:  # a field of the wrong type, or a string that does not convert
        raise PolicyError(f"invalid parameters for repair policy {name!r}: {exc}") from None
