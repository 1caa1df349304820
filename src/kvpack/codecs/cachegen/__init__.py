"""`cachegen`: CacheGen's KV encoder with per-model tables (docs/cachegen.md).

Modules: :mod:`.profile` (the profile format and its tables), :mod:`.codec` (the codec and its kernels),
:mod:`.calibrate` (making a profile).
"""

from kvpack.codecs.cachegen.codec import CacheGen
from kvpack.codecs.cachegen.profile import CacheGenTables

__all__ = ["CacheGen", "CacheGenTables"]
