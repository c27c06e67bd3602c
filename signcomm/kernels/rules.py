"""The vote rule, stated once (docs/algorithms.md, "The vote").

With c the number of ranks whose bit is +1 at a coordinate and a = (2c - n) / n:

- ``v1`` (eq. 10): o = sign(a).  A tie (2c = n, only for even n) follows ``tie``:
  ``"coin"`` (default) takes a fair coin of the shared TIE_COIN stream (bit p % 64 of
  the word at position p // 64), ``"zero"`` gives o = 0 (the packed vote then carries a
  ``nonzero`` mask).
- ``v2`` (eq. 11): o = S_1(a): +1 with probability c / n, drawn from the shared S1
  stream at the coordinate's position.

Every face (kernels, schedules, the optimizer, the compressors, the DDP hook) takes a
``VoteRule``; nothing else validates variant/tie strings or maps them to kernel modes.
"""
from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("v1", "v2")
TIE_RULES = ("coin", "zero")

#: kernel modes (``_cpu.decide_from_counts`` and the torch backend)
MODE_V1_COIN, MODE_V1_ZERO, MODE_V2 = 0, 1, 2


@dataclass(frozen=True)
class VoteRule:
    """``VoteRule("v1", "coin")``, ``VoteRule("v1", "zero")`` or ``VoteRule("v2")``."""

    variant: str = "v1"
    tie: str = "coin"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.tie not in TIE_RULES:
            raise ValueError(f"tie must be one of {TIE_RULES}, got {self.tie!r}")

    @classmethod
    def of(cls, rule=None, *, variant: str = "v1", tie: str = "coin") -> "VoteRule":
        """``rule`` if it is a VoteRule, else one built from ``variant`` and ``tie``."""
        if isinstance(rule, VoteRule):
            return rule
        if rule is not None:
            raise TypeError(f"rule must be a VoteRule, got {rule!r}")
        return cls(variant, tie)

    @property
    def mode(self) -> int:
        """The kernels' integer mode: 0 v1/coin, 1 v1/zero, 2 v2."""
        if self.variant == "v2":
            return MODE_V2
        return MODE_V1_COIN if self.tie == "coin" else MODE_V1_ZERO

    @property
    def draws_shared_bits(self) -> bool:
        """True when the vote needs the shared key (S_1 draws, tie coins)."""
        return self.variant == "v2" or self.tie == "coin"

    def has_zeros(self, n: int) -> bool:
        """True when a vote of n ranks can give o = 0 (v1, tie "zero", even n)."""
        return self.variant == "v1" and self.tie == "zero" and n % 2 == 0

    def shared_purpose(self):
        """The random stream the vote draws from (S1 for v2, TIE_COIN for v1)."""
        from .rng import Purpose
        return Purpose.S1 if self.variant == "v2" else Purpose.TIE_COIN

    def shared_key(self, seed: int, step: int) -> int:
        """The key of the vote's shared bits at ``step`` (same on every rank)."""
        from .rng import key64, stream_id
        return key64(seed, stream_id(self.shared_purpose()), step)

    def check_key(self, key):
        if self.draws_shared_bits and key is None:
            raise ValueError(f"variant={self.variant!r} with tie={self.tie!r} draws shared "
                             "random bits: pass key")
