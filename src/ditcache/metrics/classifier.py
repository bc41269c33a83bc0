"""A small CNN digit classifier for 28x28 MNIST: class accuracy and an Inception-free IS on MNIST.

The shipped weights (``assets/mnist_classifier.safetensors``, model card beside them) were trained
on 9,000 images of the MNIST test split and checked on the other 1,000 (``split_indices``), with

    python -m ditcache.metrics.classifier --train
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..atomic import write_atomic

WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"
SIDE = 28
NUM_CLASSES = 10
HELD_OUT = 1000  # images of the test split kept out of training to measure accuracy
EPOCHS = 12  # 99.2% held-out; about 15 s an epoch on two idle CPU threads (see the model card)
BATCH = 64
LR = 3e-3
SHIFT = 2  # random translation of up to 2 pixels: the augmentation that matters for digits


class DigitClassifier(nn.Module):
    """Three conv stages (32, 64, 128 channels) with batch norm and max pooling, then a linear head."""

    def __init__(self):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(
            stage(1, 32), nn.MaxPool2d(2),  # (N, 32, 14, 14)
            stage(32, 64), nn.MaxPool2d(2),  # (N, 64, 7, 7)
            stage(64, 128), nn.MaxPool2d(2),  # (N, 128, 3, 3)
        )
        # I flatten rather than average-pool: where a stroke sits matters for digits (4 vs 9)
        self.head = nn.Linear(128 * 3 * 3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) for images (N, 1, 28, 28) scaled to [-1, 1]."""
        h = self.features(x).flatten(1)  # (N, 1152)
        return self.head(F.dropout(h, 0.2, self.training))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float (N, 1, 28, 28) in [-1, 1]: channels averaged, resized if needed."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.ndim == 4:
        x = x.mean(dim=-1)  # (N, H, W): RGB samples of a gray dataset become gray again
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got {tuple(x.shape)}")
    x = x[:, None] / 127.5 - 1.0  # (N, 1, H, W)
    if x.shape[-2:] != (SIDE, SIDE):
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
    return x


def split_indices(n: int, held_out: int = HELD_OUT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed permutation of range(n) cut into (train, held-out) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[held_out:]), np.sort(perm[:held_out])


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to SHIFT pixels (zero fill): (N, 1, 28, 28)."""
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)  # (N, 1, 32, 32), background is -1
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, len(x)), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + SIDE, dx[i]:dx[i] + SIDE] for i in range(len(x))])


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = EPOCHS, seed: int = 0,
                     log: bool = False) -> DigitClassifier:
    """Train a DigitClassifier from scratch; same data, seed and thread count give the same weights."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    x, y = to_input(images), torch.as_tensor(labels, dtype=torch.long)  # (N, 1, 28, 28), (N,)
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            print(f"epoch {epoch + 1}/{epochs}  loss {total / len(x):.4f}", flush=True)
    return model.eval()


def save_classifier(model: DigitClassifier, path: str | os.PathLike = WEIGHTS) -> Path:
    """Write the weights as safetensors atomically (temporary file in the same folder, then rename)."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp))


def load_classifier(path: str | os.PathLike = WEIGHTS) -> DigitClassifier:
    """Load weights written by ``save_classifier`` (by default the shipped ones), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}: run python -m ditcache.metrics.classifier --train")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.inference_mode()
def classifier_probs(images: np.ndarray, model: DigitClassifier | None = None, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, 10) float64 of uint8 digit images."""
    model = model if model is not None else load_classifier()
    x = to_input(images)  # (N, 1, 28, 28)
    probs = [F.softmax(model(x[s:s + batch_size]).double(), dim=1) for s in range(0, len(x), batch_size)]
    return torch.cat(probs).numpy() if probs else np.zeros((0, NUM_CLASSES))


def accuracy(images: np.ndarray, labels: np.ndarray, model: DigitClassifier | None = None) -> float:
    """Fraction of images whose most probable class is their label."""
    pred = classifier_probs(images, model).argmax(axis=1)
    return float(np.mean(pred == np.asarray(labels)))


def main(argv: list[str] | None = None) -> int:
    """Train on the 9,000-image split of the MNIST test set, report held-out accuracy, save weights."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--train", action="store_true", help="train and write the weights")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(WEIGHTS), help="where the safetensors file goes")
    args = parser.parse_args(argv)
    from ditcache.data.mnist import load_mnist

    torch.set_num_threads(args.threads)
    images, labels = load_mnist()
    train_idx, held_idx = split_indices(len(images), seed=args.seed)
    if args.train:
        start = time.perf_counter()
        model = train_classifier(images[train_idx], labels[train_idx], args.epochs, args.seed, log=True)
        print(f"trained {args.epochs} epochs on {len(train_idx)} images in {time.perf_counter() - start:.0f} s")
        print(f"wrote {save_classifier(model, args.out)}")
    else:
        model = load_classifier(args.out)
    acc = accuracy(images[held_idx], labels[held_idx], model)
    print(f"held-out accuracy {acc:.4f} on {len(held_idx)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
