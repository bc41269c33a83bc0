"""cache-dit's DBCache as ``bench --peers`` systems: ``cache-dit:dbcache:k=v,...``.

cache-dit (PyPI ``cache-dit``, optional: ``pip install --no-deps cache-dit``) caches the residual
of the blocks after the first ``Fn`` (and before the last ``Bn``) at a step where the first blocks'
output moved less than ``threshold`` since the last computed step. It is installed on the bare
transformer through its DiT block adapter (``Pattern_3`` and its DiT patch functor, as its
``DiTPipeline`` adapter does), and its context is refreshed before every sampling run. Options:

- ``fn``, ``bn``: compute blocks at the front / back (cache-dit's defaults 8 and 0; our default
  model has 6 blocks, so ``fn=1`` is the meaningful setting);
- ``threshold``: residual_diff_threshold; ``warmup``: max_warmup_steps;
- ``taylor``: 0 (off) or the order of its TaylorSeer calibrator;
- ``mask``: N, a static steps mask computing every N-th step (``steps_computation_policy="static"``),
  the dynamic threshold off; ``steps``: the run's step count the mask and context are built for
  (default 20, this bench's DDIM-20).
"""

from __future__ import annotations

from .peers import NotApplicable, System
from .peers_diffusers import _options


class CacheDit(System):
    def __init__(self, transformer, refresh):
        self.transformer = transformer
        self.label = "cache-dit"
        self._refresh = refresh

    def begin_run(self, info) -> None:
        self._refresh(info.num_steps)


def _quiet() -> None:
    """cache-dit logs every context refresh to stdout at WARNING, which would break ``--json``: errors only."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.lower().startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


def cachedit_system(transformer, spec: str) -> CacheDit:
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
        from cache_dit.caching.patch_functors import DiTPatchFunctor
    except ImportError as err:
        raise NotApplicable(f"cache-dit is not installed ({err}); pip install --no-deps cache-dit") from None
    _quiet()
    name, _, rest = spec.partition(":")
    if name != "dbcache":
        raise ValueError(f"unknown cache-dit cache {name!r}; choose dbcache")
    o = _options(rest)
    steps = int(o.get("steps", 20))
    config = dict(Fn_compute_blocks=int(o.get("fn", 1)), Bn_compute_blocks=int(o.get("bn", 0)),
                  residual_diff_threshold=o.get("threshold", 0.08), max_warmup_steps=int(o.get("warmup", 2)),
                  enable_separate_cfg=False, num_inference_steps=steps)
    if "mask" in o:
        every = int(o["mask"])
        config.update(steps_computation_mask=[1 if s % every == 0 else 0 for s in range(steps)],
                      steps_computation_policy="static", max_warmup_steps=0)
    calibrator = None
    if int(o.get("taylor", 0)):
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=int(o["taylor"]))
    adapter = BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                           forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor())
    try:
        cache_dit.enable_cache(adapter, cache_config=DBCacheConfig(**config), calibrator_config=calibrator)
    except Exception as err:
        raise NotApplicable(f"cache-dit does not apply: {type(err).__name__}: {str(err).splitlines()[0]}") from None

    def refresh(num_steps: int) -> None:
        cache_dit.refresh_context(transformer, num_inference_steps=num_steps)

    return CacheDit(transformer, refresh)
