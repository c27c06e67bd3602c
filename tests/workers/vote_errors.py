"""Ranks that disagree or fail: every rank must get a clear error, none may hang."""
import sys

import numpy as np

from harness import save_result

transport_name = sys.argv[1]
if transport_name == "horovod":
    import horovod.torch as hvd
    hvd.init()

from signcomm.comm import RankMismatchError, RemoteRankError, get_transport  # noqa: E402
from signcomm.vote import SignVote  # noqa: E402

t = get_transport(transport_name)
r = t.rank
cases = {
    "d": lambda: (np.ones(100 + (r == 1), np.float32), None),
    "dtype": lambda: (np.ones(100, np.float64 if r == 1 else np.float32), None),
    "layout": lambda: (np.ones(100, np.float32), [50, 50] if r == 1 else [40, 60]),
    "nan": lambda: (np.where(np.arange(100) == 7, np.nan if r == 1 else 1.0, 1.0).astype(np.float32), None),
}
messages = {}
for name, make in cases.items():
    for sched in ("allgather", "sharded", "allreduce"):
        v, seg = make()
        sv = SignVote(t, schedule=sched, R="global" if seg is not None else None)
        try:
            sv(v, 0, seg_sizes=seg)
            messages[f"{name}-{sched}"] = "no error"
        except (RankMismatchError, RemoteRankError) as exc:
            messages[f"{name}-{sched}"] = f"{type(exc).__name__}: {exc}"
# signatures of different lengths (e.g. a rank with one more tensor) still agree to disagree
try:
    t.agree(tuple(range(3 + (r == 1))), what="a length check")
    messages["length"] = "no error"
except RankMismatchError as exc:
    messages["length"] = f"{type(exc).__name__}: {exc}"
# the transport still works after all those errors
ok = SignVote(t)(np.ones(10, np.float32), 1).bits
save_result(after=ok, **messages)
