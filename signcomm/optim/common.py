"""Argument checks shared by the optimizers (the conventions are stated once here)."""
import math


def check_lr(lr):
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def check_beta(beta):
    """beta is the weight of the NEW gradient (paper convention), in (0, 1]."""
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(f"beta must be in (0, 1] (the weight of the new gradient; "
                         f"PyTorch-style momentum mu = 1 - beta), got {beta!r}")
