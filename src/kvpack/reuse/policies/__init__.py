"""Repair policies (one module each; importing a module registers it): `none`, `epic`, `blend`, `prophet`, `full`."""

from kvpack.reuse.policies import blend, epic, full, none, prophet  # importing a policy module registers it
from kvpack.reuse.policies.base import PolicyError, Repair, RepairJob, RepairPolicy, available, get, register
from kvpack.reuse.policies.blend import Blend
from kvpack.reuse.policies.epic import Epic
from kvpack.reuse.policies.full import FullRecompute
from kvpack.reuse.policies.none import NoRepair
from kvpack.reuse.policies.prophet import Prophet

__all__ = ["Blend", "Epic", "FullRecompute", "NoRepair", "PolicyError", "Prophet", "Repair", "RepairJob",
           "RepairPolicy", "available", "blend", "epic", "full", "get", "none", "prophet", "register"]
