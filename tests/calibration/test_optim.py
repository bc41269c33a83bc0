"""Signum: every parameter moves by exactly lr in the direction of its (averaged) gradient's sign."""

import pytest
import torch

from ditcache.calibration.optim import Signum


def test_sign_step_ignores_the_gradient_size_and_skips_parameters_without_one():
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    b = torch.nn.Parameter(torch.tensor([2.0]))
    opt = Signum([a, b], lr=0.25, momentum=0.0)
    a.grad = torch.tensor([1e-12, -1e6, 0.0, 3.0])  # twelve orders of magnitude apart: the same move
    opt.step()
    assert a.detach().tolist() == [0.75, 1.25, 1.0, 0.75] and b.item() == 2.0


def test_momentum_averages_before_taking_the_sign():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = Signum([p], lr=1.0, momentum=0.5)
    path = []
    for g in (4.0, -1.0, -1.0, -1.0):  # m = 2, 0.5, -0.25, -0.625: the sign flips only at the third
        p.grad = torch.tensor([g])
        opt.step()
        path.append(p.item())
    assert path == [-1.0, -2.0, -1.0, 0.0]
    with pytest.raises(ValueError):
        Signum([p], lr=0.0)
