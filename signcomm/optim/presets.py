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

``beta`` is always the weight of the new gradient (mu = 1 - beta)."""
from __future__ import annotations

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
# options that a preset fixes: changing them would make it another method
_FIXED = {"signsgd-mv": {"contribution", "variant", "beta", "momentum_init"},
          "sto-signsgd": {"contribution", "variant", "beta", "momentum_init"}}


def create_optimizer(name: str, params, lr: float, **options):
    """``create_optimizer("mvsm-v2", model.parameters(), lr=1e-3, beta=0.1, ...)``.

    The distributed names build an ``MVSM`` with the preset's options (any MVSM option
    may be given, except the ones that define the method); "signum" and "signsgd" build
    the single-node optimizers."""
    key = name.lower().replace("_", "-")
    if key in SINGLE_NODE:
        return SINGLE_NODE[key](params, lr=lr, **options)
    if key not in PRESETS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")
    fixed = _FIXED.get(key, set()) & set(options)
    if fixed:
        raise ValueError(f"{name} fixes {', '.join(sorted(fixed))}; use another method instead")
    kwargs = dict(PRESETS[key])
    kwargs.update(options)
    return MVSM(params, lr=lr, **kwargs)
