"""Single-node sign methods (no communication): signSGD (eq. 3) and Signum
(Algorithm 1, eqs. 4-5)."""
from __future__ import annotations

import torch

from .common import check_beta, check_group, check_lr


class Signum(torch.optim.Optimizer):
    """Signum, Algorithm 1: ``v_1 = g_1``, ``v_t = (1 - beta) v_{t-1} + beta g_t``,
    ``x <- x - lr * sign(v_t)`` (and decoupled weight decay ``x <- x - lr*wd*x``).

    ``beta`` is the weight of the NEW gradient (the paper's convention: ``beta = 1`` is
    signSGD; PyTorch-style momentum ``mu`` is ``1 - beta``).  ``sign(0) = 0``: an exactly
    zero coordinate does not move."""

    def __init__(self, params, lr, beta: float = 0.1, weight_decay: float = 0.0):
        check_lr(lr)
        check_beta(beta)
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))

    def add_param_group(self, param_group):
        check_group(param_group, self.defaults)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if "momentum_buffer" not in state:  # v_1 = g_1
                    state["momentum_buffer"] = g.clone()
                    state["step"] = torch.tensor(0, dtype=torch.int64)
                elif beta != 1.0:
                    state["momentum_buffer"].mul_(1 - beta).add_(g, alpha=beta)
                else:
                    state["momentum_buffer"].copy_(g)
                state["step"] += 1
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(state["momentum_buffer"]).to(p.dtype), alpha=-lr)
        return loss


class SignSGD(Signum):
    """signSGD, eq. (3): ``x <- x - lr * sign(g)`` (Signum with ``beta = 1``)."""

    def __init__(self, params, lr, weight_decay: float = 0.0):
        super().__init__(params, lr, beta=1.0, weight_decay=weight_decay)
