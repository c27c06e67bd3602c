"""Checkpoints are validated on load: a bad field raises one CheckpointError naming it,
and nothing in the optimizer changes; unreadable files get an error naming the file."""
import copy

import pytest
import torch

import signcomm
from signcomm import CheckpointError, load_checkpoint


def trained():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(torch.randn(2))
    opt = signcomm.MVSM([w, b], lr=0.1, beta=0.5, transport="mpi")
    for _ in range(3):
        w.grad, b.grad = torch.randn(6), torch.randn(2)
        opt.step()
    return opt, opt.state_dict()


def bad_momentum_shape(sd):
    sd["state"][0]["momentum_buffer"] = torch.zeros(7)


def nan_momentum(sd):
    sd["state"][1]["momentum_buffer"] = torch.full((2,), float("nan"))


def negative_step(sd):
    sd["signcomm"]["step"] = -7


def huge_step(sd):
    sd["signcomm"]["step"] = 2 ** 70


def float_step(sd):
    sd["signcomm"]["step"] = 3.0


def fewer_params(sd):
    sd["param_groups"][0]["params"] = [0]


@pytest.mark.parametrize("spoil,field", [
    (bad_momentum_shape, r"state\[0\]\['momentum_buffer'\] has shape \(7,\)"),
    (nan_momentum, r"state\[1\]\['momentum_buffer'\] is not finite"),
    (negative_step, r"signcomm\['step'\]"), (huge_step, r"signcomm\['step'\]"),
    (float_step, r"signcomm\['step'\]"), (fewer_params, "param_groups: the checkpoint has 1"),
])
def test_bad_fields_are_refused_by_name_and_change_nothing(spoil, field):
    opt, sd = trained()
    sd = copy.deepcopy(sd)  # torch's state_dict shares the state's dicts
    spoil(sd)
    mom = [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(CheckpointError, match=field):
        opt.load_state_dict(sd)
    assert opt.engine.step == 3
    for p, m in zip(opt.param_groups[0]["params"], mom):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)


def test_good_checkpoint_round_trip(tmp_path):
    opt, sd = trained()
    path = tmp_path / "opt-rank0.pt"
    torch.save(sd, path)
    opt2, _ = trained()
    opt2.load_state_dict(load_checkpoint(path))
    assert opt2.engine.step == 3


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_truncated_or_corrupt_files_name_the_file(tmp_path, content):
    opt, sd = trained()
    path = tmp_path / "opt-rank0.pt"
    torch.save(sd, path)
    if content is None:  # truncated
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="opt-rank0.pt cannot be read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
