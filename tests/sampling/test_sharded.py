"""Sharded sampling: same images for any number of ranks; a killed run resumes with nothing lost or doubled."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ditcache.cli.main import main
from ditcache.engine import CacheEngine
from ditcache.models.loading import load_model, save_model
from ditcache.sampling.generate import SampleConfig, generate
from ditcache.sampling.sharded import assemble, recover, run_shard, shard_path

from ..conftest import tiny_dit


@pytest.fixture
def model_file(tmp_path):
    return str(save_model(tiny_dit(depth=2, size=8, channels=1, classes=4), tmp_path / "tiny.safetensors"))


def test_two_ranks_in_turn_equal_one_process(tmp_path, model_file):
    loaded = load_model(model_file)
    config = SampleConfig(num_samples=7, batch_size=2, steps=3)
    whole = generate(loaded, config)
    out = tmp_path / "run"
    for rank in (1, 0):
        with CacheEngine(loaded.module) as engine:
            run_shard(loaded, config, engine, out, rank=rank, world=2)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"batch{b:06d}.npz" for b in range(4)]
    images, labels = assemble(out, config)
    assert np.array_equal(images, whole.images) and np.array_equal(labels, whole.labels)


def test_resume_redoes_only_missing_batches_and_assembly_checks_completeness(tmp_path, model_file):
    loaded = load_model(model_file)
    config = SampleConfig(num_samples=6, batch_size=2, steps=3)
    out = tmp_path / "run"
    with CacheEngine(loaded.module) as engine:
        assert run_shard(loaded, config, engine, out)["batches"] == 3
        shard_path(out, 1).unlink()
        with pytest.raises(FileNotFoundError, match="incomplete"):
            assemble(out, config, keep_shards=True)
        again = run_shard(loaded, config, engine, out)
    assert (again["batches"], again["resumed_batches"]) == (1, 2)
    images, _ = assemble(out, config)
    assert np.array_equal(images, generate(loaded, config).images)


def test_stray_shards_beside_complete_samples_are_removed_and_damaged_shards_redone(tmp_path, model_file, capsys):
    loaded = load_model(model_file)
    config = SampleConfig(num_samples=6, batch_size=2, steps=3)
    out = tmp_path / "run"
    with CacheEngine(loaded.module) as engine:
        run_shard(loaded, config, engine, out)
        good = assemble(out, config, keep_shards=True)[0]
        # a concurrent run's stray shard beside a complete samples.npz: removed, samples kept
        assert recover(out, config) == [f"removed 3 stray shard(s) beside the complete {out / 'samples.npz'}"]
        assert np.array_equal(np.load(out / "samples.npz")["arr_0"], good)
        # a truncated samples.npz and a truncated shard: the first is removed, the second redone
        run_shard(loaded, config, engine, out)
        (out / "samples.npz").write_bytes((out / "samples.npz").read_bytes()[:100])
        shard_path(out, 2).write_bytes(shard_path(out, 2).read_bytes()[:50])
        assert "incomplete" in recover(out, config)[0]
        again = run_shard(loaded, config, engine, out)
    assert (again["batches"], again["resumed_batches"]) == (1, 2)
    assert "batch000002.npz is unreadable or incomplete; sampling batch 2 again" in capsys.readouterr().err
    assert np.array_equal(assemble(out, config)[0], good)


def _torchrun(model_file, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ditcache.cli.main", "sample", "--model", model_file, "--num-samples", "24", "--batch-size", "1",
           "--steps", "20", "--out", str(out), "--no-progress", "--policy", "fora:interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_torchrun_gloo_two_processes_killed_midway_then_resumed(tmp_path, model_file):
    out = tmp_path / "run"
    proc = _torchrun(model_file, out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "shards").is_dir() and len(list((out / "shards").glob("batch*.npz"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: launcher and both ranks
    proc.wait()
    written = len(list((out / "shards").glob("batch*.npz")))
    assert 2 <= written < 24, f"the kill should land mid-run; {written} of 24 batches were written"
    assert not (out / "samples.npz").exists()

    proc = _torchrun(model_file, out)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    resumed = np.load(out / "samples.npz")
    code = main(["sample", "--model", model_file, "--num-samples", "24", "--batch-size", "1", "--steps", "20",
                 "--out", str(tmp_path / "single"), "--no-progress", "--policy", "fora:interval=2"])
    assert code == 0
    single = np.load(tmp_path / "single" / "samples.npz")
    assert np.array_equal(resumed["arr_0"], single["arr_0"])  # every sample once, in order
    assert np.array_equal(resumed["labels"], single["labels"])
    assert not (out / "shards").exists()
