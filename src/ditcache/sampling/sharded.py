"""Sampling at scale: batches sharded over ranks, written atomically, resumable, assembled by rank 0.

A run folder holds ``run.json`` (the settings), ``shards/batchNNNNNN.npz`` (one per finished batch,
with its global sample indices) and, once complete, the ADM-format ``samples.npz``. Batch b holds
samples ``[b * batch_size, (b + 1) * batch_size)`` and belongs to rank ``b mod world_size``. Because
every sample's noise and label depend only on (seed, index), the images are the same whatever the
number of ranks, and an interrupted run resumes by skipping the batches already on disk: nothing is
lost (an unfinished batch is simply redone) and nothing is duplicated (assembly checks that every
index appears exactly once). Launch several processes with ``torchrun --nproc_per_node=K``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..images import save_npz
from .generate import SampleConfig, generate


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def num_batches(config: SampleConfig) -> int:
    return -(-config.num_samples // config.batch_size)


def batch_indices(config: SampleConfig, b: int) -> list[int]:
    return list(range(b * config.batch_size, min((b + 1) * config.batch_size, config.num_samples)))


def shard_path(out: Path, b: int) -> Path:
    return out / "shards" / f"batch{b:06d}.npz"


def samples_complete(out: Path, config: SampleConfig) -> bool:
    """True when ``samples.npz`` is readable and holds every sample (read from its header only)."""
    path = out / "samples.npz"
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return len(data["labels"]) == config.num_samples and "arr_0" in data.files
    except Exception:  # truncated or not a zip: redo it from the shards
        return False


def recover(out: Path, config: SampleConfig) -> list[str]:
    """Bring a folder left by a crashed or concurrent run to a consistent state; returns notes.

    A complete ``samples.npz`` wins: shards beside it are strays (a second run finishing a batch
    after the first assembled) and are removed. An incomplete or unreadable ``samples.npz`` is
    removed, and the run resumes from its shards, which ``run_shard`` checks one by one.
    """
    notes = []
    shards = out / "shards"
    if samples_complete(out, config):
        if shards.is_dir():
            stray = len(list(shards.glob("*.npz")))
            shutil.rmtree(shards)
            notes.append(f"removed {stray} stray shard(s) beside the complete {out / 'samples.npz'}")
    elif (out / "samples.npz").exists():
        (out / "samples.npz").unlink()
        notes.append(f"removed an incomplete {out / 'samples.npz'}; resuming from the shards")
    return notes


def shard_ok(path: Path, config: SampleConfig, b: int) -> bool:
    """True when a shard on disk is readable and holds exactly batch b's samples."""
    try:
        with np.load(path) as data:
            return len(data["arr_0"]) == len(data["labels"]) == len(batch_indices(config, b))
    except Exception:
        return False


def run_shard(loaded, config: SampleConfig, engine, out: Path, rank: int = 0, world: int = 1,
              progress: bool = False, device: str = "cpu") -> dict:
    """Sample this rank's missing batches; returns what this call did (batches, seconds, counters)."""
    mine = [b for b in range(num_batches(config)) if b % world == rank]
    for b in mine:  # a shard damaged outside our atomic writes (disk full, copied folder) is redone
        if shard_path(out, b).is_file() and not shard_ok(shard_path(out, b), config, b):
            print(f"note: {shard_path(out, b)} is unreadable or incomplete; sampling batch {b} again", file=sys.stderr)
            shard_path(out, b).unlink()
    todo = [b for b in mine if not shard_path(out, b).is_file()]
    done = {"batches": len(todo), "resumed_batches": len(mine) - len(todo), "seconds": 0.0, "reports": []}
    for n, b in enumerate(todo):
        start = time.perf_counter()
        result = generate(loaded, config, engine=engine, indices=batch_indices(config, b), device=device)
        done["seconds"] += time.perf_counter() - start
        done["reports"].append(result.report)
        save_npz(shard_path(out, b), result.images, result.labels)
        if progress:
            print(f"\rrank {rank}: batch {n + 1}/{len(todo)} ({len(mine) - len(todo)} already on disk)",
                  end="", flush=True)
    if progress and todo:
        print()
    return done


def assemble(out: Path, config: SampleConfig, keep_shards: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate every batch in index order into ``samples.npz``; a missing batch is an error."""
    images, labels = [], []
    for b in range(num_batches(config)):
        path = shard_path(out, b)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the run is incomplete; run the same command again to resume")
        with np.load(path) as data:
            if len(data["arr_0"]) != len(batch_indices(config, b)):
                raise ValueError(f"{path} holds {len(data['arr_0'])} samples, expected {len(batch_indices(config, b))}")
            images.append(data["arr_0"])
            labels.append(data["labels"])
    images, labels = np.concatenate(images), np.concatenate(labels)
    save_npz(out / "samples.npz", images, labels)
    if not keep_shards:
        shutil.rmtree(out / "shards", ignore_errors=True)
    return images, labels


def sum_reports(reports: list[dict]) -> Optional[dict]:
    """Counters of several batches as one: ratios recomputed from the summed MACs and calls."""
    if not reports or "macs_total" not in reports[0]:
        return reports[0] if reports else None
    macs_run = sum(r["macs_run"] for r in reports)
    macs_total = sum(r["macs_total"] for r in reports)
    weights = [r["macs_total"] for r in reports]
    fraction = sum(r["compute_fraction"] * w for r, w in zip(reports, weights)) / sum(weights)
    return {**reports[0], "macs_run": macs_run, "macs_total": macs_total, "macs_ratio": macs_run / macs_total,
            "compute_fraction": fraction, "cache_peak_bytes": max(r.get("cache_peak_bytes", 0) for r in reports)}
