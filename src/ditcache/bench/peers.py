"""``ditcache bench --peers``: ditcache against the caches users would pick instead, on one model.

Every system samples the same job on the same diffusers ``DiTTransformer2DModel`` (our model
converted by ``dit_to_diffusers``, identical eps), through the same DDIM loop, from identical noise
and labels:

- ``none``: uncached, the reference for fidelity and speed;
- ditcache specs (``rule:preset=rm-50+forecast``): the engine installed on the diffusers model;
- ``diffusers:NAME:k=v,...``: diffusers' own cache hooks (``peers_diffusers.py``);
- ``cache-dit:NAME:k=v,...``: cache-dit's DBCache (``peers_cachedit.py``).

The compute fraction is counted the same way for every system, outside all of them: forward hooks
on the output projection of every block's attention (``attn1.to_out.0``; and ``attn2.to_out.0``, the
cross-attention, in a PixArt block) and on the last linear layer of its MLP (``ff.net.2``) record the rows x tokens each actually processes; the fraction is that over what the
uncached model would process for the same transformer calls. A sub-layer a cache skips never calls
them; a token-wise partial step counts its tokens. (Work outside attention and MLP, e.g. ToCa's
token scoring, which calls ``to_q``/``to_k`` on its own, or a cache's residual arithmetic, is not in
the fraction; the speed-up shows it.)

A system whose package is missing, or whose cache does not apply to the model, is a table row with
the reason, not an error.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..images import to_uint8
from ..metrics.bootstrap import REPLICATES
from ..metrics.fidelity import fidelity
from ..sampling.generate import SampleConfig, decode, noise_and_labels, sample_seed
from ..sampling.loops import sample
from .compare import parse_cache

NONE = "none"
LEVELS = (0.5, 1 / 3, 0.25)  # the table's compute levels
S35 = "rule:steps=1/2/4/5/7/8/10/11/13/14/16/17/19"  # a full step every third step: 7 of 20 computed
# the default table at ~50%, ~35% and ~25% of the calls (DDIM-20): ditcache's schedules alone, with
# GOC and with forecast; diffusers' TaylorSeer at the same intervals (warmup 1 puts it on the same
# fractions; its default warmup 3 at N = 2 as well), its other hooks, and cache-dit's DBCache
DEFAULT_PEER_SPECS = (
    "rule:preset=rm-50", "rule:preset=rm-50+goc:preset=rm-50", "rule:preset=rm-50+forecast",
    "rule:preset=rm-50+forecast:order=3",
    S35, S35 + "+goc", S35 + "+forecast", S35 + "+forecast:order=3",
    "rule:preset=rm-75", "rule:preset=rm-75+goc", "rule:preset=rm-75+forecast", "rule:preset=rm-75+forecast:order=1",
    "toca:interval=2,ratio=0.3", "toca:interval=2,ratio=0.3+forecast",
    "diffusers:taylorseer:interval=2,order=2", "diffusers:taylorseer:interval=2,order=2,warmup=1",
    "diffusers:taylorseer:interval=3,order=2,warmup=1", "diffusers:taylorseer:interval=3,order=1,warmup=1",
    "diffusers:taylorseer:interval=4,order=2,warmup=1",
    "diffusers:fbc:threshold=0.2", "diffusers:pab:skip=2", "diffusers:fastercache", "diffusers:magcache",
    "cache-dit:dbcache:threshold=0.1,taylor=1", "cache-dit:dbcache:mask=2,taylor=1", "cache-dit:dbcache:mask=4,taylor=1",
)


class NotApplicable(Exception):
    """A peer that cannot run here: its package is missing or its cache does not fit the model."""


# -- counting what ran, the same way for every system ------------------------------------------
class CallCounter:
    """Rows x tokens processed by every block's attention and MLP, against the uncached count."""

    def __init__(self, transformer: torch.nn.Module):
        self.blocks = list(transformer.transformer_blocks)
        self.executed = 0  # rows x tokens through attention or MLP
        self.full = 0  # what the uncached model would have processed in the same calls
        self._handles = [transformer.register_forward_pre_hook(self._model_call, with_kwargs=True)]
        self.branches = 0  # counted sub-layers per block: self-attention, MLP, and cross-attention where there is one
        for block in self.blocks:
            cross = [block.attn2.to_out[0]] if getattr(block, "attn2", None) is not None else []
            modules = [block.attn1.to_out[0], block.ff.net[2]] + cross
            self.branches = len(modules)
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._sub_call))

    def _model_call(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W)
        patch = module.config.patch_size
        tokens = (x.shape[-2] // patch) * (x.shape[-1] // patch)
        self.full += self.branches * len(self.blocks) * x.shape[0] * tokens

    def _sub_call(self, module, args):
        x = args[0]  # (B, N, C)
        self.executed += x.shape[0] * x.shape[1]

    @property
    def fraction(self) -> float:
        return self.executed / self.full if self.full else 1.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# -- the systems -----------------------------------------------------------------------------------
class System:
    """One cache installed on its own copy of the transformer; the sampler's hooks."""

    label = ""

    def begin_run(self, info) -> None:
        pass

    def begin_step(self, step) -> None:
        pass

    def end_run(self) -> None:
        pass


class Uncached(System):
    label = "uncached"

    def __init__(self, transformer):
        self.transformer = transformer


class Ditcache(System):
    label = "ditcache"

    def __init__(self, transformer, spec: str, fingerprint: str, resolution: int):
        from ..engine import CacheEngine

        policy, correctors = parse_cache(spec)
        self.transformer = transformer
        self.engine = CacheEngine(transformer, policy, correctors).install()
        self.engine.describe_model(fingerprint, resolution)

    def begin_run(self, info) -> None:
        self.engine.begin_run(info)

    def begin_step(self, step) -> None:
        self.engine.begin_step(step)

    def end_run(self) -> None:
        self.engine.end_run()


def build_system(spec: str, base: torch.nn.Module, loaded) -> System:
    """A fresh copy of ``base`` with the system of ``spec`` installed (raises NotApplicable)."""
    transformer = copy.deepcopy(base)
    if spec == NONE:
        return Uncached(transformer)
    if spec.startswith("diffusers:"):
        from .peers_diffusers import diffusers_system

        return diffusers_system(transformer, spec.split(":", 1)[1])
    if spec.startswith("cache-dit:"):
        from .peers_cachedit import cachedit_system

        return cachedit_system(transformer, spec.split(":", 1)[1])
    return Ditcache(transformer, spec, loaded.fingerprint, loaded.image_size)


def failed_status(err: Exception) -> str:
    """A row's status for a peer whose cache raised ``err`` on this model: its type and first line."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"failed on this model: {type(err).__name__}: {first}"[:160]


def is_peer(spec: str) -> bool:
    return spec.startswith(("diffusers:", "cache-dit:"))


def run_or_record(spec: str, row: dict, rows: list, run):
    """``run()``'s result; or None, with ``row`` recorded in ``rows`` as not run (NotApplicable) or,
    for a peer's cache that breaks on this model, as failed: a row, not a crash. Ours still raise."""
    try:
        return run()
    except NotApplicable as why:
        row["status"] = f"not run: {why}"
    except Exception as err:
        if not is_peer(spec):
            raise
        row["status"] = failed_status(err)
    rows.append(row)
    return None


def check_spec(spec: str) -> None:
    """Raise ValueError for a malformed spec before any sampling starts (peers are checked at build)."""
    if spec != NONE and not is_peer(spec):
        parse_cache(spec)


# -- running the job -----------------------------------------------------------------------------
@dataclass
class PeerRun:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,)
    seconds: float
    fraction: float  # counted by CallCounter
    report: dict = field(default_factory=dict)


