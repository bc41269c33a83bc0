"""Fault injection (a benchmark, not CI): kill each long command at random points, resume, compare.

For every long command (sample, compare, calibrate eoc, train-router, train) this runs it once
uninterrupted into ``ref/``, then into ``run/`` again and again, each time killed (SIGKILL, or
SIGINT for a share of the trials) after a random delay drawn between start-up and the
uninterrupted duration, until a run finishes by itself. The resumed result must then equal the
uninterrupted one exactly: the arrays of samples.npz, the tensors of an artifact or exported model,
and the quality figures of a comparison (timings excluded, since they are measured, not computed).

    OMP_NUM_THREADS=1 nice python benchmarks/fault_kill_resume.py --trials 3 --seed 0

Prints one line per trial and a summary with the counts: trials, kills, kills that landed after
some result was on disk, and trials whose resumed result differed (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

SMALL = ["--steps", "6", "--batch-size", "2"]


def commands(work: Path) -> dict:
    """name -> (argv builder given an output folder, comparer of two output folders)."""
    return {
        "sample": (lambda out: ["sample", "--num-samples", "16", *SMALL, "--policy", "fora:interval=2",
                                "--out", str(out), "--no-progress"], same_npz),
        "compare": (lambda out: ["compare", "--num-samples", "12", *SMALL, "--cache", "rule:preset=rm-50",
                                 "--cache", "fora:interval=3", "--repeats", "0", "--out", str(out), "--json"],
                    same_compare),
        "calibrate-eoc": (lambda out: ["calibrate", "eoc", "--num-samples", "12", *SMALL, "--out", str(out),
                                       "--no-progress"], same_artifact),
        "train-router": (lambda out: ["train-router", "--steps", "6", "--data", "trajectories", "--trajectories", "4",
                                      "--batch-size", "4", "--iterations", "24", "--checkpoint-every", "4",
                                      "--out", str(out), "--no-progress"], same_router),
        "train": (lambda out: ["train", "--data", str(work / "mnist"), "--iterations", "40", "--checkpoint-every", "8",
                               "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--batch-size", "8",
                               "--out", str(out), "--export", str(out) + ".safetensors", "--no-progress"],
                  same_export),
    }


def same_npz(a: Path, b: Path) -> bool:
    with np.load(a / "samples.npz") as x, np.load(b / "samples.npz") as y:
        return np.array_equal(x["arr_0"], y["arr_0"]) and np.array_equal(x["labels"], y["labels"])


def same_compare(a: Path, b: Path) -> bool:
    drop = ("sample_seconds", "speedup", "speedup_min", "speedup_max", "warning")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in json.loads((d / "compare.json").read_text())]
            for d in (a, b)]
    folders = [p.parent.name for p in a.glob("*/samples.npz")]
    return rows[0] == rows[1] and all(same_npz(a / f, b / f) for f in folders) and len(folders) == len(rows[0])


def _same_tensors(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def same_artifact(a: Path, b: Path) -> bool:
    return _same_tensors(load_file(str(a / "tensors.safetensors")), load_file(str(b / "tensors.safetensors")))


def same_router(a: Path, b: Path) -> bool:
    return same_artifact(a / "router", b / "router")


def same_export(a: Path, b: Path) -> bool:
    return _same_tensors(load_file(f"{a}.safetensors"), load_file(f"{b}.safetensors"))


def launch(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ditcache.cli.main", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def has_progress(out: Path) -> bool:
    """Something resumable is on disk (a shard, a partial, a checkpoint, a finished row)."""
    return out.exists() and any(p.is_file() and p.name != "run.json" for p in out.rglob("*"))


def trial(name: str, build, same, ref: Path, out: Path, seconds: float, env: dict, rng: random.Random,
          max_kills: int) -> dict:
    """Kill-and-resume until a run finishes; then compare with the reference."""
    kills = landed = 0
    while True:
        proc = launch(build(out), env)
        if kills < max_kills:
            delay = rng.uniform(0.5, seconds)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                sig = signal.SIGINT if rng.random() < 0.25 else signal.SIGKILL
                os.killpg(proc.pid, sig)
                proc.wait()
                kills += 1
                landed += has_progress(out)
                continue
        err = proc.communicate(timeout=1200)[1].decode()
        if proc.returncode != 0:
            return {"command": name, "kills": kills, "landed": landed, "ok": False, "error": err.strip()[-300:]}
        return {"command": name, "kills": kills, "landed": landed, "ok": same(ref, out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="kill-and-resume trials per command (default: 3)")
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial before it may finish (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="commands to test (default: all)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ditcache-fault-"))
    env = {**os.environ, "DITCACHE_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    _tiny_mnist(work / "mnist")
    results = []
    try:
        for name, (build, same) in commands(work).items():
            if args.only and name not in args.only:
                continue
            ref = work / f"{name}-ref"
            start = time.perf_counter()
            proc = launch(build(ref), env)
            err = proc.communicate()[1].decode()
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{name}: the uninterrupted run failed: {err.strip()[-300:]}")
                return 1
            for t in range(args.trials):
                out = work / f"{name}-run{t}"
                r = trial(name, build, same, ref, out, seconds, env, rng, args.max_kills)
                results.append(r)
                print(f"{name} trial {t}: {r['kills']} kills ({r['landed']} after progress), "
                      f"{'identical' if r['ok'] else 'DIFFERENT ' + r.get('error', '')} (uninterrupted {seconds:.1f} s)",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = sum(not r["ok"] for r in results)
    print(f"summary: {len(results)} trials, {sum(r['kills'] for r in results)} kills "
          f"({sum(r['landed'] for r in results)} after progress was on disk), {bad} differing results")
    return 1 if bad else 0


def _tiny_mnist(folder: Path) -> None:
    """A 64-image IDX pair in MNIST's layout, so `train` runs without the real data."""
    import gzip

    from ditcache.data import mnist

    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = gen.integers(0, 10, 64, dtype=np.uint8)
    (folder / mnist.IMAGES_FILE).write_bytes(gzip.compress(np.array([2051, 64, 28, 28], ">i4").tobytes()
                                                           + images.tobytes()))
    (folder / mnist.LABELS_FILE).write_bytes(gzip.compress(np.array([2049, 64], ">i4").tobytes() + labels.tobytes()))


if __name__ == "__main__":
    sys.exit(main())
