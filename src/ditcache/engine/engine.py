"""The cache engine: intercepts a model's sites, keeps the feature store, asks the policy, applies
the correctors and counts what ran. It knows no paper names.

Interception replaces ``forward`` on the *instances* of the attention and MLP sub-modules and of
the blocks (an instance attribute shadows the class method that ``nn.Module.__call__`` looks up),
so no model code changes and ``remove()`` restores the model exactly. The block wrappers implement
the trunk action; the site wrappers implement COMPUTE / REUSE / PARTIAL:

    COMPUTE  out = sub_module(x);           store[site] = out            (if the policy may reuse it)
    REUSE    out = correctors(store[site])                               (sub-module not called)
    PARTIAL  out = store[site] with rows tokens replaced by sub_module(x[tokens]); store[site] = out

With a static schedule and correctors that allow it (``Corrector.ahead``), the corrected features of
every site reused in a step can be made at ``begin_step`` in one call per corrector, which fuses the
element-wise work of all sites on a GPU (a few kernels per step instead of a few per site); REUSE
then hands back the precomputed tensor. ``step_ahead``: None (default) does this where the stored
features are on CUDA, True always, False never. On the CPU the per-call path is as fast or faster
(each site's feature is still in the caches when its finite sum is taken), and it gives the same
tensors bit for bit; dynamic policies always take it.

A reused site still has its input made by the block (the norm and modulation before the sub-module),
which the block then throws away. With a static schedule the engine knows which sites a step reuses,
so it also wraps each site's input module (``Adapter.input_attrs``) and runs it on the first token
only for those (``skip_inputs``, on by default): the block's arithmetic on the reused feature is
unchanged, so the outputs are the same bits, and a reused block costs its gated residual adds.
Dynamic policies and policies that observe inputs keep the full inputs. The residual stream is made
contiguous at the first block (the patch embedding hands over a transposed view, which every
element-wise op of the stack would otherwise walk in the transposed order): the same values.

Outside a sampling run (before ``begin_run`` or after ``end_run``) every wrapper calls straight
through, so the installed model behaves as the bare model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch
from torch import nn

from ..adapters import Adapter, adapter_for
from ..correctors import Corrector
from ..finite import FiniteWatch
from ..policies import Policy
from ..types import TOKENWISE, TRUNK, Kind, RunInfo, Site, StepInfo
from .counters import Counters
from .patching import ForwardPatches, claim, release


class CacheEngine:
    """Feature caching on one model. Use as a context manager or ``install()`` / ``remove()``."""

    patches_inputs = True  # wrap the sites' input modules (``skip_inputs``)

    def __init__(
        self,
        model: nn.Module,
        policy: Optional[Policy] = None,
        correctors: Sequence[Corrector] = (),
        adapter: Optional[Adapter] = None,
    ):
        self.model = model
        self.policy = policy if policy is not None else Policy()
        self.correctors = list(correctors)
        self.adapter = adapter or adapter_for(model)
        self.dims = self.adapter.dims(model)
        self.branches = self.adapter.branches(model)
        self.store: dict[Site, torch.Tensor] = {}
        self.counters = Counters(self.dims)
        self.peak_bytes = 0
        self.corrector_seconds = 0.0  # wall-clock inside the correctors' correct/observe this run
        self.finite_watch = FiniteWatch()  # corrected features' sums, checked by the sampler once per step
        self._step: Optional[StepInfo] = None
        self._patches = ForwardPatches()
        self._keep: dict[Site, bool] = {}
        self._trunk_reused = False
        self.step_ahead: Optional[bool] = None  # correct a whole step at its start: None on CUDA, True, False
        self._ahead: dict[Site, torch.Tensor] = {}  # this step's corrected features, made at begin_step
        self._ahead_on = False
        # run a reused site's input module on one token (static schedules); False: always in full
        self.skip_inputs = True
        self._skip_on = False
        self._skipped: frozenset[Site] = frozenset()  # sites whose input module runs on one token this step
        self._schedule = None  # the policy's static schedule for this run, or None
        self._reused_now: list[Site] = []  # the sites the schedule reuses at the current step, in install order
        self.model_info: dict = {}  # fingerprint / resolution of the loaded model, for RunInfo

    def describe_model(self, fingerprint: str, resolution: int) -> "CacheEngine":
        """Tell the engine which model it is on, so artifacts can be checked against the run."""
        self.model_info = {"fingerprint": fingerprint, "resolution": int(resolution)}
        return self

    def set_tokens(self, num_tokens: int, text_tokens: Optional[int] = None) -> None:
        """The token counts of the coming run, where they follow the input (a pipeline's resolution,
        its caption length) rather than the model's configured size; call before ``begin_run``."""
        changes = {"num_tokens": int(num_tokens)}
        if text_tokens is not None:
            changes["text_tokens"] = int(text_tokens)
        self.dims = dataclasses.replace(self.dims, **changes)

    # -- installation -------------------------------------------------------------------------
    def install(self) -> "CacheEngine":
        claim(self.model, "_ditcache_engine", self)
        blocks = self.adapter.blocks(self.model)
        for i, block in enumerate(blocks):
            self._patches.patch(block, self._block_forward(i, len(blocks), block.forward))
        for site, module in self.adapter.site_modules(self.model).items():
            self._patches.patch(module, self._site_forward(site, module.forward))
        if self.patches_inputs:
            for site, module in self.adapter.input_modules(self.model).items():
                self._patches.patch(module, self._input_forward(site, module.forward))
        return self

    def remove(self) -> None:
        """Restore every patched module; the model is then the bare model again."""
        self._patches.restore()
        self.store.clear()
        self._step = None
        release(self.model, "_ditcache_engine", self)

    def __enter__(self) -> "CacheEngine":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- the sampler's hooks ------------------------------------------------------------------
    def begin_run(self, info: RunInfo) -> None:
        """Reset all per-sample state; nothing leaks from one sampling call to the next."""
        if not self._patches:
            raise RuntimeError("install() the engine before sampling with it")
        info = dataclasses.replace(info, depth=self.dims.depth, num_tokens=self.dims.num_tokens,
                                   branches=self.branches, **self.model_info)
        self.run = info
        self.store.clear()
        self.counters = Counters(self.dims)
        self.peak_bytes = 0
        self.corrector_seconds = 0.0
        sites = self.adapter.site_modules(self.model)
        self.policy.bind(sites)
        self.policy.reset(info)
        schedule = self.policy.schedule()  # None for dynamic policies
        for corrector in self.correctors:
            corrector.bind(schedule)
            corrector.reset(info)
        self._keep = {site: self.policy.may_reuse(site) for site in sites}
        self._ahead.clear()
        self._ahead_on = (self.step_ahead is not False and schedule is not None and bool(self.correctors)
                          and all(c.ahead for c in self.correctors))
        self._observes = type(self.policy).observe is not Policy.observe
        self._skip_on = self.skip_inputs and schedule is not None and not self._observes
        self._skipped = frozenset()
        self._schedule = schedule

    def begin_step(self, step: StepInfo) -> None:
        self._note_memory()
        self._step = step
        self.finite_watch.clear()
        self._ahead.clear()
        # read once per step: the input skip, the step-ahead correction and the compiled plan use it
        self._reused_now = self._schedule.cached_sites(step.index) if self._schedule is not None else []
        self._skipped = frozenset(self._reused_now) if self._skip_on else frozenset()
        if self._ahead_on and (self.step_ahead or any(t.is_cuda for t in self.store.values())):
            self._correct_step(step)
            self._note_memory()

    def end_run(self) -> None:
        self._note_memory()
        self._step = None
        self.store.clear()
        self._ahead.clear()
        self._skipped = frozenset()
        self._reused_now = []

    def _correct_step(self, step: StepInfo) -> None:
        """Make the corrected feature of every site the schedule reuses at ``step`` (into ``_ahead``)."""
        start = time.perf_counter()
        # a site reused before it was ever stored is left to the call, which names the problem
        sites = [site for site in self._reused_now if site in self.store]
        if sites:
            stages = [[self.store[site] for site in sites]]  # what each corrector is handed, then its output
            for corrector in self.correctors:
                stages.append(corrector.correct_step(step, sites, stages[-1]))
            # the finite sums in the per-call order: site by site, then corrector by corrector
            for i, site in enumerate(sites):
                for k, corrector in enumerate(self.correctors):
                    if stages[k + 1][i] is not stages[k][i]:
                        self.finite_watch.note(site, corrector.name, stages[k + 1][i])
            self._ahead.update(zip(sites, stages[-1]))
        self.corrector_seconds += time.perf_counter() - start

    # -- what the wrappers do -----------------------------------------------------------------
    def _block_forward(self, index: int, depth: int, original):
        def forward(*args, **kwargs):
            step = self._step
            if step is None:
                return original(*args, **kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            batch = hidden.shape[0]
            if index == 0 and not hidden.is_contiguous():
                hidden = hidden.contiguous()  # the same values in row order (module docstring)
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            if index == 0:
                self.counters.forward(step.index, batch)
                self._trunk_reused = self.policy.uses_trunk and self.policy.trunk_action(step).kind is Kind.REUSE
            if self._trunk_reused and not self.policy.runs_in_reused_trunk(step, index):
                self.counters.block(step.index, batch, skipped=True)
                for branch in self.branches:
                    self.counters.site(step.index, branch, batch, 0)
                # the whole stack is skipped: pass the stream through, the last block hands back
                # the stored output of the block stack
                return self._stored(TRUNK, batch) if index == depth - 1 else hidden
            self.counters.block(step.index, batch, skipped=False)
            out = original(*args, **kwargs)
            if self._trunk_reused:
                # a block the policy runs although the stack is reused: its sites are computed and
                # stored as usual; its output passes through the skipped blocks and the last block
                # still hands back the stored stack output
                return self._stored(TRUNK, batch) if index == depth - 1 else out
            if index == depth - 1 and self.policy.uses_trunk:
                self.store[TRUNK] = out
            return out

        return forward

    def _site_forward(self, site: Site, original):
        def forward(*args, **kwargs):
            step = self._step
            if step is None:
                return original(*args, **kwargs)
            action = self.policy.action(step, site)
            x = args[0] if args else kwargs["hidden_states"]
            batch, tokens = x.shape[0], x.shape[1]  # (B, N, C)
            if action.kind is Kind.COMPUTE:
                out = original(*args, **kwargs)
                if self._keep[site]:
                    self.store[site] = out
                tokens_run = tokens
            elif action.kind is Kind.REUSE:
                out = self._stored(site, batch)
                ahead = self._ahead.pop(site, None)  # popped: a second call in the step corrects per call
                if ahead is not None:
                    out = ahead
                elif self.correctors:
                    start = time.perf_counter()
                    for corrector in self.correctors:
                        given, out = out, corrector.correct(step, site, out)
                        if out is not given:  # a feature handed back unchanged cannot have turned non-finite
                            self.finite_watch.note(site, corrector.name, out)
                    self.corrector_seconds += time.perf_counter() - start
                tokens_run = 0
            else:
                out = self._partial(site, action.tokens, original, args, kwargs)
                tokens_run = action.tokens.shape[1]
            self.counters.site(step.index, site.branch, batch, tokens_run)
            if self._observes:
                extra = {"kwargs": kwargs} if self.policy.observes_kwargs else {}
                spent = self.policy.observe(step, site, action, args, out, **extra)
                if spent:
                    self.counters.extra(step.index, spent)
            if self.correctors:
                start = time.perf_counter()
                for corrector in self.correctors:
                    corrector.observe(step, site, action.kind, out)
                self.corrector_seconds += time.perf_counter() - start
            return out

        return forward

    def _input_forward(self, site: Site, original):
        def forward(x, *args, **kwargs):
            if site in self._skipped:
                # the site is reused, so the block discards what this makes: one token keeps every
                # other output (adaLN-Zero's gates) whole and the shapes broadcasting as before
                return original(x[:, :1], *args, **kwargs)  # (B, 1, C)
            return original(x, *args, **kwargs)

        return forward

    def _partial(self, site: Site, tokens: torch.Tensor, original, args, kwargs) -> torch.Tensor:
        """Run a token-wise sub-module on the chosen tokens only and scatter into the cache."""
        if site.branch not in TOKENWISE:
            raise ValueError(f"PARTIAL needs a token-wise sub-module; {site} is not (MLP and cross-attention sites are)")
        if not args:
            raise ValueError("PARTIAL needs the sub-module's input as its first positional argument")
        x = args[0]  # (B, N, C)
        stored = self._stored(site, x.shape[0])  # (B, N, C_out)
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"PARTIAL tokens are for batch {tokens.shape[0]}, the input has {x.shape[0]}")
        picked = x.gather(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, k, C)
        fresh = original(picked, *args[1:], **kwargs)  # (B, k, C_out)
        out = stored.scatter(1, tokens.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)  # (B, N, C_out)
        self.store[site] = out
        return out

    def _stored(self, site: Site, batch: int) -> torch.Tensor:
        feature = self.store.get(site)
        if feature is None:
            raise ValueError(
                f"policy {self.policy.name!r} reuses {site} at step {self._step.index} "
                "before it was ever computed in this run"
            )
        if feature.shape[0] != batch:
            raise ValueError(f"cached {site} has batch {feature.shape[0]}, this call has {batch}")
        return feature

    # -- reporting ----------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes held now by the feature store and the correctors' state."""
        held = {id(t): t for t in [*self.store.values(), *self._ahead.values()]}  # each tensor once
        store = sum(t.numel() * t.element_size() for t in held.values())
        return store + sum(c.memory_bytes() for c in self.correctors)

    def _note_memory(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes())

    def report(self) -> dict:
        """What ran in the last sampling call: compute fraction, MACs ratio, cache memory, and the
        seconds spent inside the correctors (host wall-clock: exact on the CPU; on a GPU, whose
        kernels run asynchronously, it counts only their launch cost)."""
        return {
            **self.counters.report(),
            "cache_peak_bytes": self.peak_bytes,
            "corrector_seconds": self.corrector_seconds,
            "policy": self.policy.describe(),
            "correctors": [c.describe() for c in self.correctors],
        }


def apply_cache(model: nn.Module, policy: Optional[Policy] = None, correctors: Sequence[Corrector] = ()) -> CacheEngine:
    """Install a CacheEngine on ``model`` and return it (``engine.remove()`` undoes it)."""
    return CacheEngine(model, policy, correctors).install()
