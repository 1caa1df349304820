"""Integrations of kvpack with serving engines: :mod:`kvpack.integrations.vllm` (extra ``kvpack[vllm]``).

The pure parts (page layouts, chunk arithmetic) live beside it and import no engine, so they are tested without one.
"""
