"""Reuse cached text anywhere: segments at new positions (re-rotated keys) and repair policies (docs/reuse.md)."""

from kvpack.reuse import policies
from kvpack.reuse.policies import (
    Blend,
    Epic,
    FullRecompute,
    NoRepair,
    PolicyError,
    Prophet,
    Repair,
    RepairJob,
    RepairPolicy,
)
from kvpack.reuse.recompute import recompute
from kvpack.reuse.segments import Prompt, Segment, SegmentReuse, SegmentStats

__all__ = ["Blend", "Epic", "FullRecompute", "NoRepair", "PolicyError", "Prompt", "Prophet", "Repair", "RepairJob",
           "RepairPolicy", "Segment", "SegmentReuse", "SegmentStats", "policies", "recompute"]
