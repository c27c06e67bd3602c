"""Runs mpi_examples/train.py's main() with this script's arguments on every rank and
saves each run's final parameters (flat, float32) and summary figures for the test."""
import sys

import numpy as np
import torch

from harness import ROOT, save_result

sys.path.insert(0, str(ROOT))
from mpi_examples import train  # noqa: E402

results = train.main(sys.argv[1:])
out = {}
for i, r in enumerate(results):
    out[f"params_{i}"] = torch.cat([p.detach().reshape(-1) for p in r.model.parameters()]).numpy()
    out[f"test_acc_{i}"] = r.summary["final_test_acc"]
    out[f"train_loss_{i}"] = r.summary["final_train_loss"]
save_result(run_ids=np.array([r.config.run_id() for r in results]), **out)
