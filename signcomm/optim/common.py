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


def check_weight_decay(wd):
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")


def check_group(param_group, defaults):
    """A param group's own lr / beta / weight_decay (or the defaults it inherits)."""
    for key, check in (("lr", check_lr), ("beta", check_beta), ("weight_decay", check_weight_decay)):
        if key in param_group or key in defaults:
            check(param_group.get(key, defaults.get(key)))
