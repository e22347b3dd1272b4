"""Leaf helpers with no dependency on the rest of acim_fast: atomic writes, config fields and flags, stable hashing."""
