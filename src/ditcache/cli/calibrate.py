"""`ditcache calibrate`: the calibrations the correctors need, and views of what they will do.

- ``calibrate eoc``: extract the prior (mean pre-gate outputs of every site at every step, over K
  uncached samples) that EOC corrects with and GOC detects inflections on;
- ``calibrate goc --prior PATH``: GOC's per-step direction statistic and the steps it excludes;
- ``calibrate eoc-plan --policy SPEC --corrector eoc:prior=PATH``: which cached blocks EOC corrects;
- ``calibrate eoc-fit --prior PATH``: fit EOC's γ (least squares, sign included) on uncached
  samples and store it in the prior, for ``eoc:prior=PATH,fit=branch|block|step``;
- ``calibrate forecast-fit --prior PATH``: store uncached trajectories' Gram sums in the prior, for
  ``forecast:prior=PATH,fit=site|step`` (least-squares order and weight per site);
- ``calibrate reuse-cost [--router DIR]``: what reusing each sub-layer at each L2C cache step costs,
  and how far trained routers rank their sub-layers by it (rather than by their initial logits).
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

    f = targets.add_parser(
        "eoc-fit", help="fit eoc's γ on uncached samples and store it in the prior (eoc:...,fit=branch)",
        description="Sample K uncached trajectories with the prior's settings and accumulate, for every one-step "
                    "reuse (feature of step t-1 reused at t), the least-squares sums of EOC's correction; store them "
                    "in the prior, so that eoc:prior=PATH,fit=branch|block|step uses the fitted γ. Prints the "
                    "fitted γ and the share of the squared reuse error each variant removes. With --holdout the "
                    "prior is left alone and the γ fitted earlier is scored on these (new) samples.")
    _add_fit_args(f, batch_size=100)
    f.set_defaults(func=run_eoc_fit)

    ff = targets.add_parser(
        "forecast-fit", help="record uncached trajectories' Gram sums in the prior for forecast:prior=PATH,fit=site",
        description="Sample K uncached trajectories with the prior's settings and store, per site, the Gram matrix "
                    "of its features over the steps (summed over samples) in the prior; forecast:prior=PATH,fit=site|step "
                    "then picks the least-squares order and weight per site and reuse pattern. Prints the share of "
                    "the squared feature error of plain reuse that the unfitted and fitted forecasts remove under "
                    "every-N-th-step schedules. With --holdout the prior is left alone and the stored fit is scored "
                    "on these (new) samples.")
    _add_fit_args(ff, batch_size=50)
    ff.add_argument("--order", type=int, default=2, help="highest order scored and fitted (default: 2)")
    ff.set_defaults(func=run_forecast_fit)

    r = targets.add_parser(
        "reuse-cost", help="L2C diagnostic: the cost of reusing each sub-layer, and routers ranked against it",
        description="On the model's own uncached DDIM trajectories (no guidance, as router training), measure for "
                    "every cache step s and sub-layer j the mean squared error of the model output at s when only "
                    "j reuses its output of step s-1: the MSE term of the L2C loss with one sub-layer cached. "
                    "With --router, also measure each sub-layer's marginal cost in that router's context (the others "
                    "blended at the router's β) and print per cache step the Spearman rank correlation of the "
                    "router's logits with both maps and with its initial logits.")
    r.add_argument("--model", default="mnist", help="model (default: mnist)")
    r.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    r.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    r.add_argument("--trajectories", type=int, default=128, help="uncached trajectories averaged (default: 128)")
    r.add_argument("--batch-size", type=int, default=64, help="trajectories per forward (default: 64)")
    r.add_argument("--seed", type=int, default=1, help="seed of the trajectories' noise and labels (default: 1)")
    r.add_argument("--cfg-scale", type=float, default=1.5,
                   help="recorded in the map's key like a router's; the measurement has no guidance (default: 1.5)")
    r.add_argument("--cost", default=None, help="read this cost map (an earlier --out) instead of measuring one "
                                               "(the context maps of --router are still measured)")
    r.add_argument("--out", default=None, help="where to write the map (default: runs/reuse-cost-<model>-ddim<steps>)")
    r.add_argument("--router", action="append", default=[], help="an l2c-router artifact to rank (repeatable)")
    r.add_argument("--threshold", type=float, default=0.1, help="θ for the cached counts (default: 0.1)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run_reuse_cost)


def _add_fit_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The arguments every fit on a prior takes (``eoc-fit``, ``forecast-fit``)."""
    p.add_argument("--prior", required=True, help="a prior artifact from `ditcache calibrate eoc`")
    p.add_argument("--model", default="mnist", help="the prior's model (default: mnist)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--num-samples", type=int, default=200, help="K uncached samples (default: 200)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per batch (default: {batch_size})")
    p.add_argument("--seed", type=int, default=1, help="sampling seed; use another one with --holdout (default: 1)")
    p.add_argument("--holdout", action="store_true", help="score the stored fit on these samples, store nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
        from .sample_pipeline import open_pipeline, pipeline_job, pipeline_name

        job = pipeline_job(args)
        pipe, scheduler = open_pipeline(args, progress)
        name = pipeline_name(args.model)
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


def run_reuse_cost(args) -> int:
    from ..calibration.artifact import ArtifactKey, load_artifact, save_artifact
    from ..calibration.reuse_cost import (COST_KIND, agreement_report, check_pair, cost_artifact, ranking_report,
                                          reuse_cost_map, router_logits)
    from ..calibration.train_router import TrajectoryStates

    routers = {path: router_logits(path) for path in args.router}
    progress = not (args.json or args.no_progress)
    loaded, states = None, None
    if args.cost:
        artifact = load_artifact(args.cost, COST_KIND)
        key, out = artifact.key, args.cost
    else:
        loaded = load_model(args.model, vae=None, device=args.device)
        key = ArtifactKey.for_run(loaded, "ddim", args.steps, args.cfg_scale)
    for path, (router, _, _) in routers.items():  # refuse a mismatch before measuring anything
        check_pair(router, key, path)
    if routers or not args.cost:
        loaded = loaded or load_model(args.model, vae=None, device=args.device)
        if loaded.fingerprint != key.model_fingerprint:
            raise ValueError(f"--model {args.model} is not the model of the cost map {args.cost}")
        states = TrajectoryStates(loaded, key.steps, args.trajectories, args.seed, batch_size=args.batch_size,
                                  progress=progress)
    if not args.cost:
        costs = reuse_cost_map(loaded, args.steps, states, args.batch_size, progress=progress)
        artifact = cost_artifact(loaded, args.steps, costs, {"trajectories": args.trajectories, "seed": args.seed,
                                                              "cfg_scale": args.cfg_scale, "guidance": "none"})
        out = args.out or f"runs/reuse-cost-{loaded.name}-ddim{args.steps}"
        save_artifact(artifact, out)
    cost = artifact.tensors["cost"]
    report = {"cost_map": str(out), "steps": artifact.key.steps, "cost": [
        None if bool(row.isnan().any()) else [float(v) for v in row] for row in cost], "routers": {}}
    for path, (_, logits, init) in routers.items():
        context = reuse_cost_map(loaded, key.steps, states, args.batch_size, progress=progress, logits=logits)
        report["routers"][path] = ranking_report(logits, cost, init, args.threshold, context)
    paths = list(routers)
    report["agreement"] = {p: agreement_report(routers[paths[0]][1], routers[p][1], routers[paths[0]][2], routers[p][2])
                           for p in paths[1:]}
    if args.json:
        print_json(report)
        return 0
    print(f"reuse cost (mean squared output error, only that sub-layer reused) -> {out}")
    width = cost.shape[1]
    print("step  " + " ".join(f"{('a' if j % 2 == 0 else 'm') + str(j // 2):>8}" for j in range(width)))
    for s, row in enumerate(cost):
        if not bool(row.isnan().any()):
            print(f"{s:4d}  " + " ".join(f"{float(v):8.2e}" for v in row))

    def fmt(v):
        return "    -" if v is None else f"{v:+.2f}"

    for path, rows in report["routers"].items():
        print(f"\nrouter {path}: Spearman of the logits per cache step with the cost alone, the cost in the "
              f"router's context and the initial logits; 'init~cost': the initial logits with the cost (chance); "
              f"'cached' at θ = {args.threshold:g}")
        print("step  vs cost  vs context  vs init  init~cost  cached")
        for r in rows:
            print(f"{r['step']:4d}  {fmt(r['spearman_cost']):>7}  {fmt(r['spearman_context']):>10}  "
                  f"{fmt(r['spearman_init']):>7}  {fmt(r['init_cost']):>9}  {r['cached']:3d}/{r['width']}")
    for path, rows in report["agreement"].items():
        print(f"\nrouter {path} against router {paths[0]}: Spearman of their logits per cache step, and of "
              "their initial logits ('-': a constant start has no ranking)")
        print("step  logits  inits")
        for r in rows:
            print(f"{r['step']:4d}  {fmt(r['spearman']):>6}  {fmt(r.get('spearman_init')):>5}")
    return 0


def _fit_inputs(args):
    """(prior, model, sampling config, progress) of a fit on a prior: K uncached samples with the
    prior's sampler, steps and guidance, labels cycling through the classes."""
    from ..sampling.generate import SampleConfig

    prior = load_prior(args.prior)
    key = prior.key
    loaded = load_model(args.model, vae=None, device=args.device)
    config = SampleConfig(num_samples=args.num_samples, batch_size=args.batch_size, sampler=key.sampler,
                          steps=key.steps, cfg_scale=key.cfg_scale, seed=args.seed,
                          labels=tuple(range(loaded.num_classes)))
    progress = not (args.json or args.no_progress)
    return prior, loaded, config, progress


def run_eoc_fit(args) -> int:
    from ..calibration.eoc_fit import fit_prior, fit_report, record_fit_sums, stored_sums

    prior, loaded, config, progress = _fit_inputs(args)
    if args.holdout:
        fitted = stored_sums(prior)
        sums, count = record_fit_sums(loaded, prior, config, progress, args.device)
        report = {"prior": args.prior, "holdout": True, "K": count, "seed": args.seed,
                  "variants": fit_report(fitted, sums)}
    else:
        report = fit_prior(loaded, args.prior, config, progress, args.device)
        sums = stored_sums(load_prior(args.prior))
        report.update(holdout=False, seed=args.seed, variants=fit_report(sums, sums))
    if args.json:
        print_json(report)
        return 0
    where = "held-out samples" if args.holdout else "the fitting samples (in-sample)"
    print(f"EOC γ fit, {report['K']} uncached samples (seed {args.seed}); share of the squared reuse error of "
          f"one-step reuses removed on {where}, correcting every reused site:")
    print(f"{'variant':<22} {'γ (attn, mlp)':>22} {'odd steps':>10} {'all steps':>10}")
    for v in report["variants"]:
        g = v["gamma"]
        text = f"{g[0]:+.4f}, {g[1]:+.4f}" if isinstance(g, list) else "per " + v["name"].split(" ")[-1]
        print(f"{v['name']:<22} {text:>22} {v['odd']:>10.2%} {v['all']:>10.2%}")
    return 0


def run_forecast_fit(args) -> int:
    from ..calibration.forecast_fit import fit_forecast_prior, fit_report, record_grams, stored_grams

    prior, loaded, config, progress = _fit_inputs(args)
    if args.holdout:
        fitted = stored_grams(prior)
        grams, count = record_grams(loaded, prior, config, progress, args.device)
        grams = {b: g.numpy() for b, g in grams.items()}
        report = {"prior": args.prior, "holdout": True, "K": count, "seed": args.seed}
    else:
        report = fit_forecast_prior(loaded, args.prior, config, progress, args.device)
        fitted = grams = stored_grams(load_prior(args.prior))
        report.update(holdout=False, seed=args.seed)
    report["intervals"] = fit_report(fitted, grams, order=args.order)
    if args.json:
        print_json(report)
        return 0
    where = "held-out samples" if args.holdout else "the fitting samples (in-sample)"
    names = list(report["intervals"][0]["removed"])
    print(f"forecast fit, {report['K']} uncached samples (seed {args.seed}); share of plain reuse's squared feature "
          f"error removed on {where}, every reused step of an every-N-th-step schedule, all sites:")
    print(f"{'N':>3} " + " ".join(f"{n:>10}" for n in names))
    for row in report["intervals"]:
        print(f"{row['interval']:>3} " + " ".join(f"{row['removed'][n]:>10.2%}" for n in names))
    return 0
