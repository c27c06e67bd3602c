"""The majority-vote family and the single-node sign methods, created by name.

=====================  ===============================  ===========================
name                   rank j contributes               aggregate / update
=====================  ===============================  ===========================
signsgd-mv             sign(g)  (Bernstein et al. 2018)  sign(sum)
signum-mv              sign(m), m = mu m + (1-mu) g,     sign(sum), decoupled weight
                       m_0 = 0 (Bernstein et al. 2019)   decay after the vote
sto-signsgd            S_R(g), no momentum (Jin 2021)    sign(sum)
mv-sto-signsgd-sim     S_R(v), momentum with v_0 = 0     sign(sum)
                       (Sun et al. 2023)
mvsm-v1                S_R(v), v_1 = g_1 (eq. 9)         sign(mean), eq. 10
mvsm-v2                S_R(v), v_1 = g_1                 S_1(mean), eq. 11
signum                 single node, Algorithm 1          x -= lr sign(v)
signsgd                single node, eq. 3                x -= lr sign(g)
=====================  ===============================  ===========================

``beta`` is always the weight of the new gradient (mu = 1 - beta).

A preset is locked: an option that would make it another member of the family, or that
it would silently ignore, raises a ``ValueError`` naming the preset and the option:

- ``contribution``, ``momentum_init`` and ``variant`` are fixed by every distributed
  preset (repeating the preset's own value is accepted; another value is refused, and the
  message names the preset that is that combination, if one is);
- ``beta`` is fixed to 1 by the momentum-free presets (``signsgd-mv``, ``sto-signsgd``);
  ``beta = 1`` is refused by a momentum preset when another preset is exactly that
  method (``signum-mv`` -> ``signsgd-mv``; ``mv-sto-signsgd-sim``, ``mvsm-v1`` ->
  ``sto-signsgd``); this holds for the constructor's ``beta`` and for a param group's;
- options with no effect are refused whatever their value: ``R`` for the sign presets
  (they send sign(.), not S_R) and ``tie`` for ``mvsm-v2`` (an S_1 vote never ties);
- the single-node ``signum`` / ``signsgd`` take only ``lr``, ``beta`` (``signum``) and
  ``weight_decay``.

The legitimate knobs stay free: ``lr``, ``beta`` of the momentum presets, ``R`` of the
S_R presets, ``tie`` of the v1 presets, ``weight_decay``, ``schedule``, ``transport``,
``seed``, ``byzantine``, ``bucket_elements``, ``lockstep_every``, ``overlap``,
``backend``, ``hierarchy``, ``ranks_per_node`` (the hierarchical vote: every preset is
then that method on H machines whose gradients are the means of their k ranks).  The optimizer's ``preset`` attribute names the preset it was built from."""
from __future__ import annotations

import inspect

from .majority import MVSM
from .single import Signum, SignSGD

PRESETS = {
    "signsgd-mv": dict(contribution="sign", beta=1.0, variant="v1"),
    "signum-mv": dict(contribution="sign", beta=0.1, momentum_init="zero", variant="v1"),
    "sto-signsgd": dict(contribution="sr", beta=1.0, variant="v1"),
    "mv-sto-signsgd-sim": dict(contribution="sr", beta=0.1, momentum_init="zero", variant="v1"),
    "mvsm-v1": dict(contribution="sr", beta=0.5, variant="v1"),
    "mvsm-v2": dict(contribution="sr", beta=0.1, variant="v2"),
}
SINGLE_NODE = {"signum": Signum, "signsgd": SignSGD}
NAMES = tuple(PRESETS) + tuple(SINGLE_NODE)

# The options that define a member of the family, with the value each preset fixes
# (MVSM's default where the preset does not set it).
DEFINING = ("contribution", "momentum_init", "variant")
MOMENTUM_FREE = ("signsgd-mv", "sto-signsgd")
# Options that a preset would ignore: refused whatever their value.
NO_EFFECT = {
    "signsgd-mv": {"R": "it sends sign(g), not S_R(g), so there is no R"},
    "signum-mv": {"R": "it sends sign(m), not S_R(m), so there is no R"},
    "mvsm-v2": {"tie": "its S_1 vote (eq. 11) never ties, so there is no tie rule"},
}
WITH_MOMENTUM = {"signsgd-mv": "the preset 'signum-mv'",
                 "sto-signsgd": "the preset 'mvsm-v1' (v_1 = g_1) or "
                                "'mv-sto-signsgd-sim' (v_0 = 0)"}
_MVSM_DEFAULTS = {"momentum_init": "first", "variant": "v1", "contribution": "sr"}


