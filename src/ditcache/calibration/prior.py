"""Prior knowledge extraction: the mean pre-gate attention / MLP output of every block at every step.

EOC (Qiu et al. 2025, "Accelerating Diffusion Transformer via Error-Optimized Cache",
https://arxiv.org/abs/2501.19243) corrects a reused feature with the *trend* of the uncached
trajectory, eq. (4)-(5) of methods.md §4.1-4.2; GOC (https://arxiv.org/abs/2503.05156) finds its
inflection steps on the same statistics. Extraction runs K uncached sampling passes with the target
settings (model, sampler, steps, cfg scale), labels cycling over the classes, and averages every
site's output element-wise, keeping the conditional and unconditional CFG halves apart:

    P[b][t, l] = (1/K) sum_k F_{t,l,b}(k)        shape (H, N, C), H = 2 halves with CFG, 1 without

What is stored, and why: the full per-step means, tensors ``attn`` and ``mlp`` of shape
(S, L, H, N, C), not trends. A trend is P[t] - P[s] where s is the step the reused feature was
computed at, and with FORA or rm-75 that is not always t - 1; consecutive differences would have to
be summed (accumulating rounding), while means give every (t, s) pair with one subtraction. GOC's
inflection statistic needs the trajectory itself, and the size is the same (S means vs S-1 trends).
Trends are derived at load time (``Prior.trend``). ``float16`` storage halves the size; the trend
it gives differs from float32's by at most the fp16 rounding of the two means (about 2^-11 of their
magnitude), which the tests check.

Every sample draws its own noise (``generate``'s per-sample seeds), unlike the authors' script which
re-seeds 0 for every class; I average over noise as well as classes because the trend should describe
the sampler, not one starting point.

Extraction is resumable: after every ``checkpoint_every`` batches the float64 running sums and the
sample count go into ``<out>/partial`` (an artifact of kind "prior-partial", written atomically); a
restart with the same settings continues from it, and the final save replaces the folder.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..correctors.base import Corrector
from ..engine import CacheEngine
from ..policies import make_policy
from ..sampling.generate import SampleConfig, generate
from ..types import WITH_CROSS, Kind, RunInfo, Site, StepInfo
from .artifact import Artifact, ArtifactKey, artifact_bytes, load_artifact, save_artifact

PRIOR_KIND = "prior"
PARTIAL_KIND = "prior-partial"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Prior:
    """A loaded prior artifact: per-step means of every site, and the trends derived from them."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        # each (S, L, H, N, C); cross-attention too where the model has it (PixArt)
        self.means = {b.value: artifact.tensors[b.value] for b in WITH_CROSS if b.value in artifact.tensors}
        shapes = {tuple(m.shape) for m in self.means.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 5:
            raise ValueError(f"prior tensors must share one (steps, blocks, halves, tokens, channels) shape, got {shapes}")

    @property
    def key(self) -> ArtifactKey:
        return self.artifact.key

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return tuple(self.means["attn"].shape)  # (S, L, H, N, C)

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.means.values())

    def to(self, device) -> "Prior":
        """Move the means to ``device`` (kept in their stored dtype)."""
        self.means = {b: m.to(device) for b, m in self.means.items()}
        return self

    def trend(self, branch: str, block: int, step: int, since: int) -> torch.Tensor:
        """T = P[step] - P[since] for one site, in float32: shape (H, N, C)."""
        m = self.means[branch]
        return m[step, block].float() - m[since, block].float()  # (H, N, C)

    def run_info(self) -> RunInfo:
        """The RunInfo of a sampling run this prior was made for (to plan without sampling)."""
        steps, depth, _, tokens, _ = self.shape
        k = self.key
        return RunInfo(num_steps=steps, depth=depth, num_tokens=tokens, sampler=k.sampler, cfg_scale=k.cfg_scale,
                       fingerprint=k.model_fingerprint, resolution=k.resolution)

    def check_run(self, run: RunInfo) -> None:
        """The key check done at load, plus the shape the run will feed (ValueError otherwise)."""
        self.artifact.check(PRIOR_KIND, ArtifactKey.from_run(run))
        steps, depth, halves, tokens, _ = self.shape
        want = (run.num_steps, run.depth, 2 if run.cfg_scale != 1.0 else 1, run.num_tokens)
        if (steps, depth, halves, tokens) != want:
            raise ValueError(f"prior has (steps, blocks, halves, tokens) = {(steps, depth, halves, tokens)}, "
                             f"the run needs {want}")


