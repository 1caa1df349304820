"""`CalibratedCodec`: the base of codecs that need a per-model calibration profile (transform, kvtc, cachegen).

Such a codec names its profile (``profile=``: a file made by ``kvpack calibrate``, or a :class:`Profile` in
memory), makes one with :meth:`CalibratedCodec.calibrate`, and turns it into what coding needs with
:meth:`CalibratedCodec.compile`. The file is read once per version (:meth:`Profile.open`), compiled once per profile
(:meth:`Profile.compiled`) and kept on the codec, so coding a chunk reads, stats and rebuilds nothing. Every way a
profile can be unusable raises :class:`~kvpack.errors.ProfileError`.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kvpack.codecs.base import NOT_IN_BITSTREAM, Codec, available, codec_class
from kvpack.errors import FormatError, ProfileError
from kvpack.profile import Profile
from kvpack.spec import ModelSpec

if TYPE_CHECKING:
    from kvpack.eval.corpora import Document

#: What a codec compiles from its profile (validated arrays, entropy models).
C = TypeVar("C")
T = TypeVar("T")
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CalibratedCodec(Codec, Generic[C]):
    """A codec with a per-model profile. ``profile``: path of the profile file, or the :class:`Profile` itself.

    Not one of :meth:`params`: a chunk names the profile by its hash (:meth:`profile_hash`), so the file may move.
    Subclasses validate their own parameters in ``__post_init__`` and then call ``super().__post_init__()``, which
    loads and compiles the profile (so a bad one fails when the codec is made, not at the first chunk).
    """

    profile: str | Profile = dataclasses.field(default="", repr=False, metadata=NOT_IN_BITSTREAM)

    def __post_init__(self) -> None:
        if not isinstance(self.profile, Profile) and not (isinstance(self.profile, str) and self.profile):
            raise ValueError(f"{self.name} needs profile=PATH of a calibration profile (make one with "
                             f"`kvpack calibrate --codec {self.name}`)")
        self.compiled  # noqa: B018  (load and compile now)

    @classmethod
    @abstractmethod
    def calibrate(cls, model: Any, tokenizer: Any, texts: Sequence[str] | None = None, *,
                  docs: int | Sequence[Document] = 6, spec: ModelSpec | None = None, log: Log | None = None,
                  **options: Any) -> Profile:
        """A profile for ``model`` (a transformers causal LM and its tokenizer; ``spec`` defaults to theirs).

        Args:
            texts: calibration texts; default: ``docs``.
            docs: how many of kvpack's calibration documents (never evaluation ones) to take, or the documents
                (e.g. ``kvpack.eval.documents(6, "calibration", sources=...)``).
            log: called with a short status line per step.
            options: the codec's calibration settings (:meth:`calibration_config`).
        """

    @classmethod
    @abstractmethod
    def calibration_config(cls, options: Mapping[str, Any]) -> Any:
        """The codec's calibration settings (a dataclass) made from ``options`` (name -> value): a ``ValueError``
        naming what is wrong for an unknown name or a bad value, without touching a model (``kvpack calibrate``
        checks its ``--option`` values with it before loading one)."""

    @classmethod
    @abstractmethod
    def compile(cls, profile: Profile) -> C:
        """Validate ``profile`` and build what coding needs from it; :class:`FormatError` if it is not a profile
        for this codec."""

    @functools.cached_property
    def calibration(self) -> Profile:
        """The profile (read once per version of its file)."""
        return self.profile if isinstance(self.profile, Profile) else Profile.open(self.profile)

    @functools.cached_property
    def compiled(self) -> C:
        """What :meth:`compile` built from the profile, once per profile and codec class."""
        cls = type(self)
        try:
            return self.calibration.compiled(cls, cls.compile)
        except FormatError as exc:
            where = self.profile if isinstance(self.profile, str) else f"profile {self.calibration.hash}"
            raise ProfileError(f"{where} is not a usable {self.name} profile: {exc}; make one with "
                               f"`kvpack calibrate --codec {self.name}`") from None

    def profile_hash(self) -> str:
        return self.calibration.hash

    def profile_nbytes(self) -> int:
        return self.calibration.nbytes


def calibrated() -> list[str]:
    """Names of the registered codecs that need a profile."""
    return [name for name in available() if issubclass(codec_class(name), CalibratedCodec)]


def config_from_options(config: type[T], options: Mapping[str, Any], what: str, docs: str) -> T:
    """``config(**options)`` for a dataclass of calibration settings; a name it does not have is refused with the
    names it has (``what``: whose settings; ``docs``: the page that describes them)."""
    names = [f.name for f in dataclasses.fields(config)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"{what} has no setting {', '.join(map(repr, unknown))}; its settings: {', '.join(names)} "
                         f"({docs})")
    return config(**options)
