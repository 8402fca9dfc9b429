"""Byte counts as people read them."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Bytes as B, KiB, MiB or GiB (two decimals past bytes)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