def load_prior(path, key: Optional[ArtifactKey] = None) -> Prior:
    """Read a prior artifact; with ``key`` it must have been made for exactly those settings."""
    return Prior(load_artifact(path, PRIOR_KIND, key))


class PriorRecorder(Corrector):
    """Observes every site call of an uncached run and keeps float64 running sums per CFG half."""

    name = "prior-recorder"

    def __init__(self, sums: Optional[dict[str, torch.Tensor]] = None, count: int = 0):
        self.sums = sums or {}  # branch -> (S, L, H, N, C) float64
        self.count = count  # samples summed so far (each contributes one row to every half)

    def reset(self, run: RunInfo) -> None:
        # sums survive resets on purpose: every batch is a new sampling run adding to the same mean
        self.run = run
        self.halves = 2 if run.cfg_scale != 1.0 else 1
        self._rows = None

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.COMPUTE:
            raise ValueError("the prior must come from an uncached run (policy 'none')")
        rows, tokens, channels = used.shape  # (H*B, N, C)
        per_half = used.reshape(self.halves, rows // self.halves, tokens, channels).double().sum(1)  # (H, N, C)
        sums = self.sums.get(site.branch.value)
        if sums is None:
            shape = (self.run.num_steps, self.run.depth, self.halves, tokens, channels)
            sums = self.sums[site.branch.value] = torch.zeros(shape, dtype=torch.float64, device=used.device)
        elif sums.device != used.device:  # sums resumed from disk live on the CPU
            sums = self.sums[site.branch.value] = sums.to(used.device)
        sums[step.index, site.block] += per_half
        self._rows = rows // self.halves

    def end_batch(self) -> None:
        """Count the samples of the batch just sampled."""
        self.count += self._rows or 0


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    report: dict


def _settings(config: SampleConfig) -> dict:
    """What a partial extraction must share with the run that resumes it (besides the artifact key)."""
    return {"num_samples": config.num_samples, "batch_size": config.batch_size, "seed": config.seed,
            "labels": list(config.labels)}


def _resume(partial: Path, key: ArtifactKey, settings: dict):
    """(recorder, samples done, seconds, model calls) from a partial extraction, or fresh."""
    if not (partial / "manifest.json").is_file():
        return PriorRecorder(), 0, 0.0, 0
    art = load_artifact(partial, PARTIAL_KIND)
    diff = art.key.mismatches(key)
    diff.update({k: (art.meta.get(k), v) for k, v in settings.items() if art.meta.get(k) != v})
    if diff:
        detail = ", ".join(f"{k}: partial {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"a partial extraction at {partial} was made with other settings ({detail}); "
                         "resume with the same settings, or pass --overwrite to start again")
    sums = {name[:-len("_sum")]: t for name, t in art.tensors.items() if name.endswith("_sum")}
    meta = art.meta
    return PriorRecorder(sums, meta["done"]), meta["done"], meta["seconds"], meta["model_calls"]


def _finished(out: Path, key: ArtifactKey, settings: dict) -> Optional[ExtractResult]:
    """The finished prior at ``out`` when it was made with these settings; ValueError when with others.

    A finished prior is never replaced silently: asking for K=10 where K=20 was extracted is an
    error (``--overwrite`` empties the folder first), and asking for the same one returns it unchanged.
    """
    if not (out / "manifest.json").is_file():
        return None
    art = load_artifact(out, PRIOR_KIND)
    made = {**art.meta, "num_samples": art.meta.get("K")}
    diff = {k: (a, b) for k, (a, b) in art.key.mismatches(key).items()}
    diff.update({k: (made[k], v) for k, v in settings.items() if made.get(k) != v})
    if diff:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ValueError(f"{out} holds a finished prior made with other settings ({detail}); pass --overwrite to "
                         "replace it, or use another --out folder")
    report = {"path": str(out), "finished": True, "reused": True, "K": art.meta["K"], "resumed_from": art.meta["K"],
              "seconds": art.meta["seconds"], "forwards": art.meta["forwards"], "model_calls": art.meta["model_calls"],
              "steps": key.steps, "sampler": key.sampler, "cfg_scale": key.cfg_scale, "dtype": art.meta["dtype"],
              "shape": list(art.tensors["attn"].shape), "bytes": artifact_bytes(out)}
    return ExtractResult(out, report)


def extract_prior(loaded, config: SampleConfig, out, dtype: str = "float32", progress: bool = False,
                  checkpoint_every: int = 1, max_batches: Optional[int] = None, device: str = "cpu") -> ExtractResult:
    """Average every site's output over ``config.num_samples`` uncached samples into a prior at ``out``.

    ``config.labels`` None cycles 0..num_classes-1. ``max_batches`` stops after that many batches of
    this session, leaving ``out/partial`` to resume from (for splitting a long job); the result's
    report then has ``finished`` False.
    """
    if config.labels is None:
        config = dataclasses.replace(config, labels=tuple(range(loaded.num_classes)))
    config.validate(loaded.num_classes)
    key = ArtifactKey.for_run(loaded, config.sampler, config.steps, config.cfg_scale)

    def installed(recorder):
        return CacheEngine(loaded.module, make_policy("none"), [recorder])

    def run_batch(engine, batch):
        generate(loaded, config, engine=engine, indices=batch, device=device)

    job = PriorJob(key, _settings(config), installed, run_batch)
    return accumulate(job, out, dtype, progress, checkpoint_every, max_batches)


@dataclass(frozen=True)
class PriorJob:
    """What the extraction loop needs from a sampler: the artifact key, the settings a resume must
    share (num_samples, batch_size, seed, and the labels or prompts), ``installed(recorder)`` (a context
    manager that puts the recorder on the model and yields a handle) and ``run_batch(handle, indices)``."""

    key: ArtifactKey
    settings: dict
    installed: Callable
    run_batch: Callable


def accumulate(job: PriorJob, out, dtype: str = "float32", progress: bool = False, checkpoint_every: int = 1,
               max_batches: Optional[int] = None) -> ExtractResult:
    """The extraction loop of every sampler: resumable running sums, then the means saved as a prior."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if checkpoint_every < 1:
        raise ValueError("checkpoint_every must be at least 1")
    out, key, settings = Path(out), job.key, job.settings
    num_samples, batch_size = settings["num_samples"], settings["batch_size"]
    partial = out / "partial"
    finished = _finished(out, key, {**settings, "dtype": dtype})
    if finished is not None:
        return finished
    recorder, done, seconds, model_calls = _resume(partial, key, settings)
    resumed_from = done
    indices = list(range(num_samples))
    batches = [indices[i:i + batch_size] for i in range(done, len(indices), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=-(-num_samples // batch_size), initial=done // batch_size, desc="prior batches")
    with job.installed(recorder) as handle:
        for n, batch in enumerate(batches, 1):
            start = time.perf_counter()
            job.run_batch(handle, batch)
            recorder.end_batch()
            seconds += time.perf_counter() - start
            model_calls += key.steps
            done += len(batch)
            if n % checkpoint_every == 0 or n == len(batches):
                _save_partial(partial, key, settings, recorder, done, seconds, model_calls)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report = {"path": str(out), "finished": done == num_samples, "K": done, "resumed_from": resumed_from,
              "seconds": seconds, "forwards": done * key.steps, "model_calls": model_calls,
              "steps": key.steps, "sampler": key.sampler, "cfg_scale": key.cfg_scale}
    if done < num_samples:
        return ExtractResult(partial, report)
    means = {b: _mean(s, recorder.count, DTYPES[dtype]) for b, s in recorder.sums.items()}
    meta = {**settings, "K": recorder.count, "seconds": seconds, "forwards": report["forwards"],
            "model_calls": model_calls, "dtype": dtype,
            "stored": "per-step means (S, L, H, N, C); H = the two guidance halves in the batch's order"}
    save_artifact(Artifact(PRIOR_KIND, key, means, meta), out)  # replaces out/, partial/ included
    report.update(dtype=dtype, shape=list(means["attn"].shape), bytes=artifact_bytes(out))
    return ExtractResult(out, report)


def _mean(sums: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    mean = (sums / count).cpu()  # (S, L, H, N, C) float64
    if dtype == torch.float16 and mean.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError("the prior's means overflow float16; extract with --dtype float32")
    return mean.to(dtype)


def _save_partial(path: Path, key: ArtifactKey, settings: dict, recorder: PriorRecorder, done: int,
                  seconds: float, model_calls: int) -> None:
    tensors = {f"{b}_sum": s for b, s in recorder.sums.items()}
    meta = {**settings, "done": done, "seconds": seconds, "model_calls": model_calls}
    save_artifact(Artifact(PARTIAL_KIND, key, tensors, meta), path)
