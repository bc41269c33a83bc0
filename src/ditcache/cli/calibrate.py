"""`ditcache calibrate`: the calibrations the correctors need, and views of what they will do.

- ``calibrate eoc``: extract the prior (mean pre-gate outputs of every site at every step, over K
  uncached samples) that EOC corrects with and GOC detects inflections on;
- ``calibrate goc --prior PATH``: GOC's per-step direction statistic and the steps it excludes;
- ``calibrate eoc-plan --policy SPEC --corrector eoc:prior=PATH``: which cached blocks EOC corrects.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..calibration.prior import DTYPES, extract_prior, load_prior
from ..correctors.base import CORRECTORS
from ..models.loading import load_model
from ..policies.base import POLICIES
from ..registry import parse_spec
from ..outdir import claim
from .common import (add_model_args, add_overwrite_arg, add_pipeline_args, add_sampling_args, print_json, sample_config,
                     wants_pipeline)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="calibrate correctors (EOC prior, GOC inflections) and inspect them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args: p.print_help() or 2)
    targets = p.add_subparsers(dest="target", metavar="TARGET")

    e = targets.add_parser("eoc", help="extract the prior used by eoc (and by goc's prior=)",
                           description="Run K uncached sampling passes with the target model and sampler settings "
                                       "and average every block's pre-gate attention and MLP output per step, "
                                       "keeping the CFG halves apart. The result is keyed to the model, sampler, "
                                       "steps, cfg scale and resolution. Resumable: an interrupted run continues "
                                       "from OUT/partial when started again with the same settings.")
    add_model_args(e)
    add_sampling_args(e, num_samples=1000)
    add_pipeline_args(e)
    _set_help(e, "num_samples", "K, the uncached samples averaged (default: 1000; the authors used 1000, one per "
                                "ImageNet class)")
    _set_help(e, "labels", "comma-separated class labels, repeated to fill K (default: cycle 0..num_classes-1)")
    e.add_argument("--out", default=None, help="artifact folder (default: runs/prior-<model>-<sampling>)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="storage of the means; float16 halves the size (default: float32)")
    e.add_argument("--checkpoint-every", type=int, default=1,
                   help="batches between writes of the resumable partial state (default: 1)")
    e.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches, leaving OUT/partial to resume from (split a long job)")
    add_overwrite_arg(e)
    e.add_argument("--json", action="store_true", help="print one JSON report (size, seconds, forwards)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_eoc)

    g = targets.add_parser("goc", help="goc's inflection statistic and excluded steps, from a prior",
                           description="Print, per step v, the mean over sites of cos(P[v+1]-P[v], P[v]-P[v-1]) of "
                                       "the prior's mean features; v is an inflection where it is negative, and goc "
                                       "(prior=PATH) does not compensate at steps t whose window [t-2, t] holds one.")
    g.add_argument("--prior", required=True, help="a prior artifact from `ditcache calibrate eoc`")
    g.add_argument("--policy", default=None, help="also list which cached steps of this static policy goc compensates")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=run_goc)

    pl = targets.add_parser("eoc-plan", help="which cached (step, block) eoc corrects under a static policy")
    pl.add_argument("--policy", default="rule:preset=rm-50", help="a static policy spec (default: rule:preset=rm-50)")
    pl.add_argument("--corrector", required=True, help="the eoc spec, e.g. eoc:prior=PATH,lam=0.2,tau=0.5")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=run_eoc_plan)


def _set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in parser._actions:
        if action.dest == dest:
            action.help = text


def _extract(args):
    """(model name, fingerprint, ExtractResult): from a diffusers pipeline with prompts / labels, or a DiT."""
    progress = not (args.json or args.no_progress)
    common = {"dtype": args.dtype, "progress": progress, "checkpoint_every": args.checkpoint_every,
              "max_batches": args.max_batches, "device": args.device}
    if wants_pipeline(args):
        from ..pipelines.calibration import extract_pipeline_prior, pipeline_key
        from ..pipelines.sampling import load_pipeline, set_scheduler
        from .sample_pipeline import pipeline_job

        job = pipeline_job(args)
        pipe = load_pipeline(args.model, device=args.device)
        scheduler = set_scheduler(pipe, args.scheduler)
        if not progress:
            pipe.set_progress_bar_config(disable=True)
        name = Path(args.model).name or args.model.replace("/", "_")
        out = args.out or f"runs/prior-{name}-{scheduler}{job.steps}-cfg{job.guidance_scale:g}"
        with claim(out, None, args.overwrite):
            result = extract_pipeline_prior(pipe, job, out, **common)
        return args.model, pipeline_key(pipe, job).model_fingerprint, result
    config = sample_config(args)
    # the VAE only decodes images, which a prior does not need
    loaded = load_model(args.model, vae=None, device=args.device, num_heads=args.num_heads)
    out = args.out or f"runs/prior-{loaded.name}-{config.sampler}{config.steps}-cfg{config.cfg_scale:g}"
    with claim(out, None, args.overwrite):
        result = extract_prior(loaded, config, out, **common)
    return loaded.name, loaded.fingerprint, result


def run_eoc(args) -> int:
    name, model_fingerprint, result = _extract(args)
    r = {"model": name, "fingerprint": model_fingerprint, **result.report}
    if args.json:
        print_json(r)
    elif r["finished"]:
        print(("already extracted: " if r.get("reused") else "") + f"prior of K={r['K']} samples ({r['sampler']}-{r['steps']}, cfg {r['cfg_scale']:g}) -> {r['path']}: "
              f"{r['bytes'] / 1e6:.2f} MB {r['dtype']}, {r['seconds']:.1f} s, {r['forwards']} sample forwards "
              f"({r['model_calls']} model calls)")
    else:
        print(f"stopped after {r['K']} of {args.num_samples} samples; partial state in {result.path}; "
              "run the same command again to resume")
    return 0


def run_goc(args) -> int:
    from ..correctors.goc import inflection_report

    prior = load_prior(args.prior)
    report = {"prior": args.prior, **inflection_report(prior)}
    if args.policy:
        schedule = _schedule(args.policy, prior)
        cached = [t for t in range(schedule.num_steps) if schedule.cached[t].any()]
        excluded = set(report["excluded"])
        report["policy"] = args.policy
        report["compensated"] = [t for t in cached if t >= 2 and t not in excluded]
    if args.json:
        print_json(report)
        return 0
    print("step  cos(D_v+1, D_v)  inflection")
    for v, c in enumerate(report["cosine"]):
        text = "      -" if c is None else f"{c:+.4f}"
        print(f"{v:4d}  {text:>15}  {'yes' if v in report['inflections'] else ''}")
    print(f"inflections: {report['inflections']}")
    print(f"excluded steps (window [t-2, t] holds an inflection): {report['excluded']}")
    if args.policy:
        print(f"{args.policy}: compensated cached steps {report['compensated']}")
    return 0


def run_eoc_plan(args) -> int:
    from ..correctors.eoc import EocCorrector, plan_text

    corrector = parse_spec(CORRECTORS, args.corrector)
    if not isinstance(corrector, EocCorrector):
        raise ValueError(f"--corrector must be an eoc spec, got {args.corrector!r}")
    prior = load_prior(corrector.config.prior)
    run = prior.run_info()
    corrector.reset(run)
    schedule = _schedule(args.policy, prior)
    entries = corrector.plan(schedule)
    if args.json:
        print_json({"policy": args.policy, "corrector": corrector.describe(),
                    "entries": [e.__dict__ for e in entries]})
        return 0
    fired = sum(e.optimised for e in entries)
    print(f"{args.policy} + {args.corrector}: corrects {fired} of {len(entries)} cached blocks "
          "('o' corrected, 'c' cached only, '.' computed)")
    print(plan_text(entries, run.num_steps, run.depth))
    return 0


def _schedule(policy_spec: str, prior):
    """The static schedule a policy spec gives on the run the prior was made for."""
    policy = parse_spec(POLICIES, policy_spec)
    policy.reset(prior.run_info())
    schedule = policy.schedule()
    if schedule is None:
        raise ValueError(f"policy {policy_spec!r} has no static schedule to plan over")
    return schedule
