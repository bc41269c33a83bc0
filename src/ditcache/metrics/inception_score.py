"""Inception Score (Salimans et al. 2016, https://arxiv.org/abs/1606.03498) from class probabilities.

Two entry points. ``inception_score`` takes any classifier's probabilities (the MNIST digit
classifier's score is reported as ``is_classifier``, never as IS). ``evaluator_inception_score``
is the ADM evaluator's IS (``compute_inception_score``): softmax of pool_3 features times the TF
graph's ``softmax/logits/MatMul`` weight (1008 classes, *no bias*), in consecutive splits of 5,000
samples, the mean of exp(mean KL) over splits. The FID weights lack that matrix; ``load_logits_weights``
reads it from a file the user supplies (e.g. ``fc.weight`` of torch-fidelity's / pytorch-fid's
``pt_inception-2015-12-05`` checkpoint, a port of the same graph).

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean prediction of the split. The samples are cut
into splits and the score is reported as mean and standard deviation over splits. The ADM evaluator
uses splits of 5000 images, i.e. 10 splits for its 50k samples; the default here is 10 splits.
The function only needs probabilities, so any classifier can supply them (the FID Inception network
has no logits layer; see ``classifier.py`` for the MNIST digit classifier).
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr, softmax

NUM_SPLITS = 10
SPLIT_SIZE = 5000  # the evaluator's split_size
POOL_DIM, NUM_LOGITS = 2048, 1008  # the TF Inception graph's pool_3 and softmax/logits widths


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


def load_logits_weights(path: str) -> np.ndarray:
    """The (2048, 1008) logits matrix from a .npy, or from a torch checkpoint holding ``fc.weight``
    (1008, 2048) as pytorch-fid's and torch-fidelity's Inception weights do."""
    if str(path).endswith(".npy"):
        w = np.load(path)
    else:
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        keys = [k for k in state if k.endswith("fc.weight")]
        if len(keys) != 1:
            raise ValueError(f"{path}: expected one '*fc.weight' tensor (the Inception logits), found {keys}")
        w = state[keys[0]].double().numpy()
    w = np.asarray(w, np.float64)
    if w.shape == (NUM_LOGITS, POOL_DIM):
        w = w.T
    if w.shape != (POOL_DIM, NUM_LOGITS):
        raise ValueError(f"{path}: Inception logits weights must be ({POOL_DIM}, {NUM_LOGITS}) or transposed, "
                         f"got {w.shape}")
    return w


def evaluator_inception_score(pool: np.ndarray, weights: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """The ADM evaluator's IS of pool_3 features (N, 2048) with logits weights (2048, 1008)."""
    pool = np.asarray(pool, np.float64)
    if pool.ndim != 2 or pool.shape[1] != weights.shape[0] or len(pool) == 0:
        raise ValueError(f"need pool features (N > 0, {weights.shape[0]}), got {pool.shape}")
    probs = softmax(pool @ weights, axis=1)  # (N, 1008)
    scores = []
    for start in range(0, len(probs), split_size):  # consecutive splits; the last may be short
        part = probs[start:start + split_size]
        scores.append(np.exp(rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()))
    return float(np.mean(scores))
