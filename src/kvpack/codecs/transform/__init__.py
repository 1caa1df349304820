"""`transform` and `kvtc`: calibrated PCA transform coding (docs/transform.md).

Modules: :mod:`.features` (whole-model KV vectors), :mod:`.quant` (quantizers, block layout), :mod:`.profile` (the
validated profile), :mod:`.codec` (``transform``), :mod:`.kvtc` (``kvtc``), :mod:`.calibrate` (making a profile).
"""

from kvpack.codecs.transform.codec import Transform
from kvpack.codecs.transform.kvtc import KVTC
from kvpack.codecs.transform.profile import TransformProfile

__all__ = ["KVTC", "Transform", "TransformProfile"]
