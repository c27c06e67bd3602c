"""Issue 3: the vote schedules across real ranks (mpirun and horovodrun) against a
single-process oracle, the ledger against each schedule's formula, and errors."""
import functools

import numpy as np
import pytest

from conftest import requires_horovod
from harness import launch
from signcomm import kernels as K
from vote_oracle import SEED, STEP, oracle_vote, rank_input

DS = [0, 1, 7, 8, 9, 65, 1_000_003]
CONFIGS = [("v1", "coin", "sign"), ("v1", "zero", "sign"), ("v1", "coin", "sr"), ("v2", "coin", "sr")]
SCHEDULES = ["allgather", "sharded", "allreduce"]

MPI_NS = [1, 2, 3, 4, 5, 8]
HVD_NS = [1, 2, 3, 4, 5, 8]


@functools.lru_cache(maxsize=None)
def cached_oracle(n, d, kind, variant, tie):
    """The oracle does not depend on the schedule: compute it once per configuration."""
    return oracle_vote([rank_input(r, d) for r in range(n)], SEED, STEP, 3, kind, variant, tie)


def check_matrix(job, n):
    for sched in SCHEDULES:
        for variant, tie, kind in CONFIGS:
            for d in DS:
                name = f"{sched}-{variant}-{tie}-{kind}-{d}"
                bits = [job[r][name + "-bits"] for r in range(n)]
                for r in range(1, n):  # identical on every rank
                    np.testing.assert_array_equal(bits[r], bits[0], err_msg=f"{name}: rank {r} differs")
                got = K.Vote(bits[0], job[0].get(name + "-nonzero")).values(d)
                want, c = cached_oracle(n, d, kind, variant, tie)
                if variant == "v1":  # bit for bit
                    np.testing.assert_array_equal(got, want, err_msg=name)
                else:  # v2: the same draw as the oracle, and frequency of +1 = c / n
                    np.testing.assert_array_equal(got, want, err_msg=name)
                    if d == DS[-1]:
                        check_s1_frequency(got, c, n)
                for r in range(n):
                    sent, received, predicted = job[r][name + "-bytes"]
                    assert sent == received == predicted, f"{name} rank {r}: ledger {sent}/{received}, formula {predicted}"


def check_s1_frequency(o, c, n):
    """For each count value, the share of +1 outputs is c / n within 5 binomial sigmas."""
    for cv in np.unique(c):
        sel = c == cv
        m = int(sel.sum())
        if m < 200:
            continue
        p = cv / n
        freq = float((o[sel] > 0).mean())
        sigma = np.sqrt(max(p * (1 - p), 1e-12) / m)
        assert abs(freq - p) <= 5 * sigma + 1e-12, f"c={cv}, n={n}: +1 share {freq:.4f}, expected {p:.4f}"


@pytest.mark.parametrize("n", MPI_NS)
def test_mpi_schedules_equal_oracle(n):
    job = launch("vote_matrix.py", n, args=["mpi", ",".join(map(str, DS))], timeout=240)
    check_matrix(job, n)


@requires_horovod
@pytest.mark.parametrize("n", HVD_NS)
def test_horovod_schedules_equal_oracle(n):
    job = launch("vote_matrix.py", n, launcher="horovodrun", args=["horovod", ",".join(map(str, DS))],
                 timeout=300)
    check_matrix(job, n)


def test_chunked_mpi_messages_equal_oracle():
    """Messages split at 1000 bytes (the path that makes counts >= 2**31 work)."""
    job = launch("vote_matrix.py", 3, args=["mpi", ",".join(map(str, DS)), "--chunked"], timeout=240)
    check_matrix(job, 3)


@pytest.mark.parametrize("launcher,transport", [("mpirun", "mpi"),
                                                pytest.param("horovodrun", "horovod", marks=requires_horovod)])
def test_mismatched_ranks_fail_everywhere(launcher, transport):
    job = launch("vote_errors.py", 3, launcher=launcher, args=[transport], timeout=120)
    for r in range(3):
        for sched in SCHEDULES:
            for case in ("d", "dtype", "layout"):
                msg = str(job[r][f"{case}-{sched}"])
                assert msg.startswith("RankMismatchError") and "disagree" in msg, (r, case, sched, msg)
            msg = str(job[r][f"nan-{sched}"])
            assert msg.startswith("RemoteRankError"), (r, sched, msg)
            assert ("non-finite" in msg) if r == 1 else ("rank 1 failed" in msg), (r, msg)
        msg = str(job[r]["length"])
        assert msg.startswith("RankMismatchError") and "a length check" in msg, (r, msg)
        assert job[r]["after"].shape == (2,)


def test_large_count_allgather_singleton():
    """2**31 + 1 bytes through one allgather: split into messages below the int limit."""
    from signcomm.comm import get_transport
    t = get_transport("mpi")
    buf = np.zeros(2 ** 31 + 1, np.uint8)
    buf[0], buf[2 ** 30 + 5], buf[-1] = 1, 2, 3
    out = t.allgather(buf)
    assert out.shape == (1, buf.size)
    assert (out[0, 0], out[0, 2 ** 30 + 5], out[0, -1]) == (1, 2, 3)
    assert int(out.sum(dtype=np.int64)) == 6


@requires_horovod
def test_subgroups_vote_among_members_only():
    """MPI on a sub-communicator and Horovod on a process set: the even ranks of 3."""
    job = launch("vote_subgroups.py", 3, launcher="horovodrun", timeout=120)
    want, _ = oracle_vote([rank_input(0, 1001), rank_input(2, 1001)], SEED, STEP, 3, "sr", "v1", "coin")
    for r in (0, 2):
        for transport in ("mpi", "horovod"):
            assert int(job[r][f"{transport}-size"]) == 2
            for sched in SCHEDULES:
                got = K.Vote(job[r][f"{transport}-{sched}"]).values(1001)
                np.testing.assert_array_equal(got, want, err_msg=f"{transport} {sched} rank {r}")
