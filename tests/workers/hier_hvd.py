"""The hierarchical vote over Horovod (dynamic process sets), 4 ranks under horovodrun
(tests/test_hierarchy.py): MVSM on 2 machines x 2 ranks and on the host (Horovod's node:
one machine of 4 here)."""
import torch

import horovod.torch as hvd
import hier_problem as P
from harness import save_result

torch.set_num_threads(1)
hvd.init()
rank = hvd.rank()
out = {}
for tag, method, schedule, layout in (
        ("2x2-mvsm-v2-sharded", "mvsm-v2", "sharded", dict(ranks_per_node=2)),
        ("host-mvsm-v1-allreduce", "mvsm-v1", "allreduce", dict(hierarchy="host"))):
    out[tag], opt, _ = P.train(method, schedule, lambda p, t: P.rank_grads(p, rank, t),
                               transport="horovod", **layout)
    out[f"layout-{tag}"] = [opt.hierarchy.machines, opt.hierarchy.k]
save_result(**out)
