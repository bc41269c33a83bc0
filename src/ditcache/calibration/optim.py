"""Signum: sign descent with momentum (Bernstein et al. 2018, https://arxiv.org/abs/1802.04434).

Why the router needs it (docs/results.md, "Learning-to-Cache"): a router logit's gradient is the
reuse error's pull up minus the sparsity term's pull down, and both shrink in proportion to β as
β → 0. Their *sign* says which side of its fixed point a logit is on, but their size spans many
orders of magnitude across steps and over training (on the default model, 1e-11 at step 1 to 1e-2
at the last step). AdamW divides by a long memory of past gradient sizes plus eps = 1e-8, so
logits whose gradients shrink, or start below eps, stop moving long before their fixed point.
Signum moves every logit by the learning rate towards the sign of its averaged gradient, whatever
the size.
"""

from __future__ import annotations

import torch


class Signum(torch.optim.Optimizer):
    """p ← p − lr · sign(m),  m ← momentum · m + (1 − momentum) · grad.  Parameters with no grad are left alone."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9):
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"signum needs lr > 0 and momentum in [0, 1), got {lr} and {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(torch.sign(m), alpha=-group["lr"])
        return loss