def fixed_options(name: str) -> dict:
    """The options preset ``name`` fixes and their values (beta only where it is fixed)."""
    p = PRESETS[name]
    out = {k: p.get(k, _MVSM_DEFAULTS[k]) for k in DEFINING}
    if name in MOMENTUM_FREE:
        out["beta"] = 1.0
    return out


def _identity(values) -> tuple:
    """What a combination of options is as a method: (contribution, momentum, variant),
    momentum None when beta = 1 (then momentum_init changes nothing)."""
    beta = values.get("beta", 0.5)
    momentum = None if beta == 1.0 else values.get("momentum_init", "first")
    return values.get("contribution", "sr"), momentum, values.get("variant", "v1")


def _which_preset(values):
    ident = _identity(values)
    for name, preset in PRESETS.items():
        if _identity(preset) == ident:
            return name
    return None


def _instead(name, values) -> str:
    other = _which_preset(values)
    if other is not None and other != name:
        return f"that combination is the preset {other!r}: create_optimizer({other!r}, ...)"
    return ("no preset is that combination: build it with signcomm.MVSM(...) directly, "
            "so its results do not carry this preset's name")


def _refuse(name, option, value, why, where=None):
    return ValueError(f"create_optimizer({name!r}): {name} fixes {option}; refusing "
                      f"{where or option}={value!r}: {why}")


def _check_beta(name, beta, where=None):
    """beta of the options or of one param group (``where`` says which)."""
    if name in MOMENTUM_FREE:
        if beta != 1.0:
            return _refuse(name, "beta", beta, f"{name} has no momentum (beta = 1); with "
                           f"momentum it is {WITH_MOMENTUM[name]}", where)
        return None
    if beta == 1.0:
        values = dict(PRESETS[name], beta=1.0)
        other = _which_preset(values)
        if other is not None and other != name:
            return _refuse(name, "beta", beta, "beta = 1 switches the momentum off, and "
                           + _instead(name, values), where)
    return None


def check_preset_options(name: str, options: dict):
    """Raise ``ValueError`` if ``options`` change what preset ``name`` is (see the
    module docstring); return None otherwise."""
    for option, why in NO_EFFECT.get(name, {}).items():
        if option in options:
            raise _refuse(name, option, options[option], why + "; drop the option")
    fixed = fixed_options(name)
    for option in DEFINING:
        if option in options and options[option] != fixed[option]:
            values = dict(PRESETS[name], **{option: options[option]})
            if _identity(values) == _identity(PRESETS[name]):  # momentum_init without momentum
                why = f"{name} has no momentum (beta = 1), so {option} would change nothing"
            else:
                why = f"{name} is {option}={fixed[option]!r}; " + _instead(name, values)
            raise _refuse(name, option, options[option], why)
    if "beta" in options:
        err = _check_beta(name, options["beta"])
        if err is not None:
            raise err


class PresetMVSM(MVSM):
    """``MVSM`` built by ``create_optimizer``: remembers its preset and applies the
    preset's lock to param groups added later (their own ``beta``)."""

    def __init__(self, params, *, preset: str, **kwargs):
        self.preset = preset  # set first: MVSM's constructor adds the param groups
        super().__init__(params, **kwargs)

    def add_param_group(self, param_group):
        if isinstance(param_group, dict) and "beta" in param_group:
            err = _check_beta(self.preset, param_group["beta"], where="a param group's beta")
            if err is not None:
                raise err
        super().add_param_group(param_group)


def _check_single(key, cls, options):
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"}
    for option, value in options.items():
        if option not in accepted:
            why = ("signsgd is Signum with beta = 1; use create_optimizer('signum', ...) for "
                   "momentum" if (key, option) == ("signsgd", "beta") else
                   f"{key} is a single-process optimizer; it takes "
                   f"{', '.join(sorted(accepted)) or 'no option'} besides lr")
            raise ValueError(f"create_optimizer({key!r}): {key} does not take {option}; "
                             f"refusing {option}={value!r}: {why}")


def create_optimizer(name: str, params, lr: float, **options):
    """``create_optimizer("mvsm-v2", model.parameters(), lr=1e-3, beta=0.1, ...)``.

    The distributed names build an ``MVSM`` with the preset's options (any MVSM option
    may be given, except the ones that define the method or that it would ignore: see
    the module docstring); "signum" and "signsgd" build the single-node optimizers."""
    key = name.lower().replace("_", "-")
    if key in SINGLE_NODE:
        _check_single(key, SINGLE_NODE[key], options)
        return SINGLE_NODE[key](params, lr=lr, **options)
    if key not in PRESETS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")
    check_preset_options(key, options)
    kwargs = dict(PRESETS[key])
    kwargs.update(options)
    return PresetMVSM(params, preset=key, lr=lr, **kwargs)