@torch.no_grad()
def run_system(system: System, loaded, config: SampleConfig) -> PeerRun:
    """Sample ``config`` with ``system`` through our DDIM loop; count and time it."""
    transformer = system.transformer
    counter = CallCounter(transformer)
    shape = (loaded.in_channels, loaded.latent_size, loaded.latent_size)

    def model_fn(x, t, y):
        return transformer(x, timestep=t, class_labels=y).sample

    images, labels = [], []
    indices = list(range(config.num_samples))
    start = time.perf_counter()
    try:
        for first in range(0, len(indices), config.batch_size):
            batch = indices[first:first + config.batch_size]
            z, y = noise_and_labels(batch, config, shape, loaded.num_classes)
            step_gen = torch.Generator().manual_seed(sample_seed(config.seed, -1 - batch[0]))
            x = sample(model_fn, z, y, sampler=config.sampler, num_steps=config.steps, cfg_scale=config.cfg_scale,
                       null_class=loaded.null_class, learn_sigma=loaded.learn_sigma,
                       guided_channels=loaded.guided_channels, hooks=system, generator=step_gen)
            system.end_run()
            images.append(to_uint8(decode(loaded, x)))
            labels.append(y.numpy())
    finally:
        counter.remove()
    seconds = time.perf_counter() - start
    report = system.engine.report() if isinstance(system, Ditcache) else {}
    return PeerRun(np.concatenate(images), np.concatenate(labels), seconds, counter.fraction, report)


@dataclass
class PeersOptions:
    fid: bool = True
    reference: str = "mnist"
    reference_limit: Optional[int] = None  # None: the whole reference set (MNIST: the 10,000 test digits)
    bootstrap: int = REPLICATES  # replicates for the FID intervals; 0 turns them off
    features_dir: Optional[str] = None  # keep every row's Inception features here, for rescore_peers
    timing_samples: int = 8  # samples per timed run
    repeats: int = 2  # interleaved timing repeats (0: no timing)
    progress: bool = True


def diffusers_model(loaded):
    """The loaded model as a diffusers DiTTransformer2DModel (our own DiT is converted)."""
    if loaded.family == "diffusers-dit":
        return loaded.module
    from ..models.diffusers_format import dit_to_diffusers

    return dit_to_diffusers(loaded.module)


