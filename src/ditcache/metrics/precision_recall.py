"""Improved precision and recall (Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991).

Each set's manifold is the union of balls around its points, the radius of a ball being the
distance to that point's k-th nearest neighbour in the same set (itself excluded); k = 3 as in the
ADM evaluator. Precision is the fraction of samples inside the reference manifold, recall the
fraction of reference points inside the sample manifold. Distances are computed in float64 row
blocks with ``torch.cdist`` so that 10k x 10k (or 50k x 10k) never needs one full matrix.
"""

from __future__ import annotations

import numpy as np
import torch

K = 3  # nhood_sizes=(3,) in the ADM evaluator
BLOCK = 1024  # rows per distance block: 1024 x 10k float64 is 80 MB


def _as_tensor(x: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float64, device=device)


def knn_radii(feats: np.ndarray | torch.Tensor, k: int = K, block: int = BLOCK,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Distance from each point (N, D) to its k-th nearest neighbour in the set, self excluded: (N,)."""
    x = _as_tensor(feats, device)  # (N, D)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points to estimate a manifold, got {len(x)}")
    radii = []
    for start in range(0, len(x), block):
        d = torch.cdist(x[start:start + block], x)  # (B, N)
        # the k+1 smallest include the point itself at distance 0, so index k is the k-th neighbour
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # (B,)
    return torch.cat(radii)


def manifold_coverage(points: np.ndarray | torch.Tensor, manifold: np.ndarray | torch.Tensor,
                      radii: torch.Tensor, block: int = BLOCK, device: str | torch.device = "cpu") -> float:
    """Fraction of ``points`` (N, D) inside at least one ball (``manifold`` (M, D), ``radii`` (M,))."""
    p, m = _as_tensor(points, device), _as_tensor(manifold, device)
    radii = radii.to(device=device, dtype=torch.float64)
    inside = 0
    for start in range(0, len(p), block):
        d = torch.cdist(p[start:start + block], m)  # (B, M)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(p)


def precision_recall(reference: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor, k: int = K,
                     block: int = BLOCK, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved (precision, recall) of ``samples`` (N, D) against ``reference`` (M, D)."""
    ref_radii = knn_radii(reference, k, block, device)  # (M,)
    sample_radii = knn_radii(samples, k, block, device)  # (N,)
    precision = manifold_coverage(samples, reference, ref_radii, block, device)
    recall = manifold_coverage(reference, samples, sample_radii, block, device)
    return precision, recall
