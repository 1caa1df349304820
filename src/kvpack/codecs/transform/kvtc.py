"""`kvtc`: the KVTC recipe (Staniszewski et al., arXiv 2511.01815) on the `transform` codec's machinery."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvpack.codecs.base import register
from kvpack.codecs.transform.codec import Transform


@register
@dataclass(frozen=True)
class KVTC(Transform):
    """The KVTC recipe as published (arXiv 2511.01815): separate K and V PCA, int2/int4/fp8 blocks with group scales,
    DEFLATE of the packed symbols, fp8 sinks; calibrate with ``recipe="kvtc"``. Same parameters as ``transform``."""

    name = "kvtc"
    recipe: ClassVar[str] = "kvtc"

