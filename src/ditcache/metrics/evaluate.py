"""Quality of generated samples against data: FID, sFID, precision/recall and, on MNIST, class metrics.

Inception features of the samples are extracted once and shared by every metric, following the
ADM evaluator's protocol (see ``inception.py`` for the network and its preprocessing,
``precision_recall.py`` for its float16 manifold arithmetic). FID comes with a bootstrap interval
over the samples (``bootstrap.py``).

Inception Score: the FID Inception weights end at pool_3 and carry no logits layer, so IS is
reported only when the caller supplies the TF graph's logits matrix (``logits_weights``; see
``inception_score.py``), and then exactly as the evaluator computes it; otherwise no number
labelled IS is reported. On the MNIST reference a small digit classifier stands in: its score is
``is_classifier``, which is not the Inception Score and must not be compared with one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ditcache.metrics.bootstrap import REPLICATES, FIDBootstrap
from ditcache.metrics.fid import features_to_stats, frechet_distance
from ditcache.metrics.inception import InceptionExtractor, to_nhwc_rgb
from ditcache.metrics.inception_score import NUM_SPLITS, evaluator_inception_score, inception_score
from ditcache.metrics.precision_recall import K, precision_recall
from ditcache.metrics.reference import get_reference, read_npz, read_png_folder

CLASSIFIER_REFERENCES = ("mnist",)  # references whose classes the digit classifier knows


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read samples: an ADM-format ``.npz`` (uint8 NHWC under ``arr_0``; labels under ``labels``,
    or ``arr_1`` as ADM's sampling script writes them) or a folder of PNGs (no labels).

    Returns ``(images (N, H, W, C) uint8, labels (N,) int64 or None)``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.is_dir():
        return read_png_folder(path), None
    if path.suffix != ".npz":
        raise ValueError(f"samples must be an .npz (arr_0) or a folder of PNGs, got {path}")
    arrays = read_npz(path)
    if "arr_0" not in arrays:
        raise ValueError(f"{path} holds no images under 'arr_0' (keys: {sorted(arrays)})")
    images = arrays["arr_0"]
    images = images[..., None] if images.ndim == 3 else images  # (N, H, W, C)
    labels = arrays.get("labels", arrays.get("arr_1"))
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def evaluate(samples: np.ndarray, labels: np.ndarray | None = None, reference: str = "mnist",
             extractor: InceptionExtractor | None = None, classifier=None,
             cache_dir: str | os.PathLike | None = None, reference_limit: int | None = None,
             progress: bool = False, bootstrap: int = REPLICATES, logits_weights: np.ndarray | None = None) -> dict:
    """Every data metric of uint8 samples (N, H, W[, C]) against a reference, as a flat dict.

    Keys: fid, fid_ci_low, fid_ci_high (95% bootstrap interval over the samples, ``bootstrap``
    replicates; None when 0), sfid, precision, recall (k = 3), num_samples, num_reference,
    reference, reference_stats ("precomputed" or "computed"), preprocessing, bootstrap; with
    ``logits_weights`` (2048, 1008) inception_score (the evaluator's IS); and on the MNIST reference
    is_classifier, is_classifier_std and (when ``labels`` are given) class_accuracy.
    """
    return evaluate_with_features(samples, labels, reference, extractor, classifier, cache_dir,
                                  reference_limit, progress, bootstrap, logits_weights)[0]


def metrics_from_features(feats: dict, ref, bootstrap: int = REPLICATES, device: str = "cpu") -> tuple[dict, np.ndarray | None]:
    """FID (with its bootstrap interval and replicates), sFID, precision and recall of sample features
    {"pool" (N, 2048), "spatial" (N, D_s)} against a loaded reference: the metrics that need no images."""
    mu, sigma = features_to_stats(feats["pool"])
    mu_s, sigma_s = features_to_stats(feats["spatial"])
    result = {
        "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
        "fid_ci_low": None,
        "fid_ci_high": None,
        "sfid": frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s),
        "precision": None,
        "recall": None,
        "num_samples": len(feats["pool"]),
        "num_reference": ref.num_images,
        "reference": ref.name,
        "reference_stats": "precomputed" if ref.precomputed else "computed",
        "bootstrap": bootstrap,
    }
    # the FID's sampling uncertainty: resample the samples, the reference stays fixed
    replicates = None
    if bootstrap:
        interval, replicates = FIDBootstrap(ref.mu, ref.sigma, bootstrap).interval(feats["pool"], result["fid"])
        result["fid_ci_low"], result["fid_ci_high"] = interval.low, interval.high
    # precision/recall need reference images, which a statistics-only reference lacks
    if ref.pool is not None and len(ref.pool) > K:
        result["precision"], result["recall"] = precision_recall(ref.pool, feats["pool"], device=device,
                                                                 reference_radii=ref.pool_radii)
    return result, replicates


def evaluate_with_features(samples: np.ndarray, labels: np.ndarray | None = None, reference: str = "mnist",
                           extractor: InceptionExtractor | None = None, classifier=None,
                           cache_dir: str | os.PathLike | None = None, reference_limit: int | None = None,
                           progress: bool = False, bootstrap: int = REPLICATES,
                           logits_weights: np.ndarray | None = None) -> tuple[dict, dict, np.ndarray | None]:
    """``evaluate``, also returning the features {"pool", "spatial"} and the FID bootstrap replicates
    (R,) (None when ``bootstrap`` is 0), for paired comparisons of runs from the same noise."""
    samples = to_nhwc_rgb(samples)  # checks dtype and shape
    if len(samples) <= K:
        raise ValueError(f"need more than {K} samples for FID and precision/recall, got {len(samples)}")
    if labels is not None and len(labels) != len(samples):
        raise ValueError(f"{len(labels)} labels for {len(samples)} samples")
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap replicates must be 0 (off) or at least 2, got {bootstrap}")
    extractor = extractor if extractor is not None else InceptionExtractor()
    ref = get_reference(reference, extractor, cache_dir, reference_limit, progress)

    # 1. features once, shared by every metric (FID with its interval, sFID, precision, recall)
    feats = extractor.features(samples, progress=progress)
    result, replicates = metrics_from_features(feats, ref, bootstrap, device=getattr(extractor, "device", "cpu"))
    result["preprocessing"] = extractor.preprocessing_key
    # 2. the evaluator's Inception Score, only from the real logits matrix
    if logits_weights is not None:
        result["inception_score"] = evaluator_inception_score(feats["pool"], logits_weights)
    # 3. class metrics where the digit classifier applies
    if reference in CLASSIFIER_REFERENCES:
        from ditcache.metrics.classifier import classifier_probs, load_classifier

        classifier = classifier if classifier is not None else load_classifier()
        probs = classifier_probs(samples, classifier)  # (N, 10)
        result["is_classifier"], result["is_classifier_std"] = inception_score(probs, min(NUM_SPLITS, len(probs)))
        if labels is not None:
            result["class_accuracy"] = float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))
    return result, feats, replicates
