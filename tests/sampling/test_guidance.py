"""Classifier-free guidance wrapper: batch doubling, half order, partial-channel guidance."""

import math

import pytest
import torch

from ditcache.sampling.guidance import cfg_model_fn

NULL = 1000


class LabelModel:
    """A model whose output channel c is (y + 1) * (c + 1) + x.mean(); records every call."""

    def __init__(self, out_channels=8):
        self.out_channels, self.calls = out_channels, []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        scale = torch.arange(1, self.out_channels + 1, dtype=x.dtype).view(1, -1, 1, 1)
        value = (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * scale + x.mean()  # (B, C_out, 1, 1)
        return value.expand(-1, -1, *x.shape[2:]).clone()  # (B, C_out, H, W)


def _inputs():
    return torch.randn(2, 4, 3, 3), torch.tensor([999, 999]), torch.tensor([3, 7])


def test_one_doubled_call_conditional_half_first():
    model = LabelModel()
    x, t, y = _inputs()
    cfg_model_fn(model, 4.0, NULL, guided_channels=3)(x, t, y)
    assert len(model.calls) == 1
    seen_x, seen_t, seen_y = model.calls[0]
    assert torch.equal(seen_x, torch.cat([x, x])) and torch.equal(seen_t, torch.cat([t, t]))
    assert seen_y.tolist() == [3, 7, NULL, NULL]


def test_three_guided_channels_rest_is_conditional():
    model = LabelModel()
    x, t, y = _inputs()
    out = cfg_model_fn(model, 4.0, NULL, guided_channels=3, in_channels=4)(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])  # eps channel 3 and all variance channels


def test_all_eps_channels_guided_by_default():
    model = LabelModel()
    x, t, y = _inputs()
    out = cfg_model_fn(model, 1.5, NULL)(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])


def test_scale_zero_is_unconditional_on_guided_channels():
    model = LabelModel()
    x, t, y = _inputs()
    out = cfg_model_fn(model, 0.0, NULL)(x, t, y)
    assert torch.equal(out[:, :4], model(x, t, torch.full_like(y, NULL))[:, :4])


def test_scale_one_is_a_single_plain_call():
    model = LabelModel()
    x, t, y = _inputs()
    out = cfg_model_fn(model, 1.0, NULL, guided_channels=3)(x, t, y)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 2
    assert model.calls[0][2].tolist() == [3, 7]
    assert torch.equal(out, model(x, t, y))


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, "big"])
def test_bad_scales_are_rejected(bad):
    with pytest.raises(ValueError, match="cfg_scale"):
        cfg_model_fn(LabelModel(), bad, NULL)


def test_too_many_guided_channels_are_rejected():
    with pytest.raises(ValueError, match="guided_channels"):
        cfg_model_fn(LabelModel(), 4.0, NULL, guided_channels=5, in_channels=4)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="guided_channels"):
        cfg_model_fn(LabelModel(), 4.0, NULL, guided_channels=5)(x, t, y)
