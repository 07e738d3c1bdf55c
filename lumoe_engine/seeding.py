"""The project's one stable seed: ``stable_seed(*parts)``, a 63-bit integer from any printable parts, the same in every
process, on every platform and with any ``PYTHONHASHSEED`` (sha256 of the parts joined by an unprintable separator).

Every seeded choice derives its seed here from the run's seed and what it is about: the synthetic world's names,
facts and pictures, a request's expert initialisation, a gate head's calibration split, an evaluation sample, the
gate evaluation's held-out share. Two different parts lists give unrelated seeds, so adding a request to a stream
never changes another request's draws.
"""
from __future__ import annotations

import hashlib


def stable_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (each turned into text), stable across processes and platforms."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


__all__ = ["stable_seed"]
