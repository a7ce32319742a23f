"""The counter-based hashing every sketch algorithm shares: murmur3's 32-bit finaliser (`mix32`), the
signs of a final position (`rademacher_signs`), and keyed hashes of Python integers (`word`,
`word_after`) and of index tensors (`index_hash`). Nothing here holds state: every process derives the
same bits from (seed, position)."""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
_WORD_START = 0x2545F491


def mix32(values: torch.Tensor | int) -> torch.Tensor | int:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32), or on one Python int
    there (the same bits: Python's product is exact, the tensor's wraps mod 2^64 above the kept 32)."""
    values = values ^ (values >> 16)
    values = (values * 0x85EBCA6B) & MASK32  # wraps mod 2^64; the low 32 bits are exact
    values = values ^ (values >> 13)
    values = (values * 0xC2B2AE35) & MASK32
    return values ^ (values >> 16)


def rademacher_signs(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """+1/-1 for each (final) position, a pure function of (seed, position): no sign vector is stored."""
    high = mix32(((positions >> 32) ^ (seed & MASK32)) & MASK32)
    hashed = mix32((positions & MASK32) ^ high)
    return 1.0 - 2.0 * (hashed & 1).to(torch.float32)


def word(*values: int) -> int:
    """A 32-bit hash of a tuple of Python integers (any size), via murmur3's finaliser."""
    return word_after(_WORD_START, *values)


def word_after(state: int, *values: int) -> int:
    """``word(*prefix, *values)`` from ``state = word(*prefix)``: a shared prefix is hashed once."""
    for value in values:
        for shift in (0, 32):
            word = ((value >> shift) & MASK32) ^ ((state * GOLDEN32) & MASK32)
            state = mix32(mix32(word) ^ 0x5BD1E995)  # on Python ints: no tensor per word
    return state


def index_hash(indices: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """A 32-bit hash (int64 in [0, 2^32)) of int64 indices in [0, 2^32), keyed.

    ``key`` is an int, or an int64 tensor of keys that broadcasts against ``indices`` (one key a row):
    the same bits, as the tensor's product wraps mod 2^64 above the kept 32."""
    return mix32(mix32((indices ^ key) & MASK32) ^ ((key * GOLDEN32) & MASK32))
