"""Smoke test of benchmarks/comm_bench.py: 2 ranks under mpirun, a tiny d, one repeat.

Checks the JSON records' fields and that the ledger's bytes equal each schedule's
predicted bytes (and docs/algorithms.md's formulas).  MPI transport only, to stay light:
importing horovod.torch alone takes several seconds per rank; the Horovod ledger is
covered by test_vote.py."""
import json
import math

from harness import ROOT, launch

BENCH = ROOT / "benchmarks" / "comm_bench.py"
N, D = 2, 1001  # d not a multiple of 8 or of n * 8: padding and uneven shards

FIELDS = ("schedule", "transport", "variant", "n", "d", "seconds", "bytes_sent",
          "bytes_received", "fp32_allreduce_seconds", "fp32_allreduce_bytes")


def formula_bytes(schedule, n, d):
    """docs/algorithms.md's table, per rank and direction, as signcomm/vote.py rounds it."""
    nbytes = -(-d // 8)
    if schedule == "allgather":
        return (n - 1) * nbytes
    if schedule == "sharded":
        return 2 * (n - 1) * -(-nbytes // n)
    b = math.ceil(math.log2(n + 1))
    words = -(-d // (63 // b))
    return 2 * (n - 1) * 8 * words // n


def test_comm_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    job = launch(BENCH, N, args=["--d", str(D), "--repeat", "1", "--warmup", "0",
                                 "--transports", "mpi", "--json", out],
                 timeout=120, need_results=False)
    data = json.loads(out.read_text())
    records = data["records"]
    votes = [r for r in records if r["kind"] == "vote"]
    assert {(r["schedule"], r["variant"]) for r in votes} == {
        (s, v) for s in ("allgather", "sharded", "allreduce") for v in ("v1", "v2")}
    fp32_bytes = 2 * (N - 1) * 4 * D // N
    for r in records:
        for f in FIELDS:
            assert f in r, (f, r)
        assert r["n"] == N and r["d"] == D and r["transport"] == "mpi"
        assert r["seconds"] > 0 and r["fp32_allreduce_seconds"] > 0
        assert r["fp32_allreduce_bytes"] == fp32_bytes
        assert len(r["all_seconds"]) == 1
    for r in votes:
        assert r["bytes_sent"] == r["bytes_received"] == r["predicted_bytes"], r
        assert r["predicted_bytes"] == formula_bytes(r["schedule"], N, D), r
        assert r["bytes_match_predicted"] and r["bytes_equal_on_all_ranks"], r
        assert r["vote_identical_on_all_ranks"], r
        assert r["time_ratio_vs_fp32"] == r["seconds"] / r["fp32_allreduce_seconds"]
    base = [r for r in records if r["kind"] == "baseline"]
    assert [(r["schedule"], r["bytes_sent"]) for r in base] == [("fp32_allreduce", fp32_bytes)]
    # the table and the target checks are printed on rank 0 only
    assert job.output.count("PASS sharded") == 1
    assert "PASS allgather" in job.output and "FAIL" not in job.output
    assert "ledger bytes == schedule.predicted_bytes(d) on every rank for 6/6" in job.output