def compare_peers(loaded, config: SampleConfig, specs: Sequence[str], options: PeersOptions = PeersOptions()) -> list[dict]:
    """One row per spec (uncached first): fraction, fidelity to uncached, FID, measured speed-up."""
    for spec in specs:
        check_spec(spec)
    specs = [NONE] + [s for s in specs if s != NONE]
    base = diffusers_model(loaded).eval()
    rows, runs, reference, replicates = [], {}, None, {}
    extractor = None
    for spec in specs:
        row = {"spec": spec}
        try:
            system = build_system(spec, base, loaded)
        except NotApplicable as why:
            row["status"] = f"not run: {why}"
            rows.append(row)
            continue
        if options.progress:
            print(f"{spec}: sampling {config.num_samples}", flush=True)
        run = run_or_record(spec, row, rows, lambda: run_system(system, loaded, config))
        if run is None:
            continue
        reference = run if reference is None else reference
        runs[spec] = system
        row.update({"status": "ok", "compute_fraction": run.fraction, "seconds_quality_run": run.seconds,
                    "engine_compute_fraction": run.report.get("compute_fraction")})
        row.update({f"{k}_vs_uncached": v for k, v in fidelity(run.images, reference.images).items()})
        if options.fid:
            from ..metrics.evaluate import evaluate_with_features
            from ..metrics.inception import InceptionExtractor

            extractor = extractor or InceptionExtractor()
            m, feats, reps = evaluate_with_features(run.images, run.labels, reference=options.reference,
                                                extractor=extractor, reference_limit=options.reference_limit,
                                                bootstrap=options.bootstrap)
            row.update({k: m.get(k) for k in ("fid", "sfid", "precision", "recall", "class_accuracy", "num_reference")})
            if reps is not None:
                replicates[spec] = reps
            if options.features_dir:
                from .peers_fid import save_features

                save_features(options.features_dir, spec, feats)
        rows.append(row)
    from .peers_fid import add_intervals

    add_intervals(rows, replicates)
    if options.repeats > 0:
        _time(runs, rows, loaded, config, options)
    return rows


def _time(systems: dict, rows: list[dict], loaded, config: SampleConfig, options: PeersOptions) -> None:
    """Median seconds of a small job per system, systems taking turns (one warm-up first)."""
    import dataclasses
    import statistics

    small = dataclasses.replace(config, num_samples=options.timing_samples, batch_size=options.timing_samples)
    run_system(systems[NONE], loaded, small)  # warm-up
    seconds = {spec: [] for spec in systems}
    for r in range(options.repeats):
        for spec, system in systems.items():
            seconds[spec].append(run_system(system, loaded, small).seconds)
            if options.progress:
                print(f"  timing {r + 1}/{options.repeats} {spec}: {seconds[spec][-1]:.2f} s", flush=True)
    base = statistics.median(seconds[NONE])
    for row in rows:
        if row["spec"] in seconds:
            row["seconds"] = statistics.median(seconds[row["spec"]])
            row["speedup"] = base / row["seconds"]


def level(fraction: float, levels=LEVELS) -> float:
    """The compute level a fraction belongs to (the nearest of ``levels``)."""
    return min(levels, key=lambda x: abs(x - fraction))


def group(rows: list[dict], levels=LEVELS, tolerance: float = 0.08) -> list[tuple[str, list[dict]]]:
    """Rows by compute level (within ``tolerance`` of it), each led by the uncached row, then the rest
    (other fractions, systems that did not run)."""
    reference = [r for r in rows if r["spec"] == NONE]
    groups = {x: list(reference) for x in levels}
    rest = []
    for r in rows:
        if r["spec"] == NONE:
            continue
        f = r.get("compute_fraction")
        if f is not None and f < 1.0 and abs(level(f, levels) - f) <= tolerance:
            groups[level(f, levels)].append(r)
        else:
            rest.append(r)
    return [(f"~{x:.0%} of the calls", groups[x]) for x in levels] + [("other fractions, and systems that did not run", rest)]


def peers_table(rows: list[dict]) -> str:
    """Markdown: a table per compute level, one line per system, with its status where it did not run."""
    from .compare import _cell

    fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
    diff = any(r.get("fid_diff") is not None for r in rows)
    out = []
    for title, members in group(rows):
        if not members:
            continue
        head = "| system | compute (counted) | measured speed-up | PSNR vs uncached | SSIM | FID [95%] |"
        head += " ΔFID vs uncached [95%, paired] |" if diff else ""
        out += [f"**{title}**", "", head + " class acc. | status |", "|" + "---|" * (9 if diff else 8)]
        for r in members:
            cells = [f"`{r['spec']}`", fmt(r.get("compute_fraction"), "{:.3f}"), fmt(r.get("speedup"), "{:.2f}x"),
                     fmt(r.get("psnr_vs_uncached"), "{:.2f}"), fmt(r.get("ssim_vs_uncached"), "{:.4f}"),
                     _cell(r, "fid", "{:.2f}")]
            cells += [_cell(r, "fid_diff", "{:+.2f}")] if diff else []
            cells += [fmt(r.get("class_accuracy"), "{:.3f}"), r["status"]]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
