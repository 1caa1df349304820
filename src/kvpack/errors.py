"""Typed errors of kvpack.

Every failure a user can cause with bad input or a broken store surfaces as one of these; each message says what
is wrong and what to do about it.
"""

from __future__ import annotations


class KvpackError(Exception):
    """Base class of every error kvpack raises on purpose."""


class FormatError(KvpackError):
    """Bytes that are not a valid kvpack container: truncated, corrupted, foreign, or from a newer format."""


class ModelMismatchError(KvpackError):
    """A valid container written for another model (its spec fingerprint differs from the one given)."""


class ProfileMismatchError(KvpackError):
    """A chunk encoded with one calibration profile was given another to decode with."""


class CodecError(KvpackError):
    """A codec was asked for with an unknown name or invalid parameters, or cannot encode this cache."""


class StoreError(KvpackError):
    """A store backend failed (unreachable server, unwritable directory, bad URL)."""


class ModelLoadError(KvpackError):
    """A model could not be loaded (missing package, bad path, unsupported architecture)."""


class UnsupportedModelError(KvpackError):
    """The model's cache layout is one kvpack does not handle (for example sliding-window layers)."""


class TokenMismatchError(KvpackError):
    """Token ids given to decode a cache are not the ones the cache was computed from."""


class ProfileError(CodecError):
    """A calibration profile cannot be used: its file is missing or unreadable, it is not a valid profile, or it was
    made for another codec or recipe. Make one with ``kvpack calibrate --codec NAME`` for the model in use."""
