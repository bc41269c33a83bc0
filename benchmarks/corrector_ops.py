"""Corrector element-wise work per reused feature, before and after issue 15, interleaved in one process.

"old" is the code as it was (GOC: ``q0 + w * (q0 - q1)``, three new tensors; EOC: the trend
``P[t] - P[s]`` and ``1 + gamma T`` made at every call, then the product), "new" is the code now (GOC:
one new tensor updated in place; EOC: the factor made once per (site, step, since), one product).
Both include the engine's ``FiniteWatch.note`` sum of the corrected feature. Results are asserted
bit-identical before timing. Shapes: the default model at batch 128 with CFG (256 x 49 x 128) and
DiT-XL/2 at batch 2 (2 x 256 x 1152). One thread, median of 200 interleaved calls.

    PYTHONPATH=src nice python benchmarks/corrector_ops.py
"""

import statistics
import time

import torch

from ditcache.correctors.eoc import apply_factor, trend_factor
from ditcache.finite import FiniteWatch

W, GAMMA = 1.2, 0.01


def goc_old(q0, q1, watch):
    out = q0 + W * (q0 - q1)
    watch.note("s", "goc", out)
    return out


def goc_new(q0, q1, watch):
    out = torch.sub(q0, q1)
    out.mul_(W)
    out.add_(q0)
    watch.note("s", "goc", out)
    return out


def eoc_old(cached, p_t, p_s, watch):
    halves = p_t.shape[0]
    x = cached.reshape(halves, -1, *cached.shape[1:]).float()  # (H, B, N, C)
    trend = (p_t - p_s).unsqueeze(1)  # (H, 1, N, C)
    out = (x * (1 + GAMMA * trend)).reshape(cached.shape)
    watch.note("s", "eoc", out)
    return out


def eoc_new(cached, factor, watch):
    out = apply_factor(cached, factor, "mul")
    watch.note("s", "eoc", out)
    return out


def main() -> None:
    torch.set_num_threads(1)
    for label, rows, tokens, channels in [("default model, batch 256", 256, 49, 128), ("DiT-XL/2, batch 2", 2, 256, 1152)]:
        g = torch.Generator().manual_seed(0)
        q0, q1 = torch.randn(rows, tokens, channels, generator=g), torch.randn(rows, tokens, channels, generator=g)
        p_t, p_s = torch.randn(2, tokens, channels, generator=g), torch.randn(2, tokens, channels, generator=g)
        factor = trend_factor(p_t - p_s, GAMMA, "mul")
        watch = FiniteWatch()
        assert torch.equal(goc_old(q0, q1, watch), goc_new(q0, q1, watch))
        assert torch.equal(eoc_old(q0, p_t, p_s, watch), eoc_new(q0, factor, watch))
        calls = {"goc old": lambda: goc_old(q0, q1, watch), "goc new": lambda: goc_new(q0, q1, watch),
                 "eoc old": lambda: eoc_old(q0, p_t, p_s, watch), "eoc new": lambda: eoc_new(q0, factor, watch)}
        times = {k: [] for k in calls}
        for _ in range(200):
            for k, fn in calls.items():
                watch.clear()
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
        print(label + ": " + ", ".join(f"{k} {statistics.median(v) * 1e6:.0f} us" for k, v in times.items()))


if __name__ == "__main__":
    main()
