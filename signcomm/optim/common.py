"""Argument checks shared by the optimizers (the conventions are stated once here)."""
import math


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_lr(lr):
    if not (_number(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def check_beta(beta):
    """beta is the weight of the NEW gradient (paper convention), in (0, 1]."""
    if not (_number(beta) and 0 < beta <= 1):
        raise ValueError(f"beta must be in (0, 1] (the weight of the new gradient; "
                         f"PyTorch-style momentum mu = 1 - beta), got {beta!r}")


def check_weight_decay(wd):
    if not (_number(wd) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {wd!r}")


def check_group(param_group, defaults):
    """A param group's own lr / beta / weight_decay (or the defaults it inherits)."""
    for key, check in (("lr", check_lr), ("beta", check_beta), ("weight_decay", check_weight_decay)):
        if key in param_group or key in defaults:
            check(param_group.get(key, defaults.get(key)))
    check_decay(param_group.get("lr", defaults.get("lr")),
                param_group.get("weight_decay", defaults.get("weight_decay", 0.0)))


def check_decay(lr, wd):
    """Decoupled weight decay multiplies x by 1 - lr * wd: it must stay in [0, 1]."""
    if lr is not None and wd and lr * wd > 1:
        raise ValueError(f"lr * weight_decay must be <= 1 (the decay multiplies x by "
                         f"1 - lr * weight_decay), got lr={lr!r}, weight_decay={wd!r}")
