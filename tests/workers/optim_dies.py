"""A rank that dies mid-training.  argv: transport, how ("kill": SIGKILL itself, "raise":
an uncaught exception), a file where the dying rank writes the time it died.  The other
ranks keep stepping (they block in the next vote); the launcher must end the job."""
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)
transport_name, how, stamp = sys.argv[1], sys.argv[2], sys.argv[3]
if transport_name == "horovod":
    import horovod.torch as hvd
    hvd.init()

import signcomm  # noqa: E402

model = torch.nn.Linear(64, 64)
opt = signcomm.create_optimizer("mvsm-v1", model.parameters(), lr=1e-3, transport=transport_name)
rank = opt.transport.rank
for step in range(200):
    model.zero_grad()
    model(torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * rank + step))).pow(2).mean().backward()
    if rank == 1 and step == 5:
        with open(stamp + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(stamp + ".tmp", stamp)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"rank 1 gives up at step {step}")
    opt.step()
print(f"rank {rank} finished all steps", flush=True)
