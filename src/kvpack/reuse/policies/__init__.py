"""Repair policies (one module each; importing a module registers it): `none`, `epic`, `blend`, `full`."""

from kvpack.reuse.policies import blend, epic, full, none  # importing a policy module registers it
from kvpack.reuse.policies.base import PolicyError, RepairJob, RepairPolicy, available, get, register
from kvpack.reuse.policies.blend import Blend
from kvpack.reuse.policies.epic import Epic
from kvpack.reuse.policies.full import FullRecompute
from kvpack.reuse.policies.none import NoRepair

__all__ = ["Blend", "Epic", "FullRecompute", "NoRepair", "PolicyError", "RepairJob", "RepairPolicy", "available",
           "blend", "epic", "full", "get", "none", "register"]
