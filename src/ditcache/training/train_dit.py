"""Train a class-conditional pixel-space DiT on MNIST: the embedded default model.

The objective is DiT's: eps MSE plus the variational-bound term that trains the learned variance
(Improved DDPM's hybrid loss), uniform timesteps over the 1000-step linear schedule, labels dropped
to the null class with probability 0.1 so classifier-free guidance works, AdamW, and an EMA of the
weights that is what gets exported. Checkpoints are written atomically and a run resumes from its
last checkpoint; resuming continues the same random stream, so an interrupted run ends where an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoints import load_resumable, save_checkpoint
from ..data.mnist import load_mnist
from ..finite import NonFiniteError
from ..models.dit import DiT
from ..models.loading import save_model
from ..sampling.diffusion import GaussianDiffusion, linear_betas


@dataclass(frozen=True)
class TrainConfig:
    """Defaults: the embedded model. Sized so 1,000 DDIM-20 guided samples take minutes on 2 CPU cores."""

    data: Optional[str] = None  # MNIST folder; None: $DITCACHE_MNIST or ../shared/data/mnist
    hidden_size: int = 128
    depth: int = 6  # enough blocks for per-layer schedules (L2C) to mean something
    num_heads: int = 4
    patch_size: int = 4  # 28x28 -> 7x7 = 49 tokens of 4x4 pixels
    iterations: int = 8000
    batch_size: int = 64
    lr: float = 5e-4  # higher than DiT's 1e-4: a 1.9M-parameter model on CPU needs to learn fast
    warmup: int = 200  # linear learning-rate warm-up iterations
    ema_decay: float = 0.999  # DiT uses 0.9999 over 400k iterations; ours is ~100x shorter
    class_dropout_prob: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250

    def model_kwargs(self) -> dict:
        return dict(input_size=28, patch_size=self.patch_size, in_channels=1, hidden_size=self.hidden_size,
                    depth=self.depth, num_heads=self.num_heads, class_dropout_prob=self.class_dropout_prob,
                    num_classes=10, learn_sigma=True)


RESUMABLE_CHANGES = ("iterations", "checkpoint_every")


class Trainer:
    """One training run in a folder: ``checkpoint.pt`` (resumable) and ``train_log.csv``."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike):
        self.config = config
        self.out = Path(out)
        self.ckpt_path = self.out / "checkpoint.pt"
        images, labels = load_mnist(config.data)
        self.x = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
        self.y = torch.from_numpy(labels).long()  # (N,)
        torch.manual_seed(config.seed)
        self.model = DiT(**config.model_kwargs())
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.diffusion = GaussianDiffusion(linear_betas(1000))
        self.gen = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.seconds = 0.0
        if self.ckpt_path.exists():
            self._resume()

    def _resume(self) -> None:
        state = load_resumable(self.ckpt_path, self.config, RESUMABLE_CHANGES)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.seconds = state["step"], state["seconds"]

    def _kept(self) -> str:
        return (f"{self.ckpt_path} keeps the last checkpointed state" if self.ckpt_path.is_file()
                else "no checkpoint was written yet")

    def save_checkpoint(self) -> None:
        state = {"config": dataclasses.asdict(self.config), "model": self.model.state_dict(),
                 "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "step": self.step, "seconds": self.seconds}
        save_checkpoint(state, self.ckpt_path)

    def train_step(self) -> dict:
        c = self.config
        idx = torch.randint(0, len(self.x), (c.batch_size,), generator=self.gen)
        x0, y = self.x[idx], self.y[idx]  # (B, 1, 28, 28), (B,)
        t = torch.randint(0, 1000, (c.batch_size,), generator=self.gen)  # (B,)
        noise = torch.randn(x0.shape, generator=self.gen)
        drop = (torch.rand(c.batch_size, generator=self.gen) < c.class_dropout_prob).long()
        losses = self.diffusion.training_losses(lambda xt, s: self.model(xt, s, y, force_drop_ids=drop),
                                                x0, t, noise)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss):  # one scalar read per iteration; the stats below read it anyway
            raise NonFiniteError(f"training iteration {self.step + 1}: the loss is {float(loss.detach())}; stopped before the "
                                 f"update; {self._kept()}")
        lr = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1.0 - c.ema_decay)
        self.step += 1
        return {k: float(v.detach().mean()) for k, v in losses.items()}

    def train(self, max_minutes: Optional[float] = None, progress: bool = True) -> None:
        """Train until ``iterations`` (or the time budget), checkpointing as it goes."""
        c = self.config
        self.model.train()
        log = self.out / "train_log.csv"
        self.out.mkdir(parents=True, exist_ok=True)
        if not log.exists():
            log.write_text("step,loss,mse,vb,seconds\n")
        bar = tqdm(total=c.iterations, initial=self.step, disable=not progress, desc="train", unit="it")
        start, window = time.perf_counter(), []
        while self.step < c.iterations:
            t0 = time.perf_counter()
            stats = self.train_step()
            self.seconds += time.perf_counter() - t0
            window.append(stats["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
            if self.step % c.checkpoint_every == 0 or self.step == c.iterations:
                self.save_checkpoint()
                with log.open("a") as f:
                    f.write(f"{self.step},{np.mean(window):.5f},{stats['mse']:.5f},{stats['vb']:.5f},{self.seconds:.1f}\n")
                window = []
            if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
                self.save_checkpoint()
                break
        bar.close()

    def export(self, path: str | os.PathLike, name: Optional[str] = None) -> Path:
        """Write the EMA weights in our safetensors format with the training facts as metadata."""
        meta = {"name": name or Path(path).stem, "image_size": 28, "guided_channels": None, "train_iterations": self.step,
                "train_seconds": round(self.seconds, 1), "train_config": dataclasses.asdict(self.config)}
        return save_model(self.ema.eval(), path, **meta)
