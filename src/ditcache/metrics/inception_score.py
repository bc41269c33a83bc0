"""Inception Score (Salimans et al. 2016, https://arxiv.org/abs/1606.03498) from class probabilities.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean prediction of the split. The samples are cut
into splits and the score is reported as mean and standard deviation over splits. The ADM evaluator
uses splits of 5000 images, i.e. 10 splits for its 50k samples; the default here is 10 splits.
The function only needs probabilities, so any classifier can supply them (the FID Inception network
has no logits layer; see ``classifier.py`` for the MNIST digit classifier).
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

NUM_SPLITS = 10


def inception_score(probs: np.ndarray, num_splits: int = NUM_SPLITS) -> tuple[float, float]:
    """(mean, std) over splits of exp(mean KL(p(y|x) || p(y))) for class probabilities (N, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < num_splits or num_splits < 1:
        raise ValueError(f"need probabilities (N >= num_splits={num_splits}, C), got {probs.shape}")
    scores = []
    for part in np.array_split(probs, num_splits):  # (n, C) each
        marginal = part.mean(axis=0, keepdims=True)  # (1, C)
        kl = rel_entr(part, marginal).sum(axis=1)  # (n,); 0 * log 0 counts as 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
