"""Presets are locked (issue 15, item 2): every option that defines a member of the
family, or that the preset would ignore, is refused with a ValueError naming the preset
and the option; the legitimate knobs stay free.  One process (an MPI singleton)."""
import inspect
import re

import pytest
import torch

import signcomm

DISTRIBUTED = ["signsgd-mv", "signum-mv", "sto-signsgd", "mv-sto-signsgd-sim", "mvsm-v1", "mvsm-v2"]

# What defines each member (the test's own table, written from docs/optim.md and
# docs/algorithms.md, not read from presets.py): another value of one of these is refused.
DEFINES = {
    "signsgd-mv": dict(contribution="sign", variant="v1", momentum_init="first", beta=1.0),
    "signum-mv": dict(contribution="sign", variant="v1", momentum_init="zero"),
    "sto-signsgd": dict(contribution="sr", variant="v1", momentum_init="first", beta=1.0),
    "mv-sto-signsgd-sim": dict(contribution="sr", variant="v1", momentum_init="zero"),
    "mvsm-v1": dict(contribution="sr", variant="v1", momentum_init="first"),
    "mvsm-v2": dict(contribution="sr", variant="v2", momentum_init="first"),
}
# Options a preset would silently ignore: refused whatever the value.
IGNORED = {"signsgd-mv": {"R"}, "signum-mv": {"R"}, "mvsm-v2": {"tie"}}
# beta = 1 turns these into another preset (signsgd-mv, sto-signsgd): refused.
BETA_ONE_IS_ANOTHER = {"signum-mv": "signsgd-mv", "mv-sto-signsgd-sim": "sto-signsgd",
                       "mvsm-v1": "sto-signsgd"}
# Every MVSM option, with values to try (the first is MVSM's default where it has one).
VALUES = {
    "beta": [1.0, 0.5, 0.1],
    "variant": ["v1", "v2"],
    "R": ["global", "local", 0.5],
    "schedule": ["allgather", "sharded", "allreduce"],
    "transport": ["mpi"],
    "weight_decay": [0.0, 0.01],
    "seed": [0, 3],
    "tie": ["coin", "zero"],
    "contribution": ["sr", "sign"],
    "momentum_init": ["first", "zero"],
    "byzantine": [False, True],
    "bucket_elements": [1024],
    "lockstep_every": [0, 2],
    "overlap": [False, True],
    "backend": ["auto", "numba", "torch"],
    "hierarchy": [None, "host"],
    "ranks_per_node": [None, 1],
}


def _params():
    return [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))]


def expected(preset, option, value):
    """'refuse' or 'accept', from the test's own tables."""
    if option in IGNORED.get(preset, ()):
        return "refuse"
    fixed = DEFINES[preset]
    if option in fixed and value != fixed[option]:
        return "refuse"
    if option == "beta" and value == 1.0 and preset in BETA_ONE_IS_ANOTHER:
        return "refuse"
    return "accept"


CASES = [(p, o, v) for p in DISTRIBUTED for o, vs in VALUES.items() for v in vs]


def test_every_mvsm_option_is_in_the_table():
    """A new MVSM option must be classified here (legitimate knob or defining option)."""
    opts = set(inspect.signature(signcomm.MVSM.__init__).parameters) - {"self", "params", "lr"}
    missing = opts - set(VALUES)
    assert not missing, (f"MVSM has options this lock test does not know: {sorted(missing)}; "
                         "add them to VALUES (and, if they define a method, to DEFINES / "
                         "presets.py)")


@pytest.mark.parametrize("preset,option,value", CASES,
                         ids=[f"{p}-{o}={v}" for p, o, v in CASES])
def test_preset_option(preset, option, value):
    kwargs = {"transport": "mpi", option: value}
    if expected(preset, option, value) == "refuse":
        with pytest.raises(ValueError) as err:
            signcomm.create_optimizer(preset, _params(), lr=0.01, **kwargs)
        msg = str(err.value)
        # names the preset and the option, and says it refuses
        assert re.search(rf"\b{re.escape(preset)}\b", msg) and f"{option}=" in msg, msg
        assert "refusing" in msg and "fixes" in msg, msg
    else:
        opt = signcomm.create_optimizer(preset, _params(), lr=0.01, **kwargs)
        try:
            assert isinstance(opt, signcomm.MVSM) and opt.preset == preset
            if option == "beta":
                assert opt.param_groups[0]["beta"] == value
        finally:
            opt.close()


