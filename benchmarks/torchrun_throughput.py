"""Sampling throughput on 2 processes (torchrun) against 1, on the same cores, and the samples compared.

Each repeat runs, taking turns (1 process first in odd repeats, 2 first in even ones):

    1 process : OMP_NUM_THREADS=2 taskset -c CORES python -m ditcache.cli.main sample ...
    2 processes: OMP_NUM_THREADS=1 taskset -c CORES torchrun --standalone --nproc_per_node=2 -m ditcache.cli.main sample ...

the same samples (--num-samples, --batch-size, the default model, DDIM-20, cfg 1.5, no cache unless
--policy), into a fresh folder each time. It prints, per run, the wall-clock of the whole command
(process start, model load, sampling, assembling samples.npz) and the sampling seconds rank 0
reports, then samples/s from the median wall-clock, whether every samples.npz is byte-identical to
the first one, and the load average before and after (the machine's other jobs share the cores).

    PYTHONPATH=src python benchmarks/torchrun_throughput.py                  # 256 samples, 3 repeats
    PYTHONPATH=src python benchmarks/torchrun_throughput.py --num-samples 512 --repeats 5 --cores 0,1
"""

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def command(procs: int, cores: str, args, out: Path) -> tuple[list, dict]:
    sample = ["-m", "ditcache.cli.main", "sample", "--num-samples", str(args.num_samples), "--batch-size",
              str(args.batch_size), "--out", str(out), "--no-progress", "--json"]
    if args.policy:
        sample += ["--policy", args.policy]
    threads = args.threads // procs  # the same total threads either way
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    launch = [sys.executable] if procs == 1 else ["torchrun", "--standalone", f"--nproc_per_node={procs}"]
    return ["taskset", "-c", cores, *launch, *sample], env


def run_once(procs: int, args, root: Path, tag: str) -> dict:
    out = root / tag
    shutil.rmtree(out, ignore_errors=True)  # never resume from an earlier repeat
    cmd, env = command(procs, args.cores, args, out)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"procs": procs, "wall": wall, "rank0_seconds": report["seconds"], "npz": out / "samples.npz"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--policy", default=None, help="a cache policy for both (default: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", default="0,1", help="taskset core list for both layouts (default 0,1)")
    p.add_argument("--threads", type=int, default=2, help="total threads: 1 process x T or 2 x T/2 (default 2)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="torchrun-bench-"))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cores {args.cores}, "
          f"{args.threads} threads in all, {args.num_samples} samples, batch {args.batch_size}", flush=True)
    runs = []
    for r in range(args.repeats):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for procs in order:
            run = run_once(procs, args, root, f"p{procs}-r{r}")
            runs.append(run)
            print(f"  repeat {r + 1}/{args.repeats}, {procs} process(es): {run['wall']:.2f} s wall-clock, "
                  f"rank 0 sampled for {run['rank0_seconds']:.2f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    first = runs[0]["npz"]
    identical = all(filecmp.cmp(first, r["npz"], shallow=False) for r in runs[1:])
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'layout':<28}{'wall s (median, min-max)':>28}{'samples/s':>11}{'rank-0 sampling s':>19}")
    medians = {}
    for procs, label in ((1, f"1 process x {args.threads} threads"), (2, f"2 processes x {args.threads // 2} thread(s)")):
        walls = [r["wall"] for r in runs if r["procs"] == procs]
        sampling = statistics.median(r["rank0_seconds"] for r in runs if r["procs"] == procs)
        medians[procs] = statistics.median(walls)
        print(f"{label:<28}{medians[procs]:>12.2f} ({min(walls):.2f}-{max(walls):.2f}){'':>4}"
              f"{args.num_samples / medians[procs]:>11.2f}{sampling:>19.2f}")
    print(f"2 processes / 1 process throughput: {medians[1] / medians[2]:.2f}x (median wall-clock)")
    print(f"samples.npz byte-identical across all {len(runs)} runs: {identical}")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
