"""Every user error is one line on stderr with a non-zero exit; interrupts and closed pipes end cleanly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ditcache.cli.main import main
from ditcache.models import loading

# PYTHONUNBUFFERED (set by some runners) makes Python drop short writes to a closed pipe silently
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
       "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    assert main(["sample", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: no CUDA GPU is usable" in err and "use --device cpu" in err
    assert not (tmp_path / "x").exists()


def test_unfetchable_vae_hint_names_the_option(monkeypatch, tmp_path, capsys):
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(OSError) as err:
        loading.load_vae("ema")
    assert "`--vae DIR`" in str(err.value) and "huggingface-cli download stabilityai/sd-vae-ft-ema" in str(err.value)


def test_closed_pipe_ends_quietly():
    cmd = [sys.executable, "-m", "ditcache.cli.main", "schedule", "--policy", "fora:interval=2", "--depth", "28",
           "--steps", "1000", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ditcache.cli.main", "sample", "--num-samples", "200", "--batch-size", "2",
           "--steps", "4", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**ENV, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("batch*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read().decode().strip()
    assert proc.wait() == 130
    kept = len(list((out / "shards").glob("batch*.npz")))
    assert err == (f"ditcache sample: interrupted; kept {kept} finished batch shard(s) in {out}; run the same command "
                   "again to resume")
    assert 2 <= kept < 100 and not (tmp_path / ".run.lock").exists()
