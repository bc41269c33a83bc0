"""Improved precision and recall (Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991),
computed the way the ADM evaluator computes them, so that the same features give the same numbers.

Each set's manifold is the union of balls around its points, a ball's radius being the distance to
that point's k-th nearest neighbour in the same set (the point itself counted as the 0th); k = 3.
Precision is the fraction of samples inside the reference manifold, recall the fraction of
reference points inside the sample manifold. What the evaluator does and this module reproduces
(openai/guided-diffusion ``evaluations/evaluator.py``, ``ManifoldEstimator`` and ``DistanceBlock``):

- Distances are *squared* Euclidean distances, ``max(|u|^2 - 2 u.v + |v|^2, 0)``, computed from
  features cast to **float16**: each square and the matrix product are float16 tensors (summed with
  float32 accumulation, as TF's float16 kernels on a GPU do; I sum exactly in float64 and round to
  float32, then float16), and the two additions are float16 operations in that order. The result
  is not symmetric in (u, v), so the orientation follows the evaluator: rows are the set whose
  radii are estimated, and reference rows against sample columns for precision/recall.
- When any distance of a block comes out non-finite in float16, the whole block is recomputed in
  float32. Blocks are the evaluator's: 10,000 rows by 10,000 columns (computed here in row chunks
  to bound memory; the float32 fallback is still decided per 10,000 x 10,000 block).
- A point is inside a ball when its distance is ``<=`` the radius, both in float32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

K = 3  # nhood_sizes=(3,) in the ADM evaluator
EVAL_BLOCK = 10_000  # the evaluator's row_batch_size and col_batch_size
CHUNK = 1024  # rows computed at once inside a block: 1024 x 10,000 float64 is 80 MB


def _as_float32(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """Features as the evaluator holds them: float32, (N, D)."""
    t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(t.shape)}")
    return t


def _squares_summed_half(x16: torch.Tensor) -> torch.Tensor:
    """reduce_sum(square(x)) of a float16 (B, D): each square rounded to float16, sum to float16. (B,)"""
    squares = (x16.float() ** 2).half()  # exact in float32, then rounded as a float16 tensor
    return squares.double().sum(dim=1).float().half()


def half_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The evaluator's float16 squared distances (B, M) of rows u (B, D) to v (M, D), as float32;
    None when any of them is not finite (the evaluator then falls back to float32)."""
    u16, v16 = u.half(), v.half()
    prod = (u16.double() @ v16.double().T).float().half()  # (B, M) float16 tensor
    d = (_squares_summed_half(u16)[:, None] - 2 * prod) + _squares_summed_half(v16)[None, :]
    d = d.clamp_min(0)  # float16 arithmetic: torch rounds every op on half tensors to float16
    return d.float() if bool(torch.isfinite(d).all()) else None


def float_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The evaluator's float32 fallback: the same formula in float32. (B, M)"""
    return ((u**2).sum(1)[:, None] - 2 * (u @ v.T) + (v**2).sum(1)[None, :]).clamp_min(0)


def _over_block(u: torch.Tensor, v: torch.Tensor, reduce: Callable[[torch.Tensor, slice], object]) -> list:
    """``reduce(distances, rows)`` over row chunks of one evaluator block (u against v), in float16
    unless any chunk of the block is non-finite, then all of it in float32."""
    chunks = [slice(s, min(s + CHUNK, len(u))) for s in range(0, len(u), CHUNK)]
    out = []
    for rows in chunks:
        d = half_distances(u[rows], v)
        if d is None:
            return [reduce(float_distances(u[r], v), r) for r in chunks]
        out.append(reduce(d, rows))
    return out


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(s + EVAL_BLOCK, n)) for s in range(0, n, EVAL_BLOCK)]


def knn_radii(feats: np.ndarray | torch.Tensor, k: int = K, device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the set (the point itself
    is the 0th), as the evaluator's ``manifold_radii``: float32 (N,)."""
    x = _as_float32(feats, device)  # (N, D)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for rows in _blocks(len(x)):
        # the k+1 smallest of each column block, then the (k+1)-th smallest of their union
        smallest = [torch.cat(_over_block(x[rows], x[cols], lambda d, _: d.topk(min(k + 1, d.shape[1]), dim=1,
                                                                              largest=False).values))
                    for cols in _blocks(len(x))]  # each (R, <= k+1)
        radii[rows] = torch.cat(smallest, dim=1).kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(reference: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = K,
                     device: str | torch.device = "cpu",
                     reference_radii: np.ndarray | torch.Tensor | None = None) -> tuple[float, float]:
    """Improved (precision, recall) of ``samples`` (N, D) against ``reference`` (M, D), as the
    evaluator's ``compute_prec_recall``. ``reference_radii`` (M,) skips recomputing ``knn_radii``
    of the reference (the costly part at M = 10,000)."""
    ref, smp = _as_float32(reference, device), _as_float32(samples, device)  # (M, D), (N, D)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"reference and sample features differ in dimension: {ref.shape[1]} vs {smp.shape[1]}")
    if reference_radii is None:
        ref_radii = knn_radii(ref, k, device)
    else:
        ref_radii = _as_float32(np.asarray(reference_radii).reshape(-1, 1), device)[:, 0]
        if len(ref_radii) != len(ref):
            raise ValueError(f"{len(ref_radii)} reference radii for {len(ref)} reference points")
    smp_radii = knn_radii(smp, k, device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # inside some sample ball: recall
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)  # inside some reference ball: precision
    for a in _blocks(len(ref)):
        for b in _blocks(len(smp)):

            def inside(d: torch.Tensor, rows: slice, a=a, b=b):  # d: (rows of block a, columns of block b)
                return rows, (d <= smp_radii[b][None, :]).any(dim=1), (d <= ref_radii[a][rows][:, None]).any(dim=0)

            for rows, ref_hit, smp_hit in _over_block(ref[a], smp[b], inside):
                ref_in[a][rows] |= ref_hit
                smp_in[b] |= smp_hit
    return float(smp_in.double().mean()), float(ref_in.double().mean())
