"""Stable hashing: values that are pure functions of their parts, the same in every process and run.

Python's `hash` is salted per process, so every split, shuffle, problem id and seed the trainer derives comes from
`stable_hash` instead. It does not hash tensors or objects by identity: parts are hashed through their `str()`.
"""

from __future__ import annotations

import hashlib


def stable_hash(*parts: object, sep: str = "\x00") -> int:
    """A 64-bit int: the first 8 bytes (big-endian) of the SHA-256 of the parts' str() joined by `sep`."""
    text = sep.join(map(str, parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def stable_seed(*parts: object, sep: str = "\x00") -> int:
    """A 63-bit seed (non-negative for torch.Generator.manual_seed) derived from `parts` as `stable_hash`."""
    return stable_hash(*parts, sep=sep) >> 1
