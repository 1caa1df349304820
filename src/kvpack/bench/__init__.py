"""Benchmark runners behind `kvpack bench ...`: each prints a table and writes JSON (and optional Markdown/PNG)."""
