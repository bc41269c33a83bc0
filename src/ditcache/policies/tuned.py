"""``tuned:path=DIR``: the configuration ``ditcache tune`` found, read back from its artifact.

The factory returns the tuned configuration's own policy (a rule step set, FORA, ToCa, ...), so the
engine sees exactly what ``tune`` measured; its correctors (e.g. GOC) ride along as
``tuned_correctors``, which ``parse_cache`` and ``build_cache`` append. At the start of every run the
artifact's key (model, sampler, steps, CFG scale, resolution) is checked against the run: a
configuration tuned for 20 steps is refused at 50.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import register_policy


@dataclass(frozen=True)
class TunedConfig:
    path: Optional[str] = None  # a folder written by `ditcache tune` (tuned-<target>)


@register_policy("tuned", TunedConfig, "the configuration found by `ditcache tune` (path=its tuned-... folder)")
def _tuned(config: TunedConfig):
    from ..calibration.artifact import ArtifactKey, load_artifact
    from ..tune.report import TUNED_KIND
    from ..bench.compare import parse_cache

    if not config.path:
        raise ValueError("tuned needs path=DIR, a folder written by `ditcache tune`")
    artifact = load_artifact(config.path, kind=TUNED_KIND)
    spec = artifact.meta["spec"]
    if spec.startswith("tuned"):
        raise ValueError(f"{config.path}: a tuned configuration cannot point at another tuned one")
    policy, correctors = parse_cache(spec)
    inner_reset = policy.reset

    def reset(run):
        artifact.check(TUNED_KIND, ArtifactKey.from_run(run))
        inner_reset(run)

    policy.reset = reset  # an instance attribute: the engine calls policy.reset(run)
    policy.tuned_correctors = correctors
    policy.tuned_spec = spec
    return policy
