"""diffusers' own cache hooks as ``bench --peers`` systems: ``diffusers:NAME:k=v,...``.

``DiTTransformer2DModel`` has no ``enable_cache`` (it is not a ``CacheMixin``), so each cache is
applied with diffusers' public ``apply_*`` function, and the loop sets the cache context diffusers'
stateful hooks read (``cache_context`` in a pipeline). Names and options:

- ``taylorseer``: ``interval`` (N), ``order`` (max_order), ``warmup`` (disable_cache_before_step);
  hooked on every block's ``attn1`` and ``ff`` (diffusers' default patterns look for modules ending
  in "attn", which a DiT's ``attn1`` does not, so nothing would be cached), float32 factors;
- ``fbc``: FirstBlockCache, ``threshold``;
- ``pab``: PyramidAttentionBroadcast on self-attention, ``skip`` (block skip range) and the
  timestep range ``low``..``high`` where it may skip (diffusers' default 100..800);
- ``fastercache``: FasterCache with its defaults, ``skip`` (attention skip range);
- ``magcache``: MagCache, ``threshold``; it needs ``mag_ratios`` calibrated for the model, which
  this bench does not compute, so it is reported as not run.
"""

from __future__ import annotations

from .peers import NotApplicable, System

# self-attention, MLP and (PixArt) cross-attention of every block, the sites ditcache caches
_BLOCK_SITES = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.attn2", r"transformer_blocks\.\d+\.ff"]


def _options(text: str) -> dict[str, float]:
    """'interval=2,order=2' -> {'interval': 2.0, 'order': 2.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"peer option {part!r} is not key=value")
        out[key.strip()] = float(value)
    return out


class DiffusersCache(System):
    """A diffusers hook-based cache on one transformer copy."""

    def __init__(self, transformer, name: str):
        self.transformer = transformer
        self.label = f"diffusers {name}"
        self.timestep = 0.0

    def _context(self, step) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.transformer, CacheContext("cond", step_index=getattr(step, "index", None),
                                                          num_inference_steps=getattr(step, "num_steps", None),
                                                          timestep=self.timestep))

    def begin_run(self, info) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
        self._context(None)

    def begin_step(self, step) -> None:
        self.timestep = float(step.timestep)
        self._context(step)

    def end_run(self) -> None:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)


def diffusers_system(transformer, spec: str) -> DiffusersCache:
    """Apply the diffusers cache named in ``spec`` ('taylorseer:interval=2,order=2') to ``transformer``."""
    try:
        import diffusers.hooks as hooks
    except ImportError as err:
        raise NotApplicable(f"diffusers is not installed ({err})") from None
    name, _, rest = spec.partition(":")
    o = _options(rest)
    system = DiffusersCache(transformer, name)
    try:
        if name == "taylorseer":
            import torch

            hooks.apply_taylorseer_cache(transformer, hooks.TaylorSeerCacheConfig(
                cache_interval=int(o.get("interval", 5)), max_order=int(o.get("order", 1)),
                disable_cache_before_step=int(o.get("warmup", 3)), taylor_factors_dtype=torch.float32,
                cache_identifiers=_BLOCK_SITES))
        elif name == "fbc":
            hooks.apply_first_block_cache(transformer, hooks.FirstBlockCacheConfig(threshold=o.get("threshold", 0.05)))
        elif name == "pab":
            hooks.apply_pyramid_attention_broadcast(transformer, hooks.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(o.get("skip", 2)),
                spatial_attention_timestep_skip_range=(int(o.get("low", 100)), int(o.get("high", 800))),
                current_timestep_callback=lambda: system.timestep))
        elif name == "fastercache":
            hooks.apply_faster_cache(transformer, hooks.FasterCacheConfig(
                spatial_attention_block_skip_range=int(o.get("skip", 2)),
                current_timestep_callback=lambda: system.timestep, tensor_format="BCHW"))
        elif name == "magcache":
            raise NotApplicable("MagCache needs mag_ratios calibrated for this model (MagCacheConfig(calibrate=True) "
                                "on an uncached run); not computed by this bench")
        else:
            raise ValueError(f"unknown diffusers cache {name!r}; choose from taylorseer, fbc, pab, fastercache, magcache")
    except NotApplicable:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as err:
        if isinstance(err, ValueError) and str(err).startswith("unknown diffusers cache"):
            raise
        raise NotApplicable(f"diffusers {name} does not apply to {type(transformer).__name__}: "
                            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return system