@pytest.mark.parametrize("preset", DISTRIBUTED)
def test_defaults_build(preset):
    """With no option every preset builds, and upper case / underscores work."""
    for name in (preset, preset.upper().replace("-", "_")):
        opt = signcomm.create_optimizer(name, _params(), lr=0.01, transport="mpi")
        assert opt.preset == preset


def test_refusal_points_to_the_preset_that_is_that_combination():
    cases = [("mvsm-v1", dict(variant="v2"), "mvsm-v2"),
             ("mvsm-v2", dict(variant="v1"), "mvsm-v1"),
             ("mvsm-v1", dict(momentum_init="zero"), "mv-sto-signsgd-sim"),
             ("signum-mv", dict(contribution="sr"), "mv-sto-signsgd-sim"),
             ("mvsm-v1", dict(beta=1.0), "sto-signsgd"),
             ("signum-mv", dict(beta=1.0), "signsgd-mv"),
             ("signsgd-mv", dict(beta=0.5), "signum-mv"),
             ("sto-signsgd", dict(contribution="sign"), "signsgd-mv")]
    for preset, opts, other in cases:
        with pytest.raises(ValueError, match=rf"'{other}'"):
            signcomm.create_optimizer(preset, _params(), lr=0.01, transport="mpi", **opts)
    with pytest.raises(ValueError, match="no preset is that combination.*signcomm.MVSM"):
        signcomm.create_optimizer("mvsm-v2", _params(), lr=0.01, transport="mpi",
                                  contribution="sign")


@pytest.mark.parametrize("preset", DISTRIBUTED)
def test_param_group_beta_is_locked_too(preset):
    """A param group's own beta cannot turn a preset into another method, neither at
    construction nor through add_param_group later."""
    bad = 0.5 if preset in ("signsgd-mv", "sto-signsgd") else (
        1.0 if preset in BETA_ONE_IS_ANOTHER else None)
    p, q = _params()
    if bad is None:  # mvsm-v2: any beta of (0, 1] is still MVSM-v2
        opt = signcomm.create_optimizer(preset, [{"params": [p], "beta": 1.0}], lr=0.01,
                                        transport="mpi")
        opt.add_param_group({"params": [q], "beta": 0.3})
        return
    with pytest.raises(ValueError, match=rf"{preset} fixes beta; refusing a param group's beta"):
        signcomm.create_optimizer(preset, [{"params": [p], "beta": bad}], lr=0.01, transport="mpi")
    opt = signcomm.create_optimizer(preset, [p], lr=0.01, transport="mpi")
    with pytest.raises(ValueError, match=rf"{preset} fixes beta"):
        opt.add_param_group({"params": [q], "beta": bad})
    opt.add_param_group({"params": [q]})  # no own beta: fine


@pytest.mark.parametrize("name,option,value,ok", [
    ("signum", "beta", 0.5, True), ("signum", "weight_decay", 0.1, True),
    ("signsgd", "weight_decay", 0.1, True), ("signsgd", "beta", 0.5, False),
    ("signum", "R", 1.0, False), ("signum", "variant", "v2", False),
    ("signsgd", "contribution", "sr", False), ("signum", "transport", "mpi", False),
    ("signsgd", "tie", "zero", False)])
def test_single_node_options(name, option, value, ok):
    """The single-process optimizers take lr, beta (signum) and weight_decay; anything
    else is a ValueError naming the optimizer and the option (was a TypeError)."""
    if ok:
        signcomm.create_optimizer(name, _params(), lr=0.01, **{option: value})
        return
    with pytest.raises(ValueError, match=rf"'{name}'.*does not take {option}; refusing {option}="):
        signcomm.create_optimizer(name, _params(), lr=0.01, **{option: value})
